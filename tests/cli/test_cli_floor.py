"""The floor a new user stands on (issue 12): model folders never run their own code, method options are
type-checked, ``--version``, help that describes every option, ``methods --json`` with the recipes, predict rows
that say which input they answer, and ``eval RUN`` from any working directory. Each refusal is checked for its
exit code, its one-line message, and that nothing was written or deleted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import graftune
from graftune.cli import app
from tests.train_helpers import bert_folder, one_line_error, topic_csv

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def snapshot(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (hidden ones too) with its size: what a refused command must leave."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def graftune_cli(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m graftune ARGS`` in a fresh process (so a prompt would really read ``stdin``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "graftune", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300, check=False)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A subprocess that failed as a user error: exit 2, one line on stderr, no traceback, nothing on stdout."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("floor")
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root}


def train_args(tiny, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["train", "--model", str(model or tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out),
            "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--precision", "fp32", "--quiet", *extra]


# --- 1. a model folder's own code never runs ---------------------------------------------------------------------
_EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evil"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def custom_code_folder(folder: Path, marker: Path, *, model_type: str) -> Path:
    """A tiny BERT folder whose config.json asks for its own classes (``auto_map`` -> modeling_evil.py, which
    writes ``marker`` when imported). ``model_type="bert"``: transformers knows the type and would silently load
    its own class; ``"evil"``: only the folder's code could load it (transformers prompts without
    ``trust_remote_code``)."""
    bert_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    return folder


@pytest.mark.parametrize("model_type", ["bert", "evil"])
def test_a_model_folder_with_its_own_code_is_refused_whatever_stdin_says(tiny, tmp_path, model_type):
    marker = tmp_path / "code-ran.txt"
    folder = custom_code_folder(tmp_path / "model", marker, model_type=model_type)
    before = snapshot(tmp_path)
    proc = graftune_cli(*train_args(tiny, tmp_path / "run", model=folder), stdin="y\n")
    assert_one_line(proc, f"{str(folder)!r} ships its own code (auto_map)", "never runs code from a model folder")
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # no run directory, no partial one, the model folder untouched


def test_load_base_refuses_custom_code_in_the_tokenizer_config(tmp_path):
    from graftune.errors import ModelError
    from graftune.zoo import load_base

    folder = bert_folder(tmp_path / "model")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match=r"ships its own code \(auto_map\)"):
        load_base(str(folder))
    assert load_base(str(bert_folder(tmp_path / "plain"))).tokenizer is not None  # a plain folder still loads


def test_every_from_pretrained_in_the_package_refuses_remote_code():
    """A new ``from_pretrained`` call without ``trust_remote_code=False`` would let transformers prompt again."""
    calls = []
    for path in (ROOT / "src" / "graftune").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        # every receiver but PeftModel (named in a docstring of the PEFT export: a user's call, not ours)
        for match in re.finditer(r"\b(?!PeftModel\b)\w+\.from_pretrained\(", text):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.name, text[match.start():end]))
    assert calls, "no from_pretrained call found: the scan is broken"
    unsafe = [(name, call) for name, call in calls if "trust_remote_code=False" not in call]
    assert not unsafe, unsafe


# --- 2. every method option is type-checked ----------------------------------------------------------------------
@pytest.mark.parametrize(("option", "message"), [
    ("r=true", "r: got True (a boolean); use an integer"),
    ("rslora=abc", "rslora: got 'abc' (a string); use true or false"),
    ("alpha=abc", "alpha: got 'abc' (a string); use a number"),
    ("dropout=[0.1]", "dropout: got [0.1] (a list); use a number"),
    ("targets=[query, 3]", "targets.names: got ['query', 3] (a list); use a list of strings"),
], ids=["bool-for-int", "string-for-bool", "string-for-float", "list-for-float", "int-in-names"])
def test_train_refuses_a_method_option_of_the_wrong_type(tiny, tmp_path, option, message):
    before = snapshot(tmp_path)
    result = runner.invoke(app, train_args(tiny, tmp_path / "run", "--method", "lora", "--set", option))
    assert message in one_line_error(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("method", "options", "message"), [
    ("lora", {"r": True}, "r: got True (a boolean); use an integer"),
    ("lora", {"r": 8.0}, "r: got 8.0 (a decimal number); use an integer"),
    ("lora", {"dora": 1}, "dora: got 1 (an integer); use true or false"),
    ("bottleneck", {"bottleneck_size": "8"}, "bottleneck_size: got '8' (a string); use an integer, or leave it unset"),
    ("bottleneck", {"residual": "no"}, "residual: got 'no' (a string); use true or false"),
    ("ia3", {"feedforward": 3}, "feedforward: got 3 (an integer); use a string"),
    ("prefix", {"projection": "yes"}, "projection: got 'yes' (a string); use true or false"),
    ("prompt", {"num_virtual_tokens": False}, "num_virtual_tokens: got False (a boolean); use an integer"),
    ("topk", {"top_k_layers": "2"}, "top_k_layers: got '2' (a string); use an integer"),
    ("lora", {"targets": 5}, "targets: got 5 (an integer); use a list of module names or a mapping"),
    ("lora", {"targets": {"layers": [True]}}, "targets.layers: got [True] (a list); use a list of integers"),
    ("lora", {"targets": {"bogus": 1}}, "targets: unknown key(s) bogus"),
])
def test_make_config_checks_each_field_against_its_annotation(method, options, message):
    from graftune.core.method import make_config
    from graftune.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_config(method, **options)
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_make_config_keeps_accepting_what_each_annotation_allows():
    from graftune.core.method import TargetSpec, make_config

    cfg = make_config("lora", r=4, alpha=8, dropout=0, rslora=True, targets="query", top_k_layers=None)
    assert (cfg.r, cfg.alpha, cfg.rslora, cfg.targets.names) == (4, 8, True, ("query",))  # an int is a number
    assert make_config("lora", targets={"layers": range(2)}).targets.layers == (0, 1)
    assert make_config("bottleneck", bottleneck_size=None, reduction_factor=8).reduction_factor == 8
    assert isinstance(make_config("lora", targets=TargetSpec(names=("value",))).targets, TargetSpec)


# --- 3. --version ------------------------------------------------------------------------------------------------
def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"graftune {graftune.__version__}\n"
    proc = graftune_cli("--version")  # the installed entry point's path: before any command is parsed
    assert proc.returncode == 0 and proc.stdout.strip() == f"graftune {graftune.__version__}"


# --- 4. help: flags as flags, defaults one way, every option described ---------------------------------------------
def command_paths() -> list[list[str]]:
    """Every command and subcommand of the CLI (``[]`` is the root), found from the app itself."""
    import typer

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def option_entries(help_text: str) -> list[tuple[str, str]]:
    """``(flags, description)`` for each entry of the Options/Arguments sections of a click help page: the
    description follows the flags after two spaces, or on the next, deeper-indented line when the flags are long."""
    entries, section = [], None
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line.rstrip(":") if line.endswith(":") else None
            continue
        if section not in ("Options", "Arguments") or not re.match(r"  \S", line):
            continue
        flags, _, description = line.strip().partition("  ")
        if not description.strip() and i + 1 < len(lines) and re.match(r"\s{4,}\S", lines[i + 1]):
            description = lines[i + 1]
        entries.append((flags, description.strip()))
    return entries


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "graftune")
def test_help_shows_flags_as_flags_one_default_style_and_describes_every_option(path):
    result = runner.invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    entries = option_entries(text)
    assert any(flags.startswith("--help") for flags, _ in entries), text  # the parser found the options
    assert "<bool>" not in text, text
    assert "(default" not in text, text  # one way: "[default: X]"
    undescribed = [flags for flags, description in entries if not description or description.startswith("[")]
    assert not undescribed, undescribed


def test_train_help_lists_resume_as_a_bare_flag_and_set_as_key_value():
    text = runner.invoke(app, ["train", "--help"], terminal_width=100).output
    assert re.search(r"^  --resume\s{2,}Continue", text, re.MULTILINE), text
    assert re.search(r"^  --set KEY=VALUE\s{2,}", text, re.MULTILINE), text
    assert "[default: 10]" in text and "[default: text]" in text  # defaults train fills in, shown like typer's


# --- 5. methods --json lists the recipes too ---------------------------------------------------------------------
def test_methods_json_lists_the_recipes_as_the_text_listing_does():
    from graftune import all_methods

    rows = json.loads(runner.invoke(app, ["methods", "--json"]).stdout)
    kinds = {r["name"]: r["kind"] for r in rows}
    assert {name for name, kind in kinds.items() if kind == "method"} == {m.name for m in all_methods()}
    recipes = [r for r in rows if r["kind"] == "recipe"]
    from graftune.runs import recipe_names

    assert [r["name"] for r in recipes] == recipe_names()  # the dispatch table's rows, auto last
    assert set(recipe_names()) == {"head", "auto", "contrastive", "probe", "in-context"}
    assert all(r["description"] and set(kinds.values()) == {"method", "recipe"} for r in recipes)
    text = runner.invoke(app, ["methods"]).stdout
    listed = [line.split(maxsplit=1) for line in text.split("\n\n")[1].splitlines()[1:]]
    assert listed == [[r["name"], r["description"]] for r in recipes]  # the same rows in both listings


# --- 6. predict --input: each row says which input it answers; the file is checked first --------------------------
@pytest.fixture(scope="module")
def run_dir(tiny):
    out = tiny["root"] / "run"
    result = runner.invoke(app, train_args(tiny, out, "--method", "lora", "--set", "r=2"))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def orphan_run(tiny):
    """A run whose base model folder is gone: any model load fails, so an error about the input file proves the
    file was checked before the model was loaded."""
    import shutil

    model = bert_folder(tiny["root"] / "gone-bert")
    out = tiny["root"] / "orphan"
    result = runner.invoke(app, train_args(tiny, out, "--method", "lora", "--set", "r=2", model=model))
    assert result.exit_code == 0, result.output
    shutil.rmtree(model)
    return out


def predict_json(*args: str) -> tuple[list[dict], str]:
    result = runner.invoke(app, ["predict", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_predict_txt_rows_carry_their_line_and_blank_lines_are_noted(run_dir, tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("goal match team\n\nchip phone app\n   \r\nbank share price\n")
    rows, err = predict_json(str(run_dir), "cup final", "--input", str(path))
    assert [(r.get("arg"), r.get("line"), r["text"]) for r in rows] == [
        (1, None, "cup final"), (None, 1, "goal match team"), (None, 3, "chip phone app"),
        (None, 5, "bank share price")]
    assert all(set(r["probabilities"]) == {"money", "sport", "tech"} for r in rows)
    assert err.strip() == "note: skipped 2 blank lines (lines 2, 4)"
    text = runner.invoke(app, ["predict", str(run_dir), "cup final", "--input", str(path)])
    lines = text.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["arg 1", "line 1", "line 3", "line 5"]
    assert [line.split("\t")[1] for line in lines] == [r["label"] for r in rows]  # the same predictions
    assert lines[3].endswith("bank share price")


def test_predict_csv_and_jsonl_rows_carry_the_line_their_record_starts_on(run_dir, tmp_path):
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('id,text\n1,goal match\n2,"chip\nphone app"\n3,\n4,bank price\n')
    rows, err = predict_json(str(run_dir), "--input", str(csv_path))
    assert [(r["line"], r["text"]) for r in rows] == [(2, "goal match"), (3, "chip\nphone app"), (6, "bank price")]
    assert err.strip() == "note: skipped 1 blank line (line 5)"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"body": "goal match"}\n\n{"body": "chip phone"}\n')
    rows, err = predict_json(str(run_dir), "--input", str(jsonl), "--text-column", "body")
    assert [(r["line"], r["text"]) for r in rows] == [(1, "goal match"), (3, "chip phone")]
    assert err.strip() == ""  # a blank line of a .jsonl holds no record (as in training data); a blank text would


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "missing.txt: no such file"),
    ("empty.txt", "", "empty.txt: no text in it"),
    ("blank.txt", "\n  \n", "blank.txt: no text in it"),
    ("in.csv", "id,body\n1,goal\n", "in.csv: no 'text' column (columns: id, body); use --text-column NAME"),
    ("in.jsonl", '{"text": "goal"}\n{"body": "x"}\n', "in.jsonl line 2: no 'text' field (fields: body)"),
    ("bad.jsonl", '{"text": "goal"}\n{oops\n', "bad.jsonl line 2: not valid JSON"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "latin1.txt: not UTF-8 at line 1"),
    ("folder", "dir", "folder: a folder is read as images (for image runs), but it holds none"),
    ("texts.xlsx", b"PK\x03\x04", "texts.xlsx: a .xlsx file is not text"),
    ("in.json", '{"text": "goal"}', "in.json: expected a list of records"),
    ("nested.json", '[{"text": {"a": 1}}]', "nested.json record 0: 'text' holds an object, not text"),
], ids=["missing", "empty", "only-blank", "csv-column", "jsonl-field", "jsonl-syntax", "not-utf8", "folder", "xlsx",
        "json-shape", "json-nested"])
def test_predict_checks_the_input_file_before_loading_the_model(orphan_run, tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
        (path / "a.txt").write_text("goal\n")
    elif content is not None:
        path.write_text(content)
    before, run_before = snapshot(tmp_path), snapshot(orphan_run)
    text = one_line_error(runner.invoke(app, ["predict", str(orphan_run), "--input", str(path)]))
    assert message in text and "gone-bert" not in text, text
    assert snapshot(tmp_path) == before and snapshot(orphan_run) == run_before


def test_predict_reads_json_and_parquet_records_and_the_runs_own_text_column(tiny, run_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = tmp_path / "in.json"
    records.write_text(json.dumps([{"text": "goal match"}, {"text": ""}, {"text": "chip phone"}]))
    rows, err = predict_json(str(run_dir), "--input", str(records))
    assert [(r["record"], r["text"]) for r in rows] == [(0, "goal match"), (2, "chip phone")]
    assert "skipped 1 blank text (record 1)" in err
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["goal match", "bank price"]}), table)
    rows, _ = predict_json(str(run_dir), "--input", str(table))
    assert [(r["row"], r["text"]) for r in rows] == [(0, "goal match"), (1, "bank price")]
    # a run trained on a file whose texts sit in another column reads --input files by that column
    body = tmp_path / "body.csv"
    body.write_text((tiny["csv"]).read_text().replace("text,label", "body,label", 1))
    out = tmp_path / "body-run"
    args = train_args(tiny, out, "--method", "lora", "--set", "r=2", "--text-column", "body")
    args[args.index("--data") + 1] = str(body)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows, _ = predict_json(str(out), "--input", str(body))
    assert len(rows) > 0 and rows[0]["line"] == 2


def test_predict_refuses_a_blank_text_argument(orphan_run):
    text = one_line_error(runner.invoke(app, ["predict", str(orphan_run), "goal", "  "]))
    assert "arg 2 is blank" in text


def test_the_orphan_run_really_needs_its_model(orphan_run, tmp_path):
    """The other half of the check above: with a valid file, the (missing) model is what fails."""
    path = tmp_path / "ok.txt"
    path.write_text("goal\n")
    assert "gone-bert" in one_line_error(runner.invoke(app, ["predict", str(orphan_run), "--input", str(path)]))


def test_read_input_file_gives_image_files_by_name(tmp_path):
    from graftune.data.inputs import read_input_file
    from tests.train_helpers import image_folder

    folder = image_folder(tmp_path / "imgs", n_per_class=2)
    got = read_input_file(folder / "dark")
    assert got.images and [s["file"] for s in got.sources] == ["0.png", "1.png"]
    assert got.items[0].shape[0] == 3 and got.note() is None
    assert read_input_file(folder / "light" / "1.png").sources == [{"file": str(folder / "light" / "1.png")}]


# --- 7. eval RUN from any working directory ----------------------------------------------------------------------
def test_eval_of_a_run_trained_with_relative_paths_works_from_another_directory(tiny, tmp_path, monkeypatch):
    import shutil

    here = tmp_path / "project"
    (here / "data").mkdir(parents=True)
    shutil.copy(tiny["csv"], here / "data" / "train.csv")
    test_rows = tiny["root"] / "test.csv"
    topic_csv(test_rows, n_per_class=4, seed=1)
    shutil.copy(test_rows, here / "data" / "test.csv")
    monkeypatch.chdir(here)
    result = runner.invoke(app, ["train", "--model", str(tiny["bert"]), "--data", "data/train.csv", "--test",
                                 "data/test.csv", "--out", "runs/a", "--epochs", "1", "--batch-size", "8",
                                 "--max-length", "32", "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["eval", str(here / "runs" / "a"), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    trained = json.loads((here / "runs" / "a" / "metrics.json").read_text())
    assert scored["examples"] == trained["examples"] == 12 and scored["accuracy"] == trained["accuracy"]
    assert list(elsewhere.iterdir()) == []  # eval writes nothing where it is run
