"""``train(RunConfig(method="contrastive"))`` on a tiny BERT: the same data path and run directory as other runs, a
head saved as safetensors + JSON, and ``load_run`` / ``evaluate_run`` / ``predict`` giving exactly what the
``FewShotModel`` in memory gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from graftune import runs as entry
from graftune.config import RunConfig, build_config
from graftune.errors import ArtifactError, ConfigError
from graftune.evaluate import evaluate_run, load_run, predict
from graftune.recipes import contrastive as cr
from graftune.run.rundir import partial_dir
from graftune.runs import train
from tests.train_helpers import bert_folder, topic_csv, train_args

#: two pairs per example; LoRA in the top layer only, so the layer below is cached during training
OPTIONS = {"iterations": 2, "top_k_layers": 1}


def contrastive_args(tiny, out: Path, **extra) -> dict:
    args = train_args(tiny["bert"], tiny["csv"], out, **{"method": "contrastive", "shots": 4,
                                                         "options": dict(OPTIONS), **extra})
    del args["epochs"], args["lr"]  # train()'s loop settings: contrastive takes pair epochs from --set epochs
    return args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root}


@pytest.fixture(scope="module")
def run(tiny):
    out = tiny["root"] / "run"
    metrics = train(RunConfig(**contrastive_args(tiny, out)), progress=False)
    return out, metrics


def refit(run_dir: Path):
    """The run's FewShotModel fitted again in memory: same config, same splits, contrastive_fit itself."""
    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.recipes.fewshot import contrastive_fit
    from graftune.zoo import load_base

    cfg = build_config(run_dir / "run.yaml")
    splits = make_splits(load_data(cfg.data), **cfg.split_args())
    base = load_base(cfg.model, task="text-classification")
    args = cr.fit_arguments(cfg, family=base.family, pooling=base.pooling, adapter_name=run_dir.name)
    fitted = contrastive_fit(AdapterModel(base.model, family=base.family), base.tokenizer, splits.train.inputs,
                             splits.train.labels, **args)
    return fitted, splits


def test_the_run_directory_matches_a_classification_run(run, tiny):
    out, metrics = run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "data_card.json", "head", "log.jsonl",
                                                     "metrics.json", "run.yaml"]
    assert not partial_dir(out).exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["top_k_layers"] == 1 and meta["head"] is None
    assert meta["label_names"] == ["money", "sport", "tech"] and meta["extra"]["strategy"] == "contrastive"
    assert sorted(p.name for p in (out / "head").iterdir()) == ["head.json", "head.safetensors"]
    head = json.loads((out / "head" / "head.json").read_text())
    assert head["classes"] == ["money", "sport", "tech"] and head["shapes"]["coef"] == [3, 32]
    assert head["embedding"] == {"adapter": "run", "pooling": "mean", "normalize": True, "max_length": 32,
                                 "max_chunks": 4, "batch_size": 32, "precision": "fp32", "autocast": False}
    assert head["format_version"] == 1 and head["kind"] == "logistic"  # what graftune before probe runs reads
    assert head["label_names"] == ["money", "sport", "tech"]

    # a LoRA run with the same split settings: the same training and test examples (the LoRA run holds out a
    # validation part for early stopping, the contrastive one none), and metrics.json has every key it has
    lora_out = tiny["root"] / "lora"
    lora = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], lora_out, shots=4, epochs=1)), progress=False)
    assert set(lora) <= set(metrics), set(lora) - set(metrics)
    card, lora_card = (json.loads((d / "data_card.json").read_text())["splits"] for d in (out, lora_out))
    assert {k: card[k]["fingerprint"] for k in ("train", "test")} == {
        k: lora_card[k]["fingerprint"] for k in ("train", "test")}
    assert card["val"]["examples"] == 0 < lora_card["val"]["examples"]
    assert metrics["method"] == "contrastive" and metrics["best_epoch"] is None and metrics["epochs_run"] == 1
    assert metrics["contrastive"]["pairs"] == 2 * 2 * 12 and metrics["steps"] == 48 // 8  # batch_size: pairs/step
    assert not metrics["speed"]["cache"].startswith("off"), metrics["speed"]["cache"]
    assert metrics["trainable_params"] == meta["sizes"]["adapter_params"] + 3 * 32 + 3
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("step") == metrics["steps"] and events[-1] == "end"


def test_reload_predicts_exactly_what_the_model_in_memory_predicted(run):
    out, metrics = run
    fitted, splits = refit(out)
    texts = splits.test.inputs
    loaded = load_run(out)
    assert loaded.fewshot is not None and loaded.kind == "classification"
    rows = predict(loaded, texts)
    assert [r["label"] for r in rows] == [str(p) for p in fitted.predict(texts)]
    expected = fitted.predict_proba(texts)
    columns = [list(fitted.classes).index(n) for n in loaded.label_names]
    got = np.asarray([[r["probabilities"][n] for n in loaded.label_names] for r in rows])
    assert got.tolist() == [[round(float(v), 6) for v in row] for row in expected[:, columns]]
    # not rounded: the reloaded FewShotModel itself, bit for bit
    assert np.array_equal(loaded.fewshot.predict_proba(texts), expected)
    accuracy = np.mean([p == t for p, t in zip(fitted.predict(texts), splits.test.labels)])
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=0)


def test_eval_gives_the_metrics_of_metrics_json(run, tiny):
    out, metrics = run
    scored = evaluate_run(out)
    assert scored == {k: metrics[k] for k in scored}
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss", "examples"} <= set(scored)
    from graftune.data.sources import load_data

    other = evaluate_run(out, data=str(tiny["csv"]))  # every row of a labelled file
    assert other["examples"] == len(load_data(str(tiny["csv"])).inputs) > scored["examples"]


def test_no_pickle_anywhere_in_the_run(run):
    out, _ = run
    from safetensors.torch import load_file

    files = [f for f in out.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} == {".json", ".jsonl", ".yaml", ".safetensors"}
    for f in files:
        if f.suffix == ".safetensors":  # an 8-byte header length, then the JSON header: no pickle, no zip
            assert f.read_bytes()[8:9] == b"{" and load_file(f), f
        else:
            f.read_text(encoding="utf-8")


def test_int8_is_refused_with_one_line(run):
    with pytest.raises(ConfigError, match="quantize int8: a contrastive run") as e:
        load_run(run[0], quantize="int8")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "head.safetensors: not a valid safetensors file"),
    ("pickle", "is a pickle"),
    ("bad json", "head.json: not valid JSON"),
    ("wrong shape", "expected float coef (3 x features)"),
    ("no head", "head: missing; a contrastive run keeps"),
])
def test_a_damaged_head_is_one_clear_line(run, tmp_path, damage, message):
    import torch
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy)
    head = copy / "head"
    if damage == "garbage":
        (head / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif damage == "pickle":
        torch.save({"coef": torch.zeros(3)}, head / "head.safetensors")
    elif damage == "bad json":
        (head / "head.json").write_text("{classes: ")
    elif damage == "wrong shape":
        save_file({"coef": torch.zeros(2, 32), "intercept": torch.zeros(2)}, head / "head.safetensors")
    else:
        shutil.rmtree(head)
    with pytest.raises(ArtifactError) as e:
        load_run(copy)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"task": "image"}, "task: got image; --method contrastive trains text classifiers"),
    ({"task": "causal-lm"}, "task: got causal-lm"),
    ({"epochs": 3}, "epochs: --method contrastive makes passes over pairs"),
    ({"init_from": "runs/a"}, "init_from: --method contrastive trains a fresh LoRA adapter"),
    ({"stack_under": "runs/lang"}, "stack_under: --method contrastive does not stack"),
    ({"resume": True}, "resume: a contrastive run writes no checkpoints"),
    ({"patience": 2}, "patience: steers train()'s epoch loop"),
    ({"options": {"rank": 4}}, "unknown option(s) rank; use iterations, epochs, loss"),
    ({"options": {"iterations": 0}}, "iterations: got 0"),
    ({"options": {"loss": "triplet"}}, "loss: got 'triplet'; use one of cosine, supcon"),
    ({"options": {"head_c": -1}}, "head_c: got -1"),
    ({"options": {"r": -1}}, "r: got -1"),
])
def test_bad_configs_fail_before_anything_runs(tiny, tmp_path, change, message):
    args = {**contrastive_args(tiny, tmp_path / "out"), **change}
    with pytest.raises(ConfigError) as e:
        entry.check(RunConfig(**args))  # the recipe's checks: before data or a model is loaded
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_options_reach_contrastive_fit(tiny, tmp_path):
    cfg = RunConfig(**contrastive_args(tiny, tmp_path / "o", max_length=64, batch_size=4, seed=3,
                                       options={"iterations": 5, "epochs": 2, "loss": "supcon", "r": 4,
                                                "temperature": 0.2, "head_c": 0.5, "embed_max_chunks": 2}))
    args = cr.fit_arguments(cfg, family="bert", pooling=None, adapter_name="a")
    assert {k: args[k] for k in ("iterations", "epochs", "loss", "temperature", "head_c", "embed_max_chunks", "seed",
                                 "batch_size", "max_length", "embed_max_length", "adapter_name")} == {
        "iterations": 5, "epochs": 2, "loss": "supcon", "temperature": 0.2, "head_c": 0.5, "embed_max_chunks": 2,
        "seed": 3, "batch_size": 4, "max_length": 64, "embed_max_length": 64, "adapter_name": "a"}
    assert args["method_options"]["r"] == 4 and args["method_options"]["top_k_layers"] == 2  # the default
    assert args["method_options"]["targets"] == {"names": ["query", "key", "value", "attention.output.dense"]}


def test_unset_rate_and_batch_are_the_recipes_own_and_recorded(tiny, tmp_path):
    """No --lr / --batch-size: contrastive trains 64 pairs a step at 3e-3 (not the adapter loop's 16 at 1e-3), and
    run.yaml and the report say so; given ones are kept."""
    args = contrastive_args(tiny, tmp_path / "own")
    del args["batch_size"]
    train(RunConfig(**args), progress=False)
    saved = build_config(tmp_path / "own" / "run.yaml")
    assert (saved.lr, saved.batch_size) == (cr.STEP_DEFAULTS["lr"], cr.STEP_DEFAULTS["batch_size"]) == (3e-3, 64)
    meta = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert meta["contrastive"]["lr"] == 3e-3, meta["contrastive"]
    given = RunConfig(**{**args, "lr": 1e-3, "batch_size": 16}).with_step_defaults(cr.STEP_DEFAULTS)
    assert (given.lr, given.batch_size) == (1e-3, 16)


@pytest.mark.parametrize("method", ["contrastive", "probe"])
def test_no_validation_part_unless_asked(tiny, tmp_path, method):
    """Contrastive and probe runs never read a validation part: unset --val-size holds out none, so every example
    not in the test set trains, and run.yaml records 0; a given --val-size is kept. The adapter loop keeps 10%."""
    args = contrastive_args(tiny, tmp_path / "own", method=method)
    del args["shots"]
    if method == "probe":
        args["options"] = {}
        del args["batch_size"]
    train(RunConfig(**args), progress=False)
    card = json.loads((tmp_path / "own" / "data_card.json").read_text())["splits"]
    assert card["val"]["examples"] == 0 and card["train"]["examples"] + card["test"]["examples"] == 60  # 3 x 20
    assert build_config(tmp_path / "own" / "run.yaml").val_size == 0
    train(RunConfig(**{**args, "out": str(tmp_path / "asked"), "val_size": 0.1}), progress=False)
    asked = json.loads((tmp_path / "asked" / "data_card.json").read_text())["splits"]
    assert asked["val"]["examples"] == 6 and asked["train"]["examples"] == card["train"]["examples"] - 6
    assert asked["test"] == card["test"]  # the same test set either way
    loop = tmp_path / "loop"
    train(RunConfig(**{**args, "method": "lora", "options": {}, "out": str(loop), "epochs": 1}), progress=False)
    assert build_config(loop / "run.yaml").val_size == 0.1
    assert json.loads((loop / "data_card.json").read_text())["splits"]["val"]["examples"] == 6
