"""`graftune methods`: every registered method with its one-line description, as text and as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from graftune import all_methods
from graftune.cli import app

runner = CliRunner()


def test_methods_lists_every_registered_method_with_its_description():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    listing, recipes = result.stdout.strip().split("\n\n")
    lines = listing.splitlines()
    registered = all_methods()
    assert len(lines) == len(registered)
    assert all(name in recipes for name in ("head", "auto", "contrastive", "probe"))  # train's own recipes
    for line, method in zip(lines, registered):
        name, description = line.split(maxsplit=1)
        assert name == method.name and description == method.description
        assert description.strip() and "\n" not in method.description
    assert {"lora", "ia3", "bottleneck", "prefix", "prompt", "bitfit", "topk", "full"} <= {m.name for m in registered}


def test_methods_json_is_a_list_of_objects_with_name_and_description():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    assert [r["name"] for r in rows if r["kind"] == "method"] == [m.name for m in all_methods()]
    by_name = {r["name"]: r for r in rows}
    for m in all_methods():
        assert by_name[m.name]["description"] == m.description
        assert by_name[m.name]["mergeable"] == m.capabilities.mergeable
        assert by_name[m.name]["mixed_batch"] == m.capabilities.mixed_batch
    assert by_name["lora"]["mergeable"] and not by_name["bottleneck"]["mergeable"]
