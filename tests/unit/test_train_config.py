"""The run config (YAML + flags, flags win; --set method options) and the precision policy."""

from __future__ import annotations

import pytest
import torch
import yaml

from graftune import runs
from graftune.config import RunConfig, build_config, parse_sets
from graftune.errors import ConfigError
from graftune.speed import precision


def test_flags_win_over_yaml_and_set_merges_into_options(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model: minilm\ndata: bbc-news\nepochs: 3\nlr: 0.01\noptions: {r: 4, alpha: 8}\n")
    cfg = build_config(f, sets=["r=16", "targets=[query]"], epochs=7, lr=None)
    assert cfg.epochs == 7 and cfg.lr == 0.01  # None = flag not given
    assert cfg.options == {"r": 16, "alpha": 8, "targets": ["query"]}


def test_another_method_drops_the_files_options(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model: m\ndata: d\nmethod: lora\noptions: {r: 4}\n")
    assert build_config(f, method="bitfit").options == {}


def test_run_yaml_round_trips(tmp_path):
    cfg = RunConfig(model="m", data="d", options={"r": 4}, shots=8, out="x", overwrite=True)
    f = tmp_path / "run.yaml"
    f.write_text(cfg.to_yaml())
    assert "out" not in yaml.safe_load(f.read_text())  # where to write is not part of the recipe
    again = build_config(f, out="y")
    assert again.to_dict() == cfg.to_dict()


def test_parse_sets_reads_yaml_values():
    assert parse_sets(["r=8", "dropout=0.1", "rslora=true", "name=abc"]) == {
        "r": 8, "dropout": 0.1, "rslora": True, "name": "abc"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["r8"])


@pytest.mark.parametrize("changes, field", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": "ten"}, "epochs"),
    ({"lr": -1.0}, "lr"),
    ({"schedule": "step"}, "schedule"),
    ({"metric": "f2"}, "metric"),
    ({"precision": "int8"}, "precision"),
    ({"batch_size": 10, "grad_accum": 3}, "grad_accum"),
    ({"warmup": 1.5}, "warmup"),
    ({"log_to": "wandb"}, "log_to"),
    ({"options": {"r": -1}}, "r"),
    ({"model": ""}, "model"),
])
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{"model": "m", "data": "d", **changes})


def test_an_unknown_method_names_both_kinds():
    # methods that are not the engine's are recipes: the dispatch table refuses the rest before anything loads
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; use an adapter method \(.*lora.*\), or one of the "
                                          r"recipes head, contrastive, probe"):
        runs.check(RunConfig(model="m", data="d", method="nope"))
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; did you mean 'lora'\? use an adapter method"):
        runs.check(RunConfig(model="m", data="d", method="lorra"))


@pytest.mark.parametrize(("name", "spelling"), [("linear-probe", "--method probe"),
                                                ("prototypes", "--method probe --set head=prototype"),
                                                ("lora-top2", "--method lora --set r=8 --set alpha=16")])
def test_a_compare_strategy_name_is_answered_with_its_train_spelling(name, spelling):
    with pytest.raises(ConfigError, match=f"'{name}' is graftune compare's name for a strategy; train it with "
                                          f"{spelling}"):
        runs.check(RunConfig(model="m", data="d", method=name))


def test_unknown_yaml_keys_and_bad_yaml(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model: m\ndata: d\nepoch: 3\n")
    with pytest.raises(ConfigError, match="unknown field.*epoch"):
        build_config(f)
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(f)
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "missing.yaml")


def test_test_size_counts_stay_counts():
    assert RunConfig(model="m", data="d", test_size=100.0).test_size == 100
    assert RunConfig(model="m", data="d", test_size=0.25).test_size == 0.25


# --- precision ----------------------------------------------------------------------------------------------
def test_policy_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    auto = precision.choose("auto")
    assert auto.name == "bf16" and auto.autocast_dtype == torch.bfloat16 and auto.frozen_dtype == torch.bfloat16
    assert precision.choose("auto", inference=True).frozen_dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.choose("auto").name == "fp32"
    assert precision.choose("fp32").autocast_dtype is None
    with pytest.raises(ConfigError, match="fp16"):
        precision.choose("fp16")


def test_apply_casts_frozen_weights_only():
    lin, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    lin.requires_grad_(False)
    model = torch.nn.Sequential(lin, head, torch.nn.BatchNorm1d(2))
    model[2].requires_grad_(False)
    precision.apply(model, precision.Precision("bf16", torch.bfloat16, None, "cpu"))
    assert lin.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    assert model[2].running_mean.dtype == torch.bfloat16


def test_split_seed_fixes_the_test_set_while_seed_draws_the_shots():
    a = RunConfig(model="m", data="d", seed=2, split_seed=0, shots=4).split_args()
    assert a["seed"] == 0 and a["shot_seed"] == 2 and a["shots"] == 4
    b = RunConfig(model="m", data="d", seed=3).split_args()
    assert b["seed"] == 3 and b["shot_seed"] == 3


def test_scientific_notation_is_a_number(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model: m\ndata: d\nlr: 5e-4\noptions: {dropout: 1e-1}\n")  # PyYAML reads 5e-4 as a string
    cfg = build_config(f, sets=["alpha=1e1"], head_lr="2e-3")
    assert cfg.lr == 5e-4 and cfg.head_lr == 2e-3 and cfg.options == {"dropout": 0.1, "alpha": 10.0}


def test_unset_rate_and_batch_are_filled_with_the_methods_defaults():
    cfg = RunConfig(model="m", data="d")
    assert (cfg.lr, cfg.batch_size) == (None, None)  # unset until a recipe says what it trains with
    assert (cfg.with_step_defaults().lr, cfg.with_step_defaults().batch_size) == (1e-3, 16)
    own = RunConfig(model="m", data="d", lr=0.02).with_step_defaults({"lr": 3e-3, "batch_size": 64})
    assert (own.lr, own.batch_size) == (0.02, 64)  # a given value is kept
    with pytest.raises(ConfigError, match="batch_size 16 is not a multiple of grad_accum 3"):
        RunConfig(model="m", data="d", grad_accum=3)  # checked against the default batch


def test_a_run_yaml_from_before_the_method_defaults_repeats_for_every_method():
    """run.yaml files written while lr and batch_size defaulted to 1e-3 and 16 hold those values for probe and
    in-context runs too: they are not settings the user chose, so repeating such a run is not refused."""
    for method in ("probe", "in-context"):
        runs.check(RunConfig(model="minilm", data="d.csv", method=method, lr=1e-3, batch_size=16))
        with pytest.raises(ConfigError, match="lr"):
            runs.check(RunConfig(model="minilm", data="d.csv", method=method, lr=2e-3))
