"""``train(RunConfig(method="probe"))`` on a tiny BERT: ``fewshot.frozen_fit`` on the frozen base (logistic regression
or class means) as a run directory without an adapter, reloaded by ``load_run`` / ``evaluate_run`` / ``predict`` to
exactly what the ``FewShotModel`` in memory gives, and scoring what ``graftune compare``'s ``linear-probe`` and
``prototypes`` score on the same split."""

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
from graftune.recipes import fewshot_run
from graftune.recipes import probe as cr
from graftune.run.rundir import partial_dir
from graftune.runs import train
from tests.train_helpers import bert_folder, topic_csv, train_args

HEADS = ("logistic", "prototype")


def probe_args(tiny, out: Path, **extra) -> dict:
    # precision auto, as graftune compare embeds (bf16 + autocast where the CPU has it: the autocast path is tested)
    args = train_args(tiny["bert"], tiny["csv"], out, **{"method": "probe", "shots": 4, "precision": "auto",
                                                         **extra})
    del args["epochs"], args["lr"], args["batch_size"]  # train()'s loop settings: a probe trains nothing by steps
    return args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root}


@pytest.fixture(scope="module")
def runs(tiny):
    """One run per head: {head: (run dir, metrics)}."""
    out = {}
    for head in HEADS:
        run_dir = tiny["root"] / head
        out[head] = run_dir, train(RunConfig(**probe_args(tiny, run_dir, options={"head": head})), progress=False)
    return out


def refit(run_dir: Path, head: str):
    """The run's FewShotModel fitted again in memory, written out here rather than through fewshot_run: the
    frozen base cast to the inference policy, frozen_fit under its autocast. Returns (fitted, policy, splits)."""
    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.recipes.fewshot import frozen_fit
    from graftune.speed import precision
    from graftune.zoo import load_base

    cfg = build_config(run_dir / "run.yaml")
    splits = make_splits(load_data(cfg.data), **cfg.split_args())
    base = load_base(cfg.model, task="text-classification")
    model = AdapterModel(base.model, family=base.family)
    policy = precision.choose(cfg.precision, inference=True)
    precision.apply(model.base, policy)
    with policy.autocast():
        fitted = frozen_fit(model, base.tokenizer, splits.train.inputs, splits.train.labels, head=head, max_length=32,
                            pooling=base.pooling, head_c=1.0, max_chunks=4)
    return fitted, policy, splits


def test_the_run_directory_has_a_head_and_no_adapter(runs, tiny):
    from graftune.speed import precision

    policy = precision.choose("auto", inference=True).name
    for head, (out, metrics) in runs.items():
        assert sorted(p.name for p in out.iterdir()) == ["data_card.json", "head", "log.jsonl", "metrics.json",
                                                         "run.yaml"]
        assert not partial_dir(out).exists()
        assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
        meta = json.loads((out / "head" / "head.json").read_text())
        assert meta["kind"] == head and meta["format_version"] == 2
        assert meta["classes"] == meta["label_names"] == ["money", "sport", "tech"]
        assert meta["embedding"] == {"adapter": None, "pooling": "mean", "normalize": True, "max_length": 32,
                                     "max_chunks": 4, "batch_size": 32, "precision": policy, "autocast": True}
        assert metrics["method"] == "probe" and metrics["precision"] == policy and metrics["probe"]["head"] == head
        assert metrics["adapter_bytes"] == 0 and metrics["epochs_run"] == 0 and metrics["steps"] == 0
        assert metrics["probe"]["examples"] == 12
        events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert events == ["start", "speed", "fit", "end"]
    logistic, prototype = (json.loads((runs[h][0] / "head" / "head.json").read_text()) for h in HEADS)
    assert logistic["shapes"] == {"coef": [3, 32], "intercept": [3]} and logistic["C"] == 1.0
    assert prototype["shapes"] == {"prototypes": [3, 32]} and prototype["temperature"] == 0.05
    assert runs["logistic"][1]["trainable_params"] == 3 * 32 + 3 and runs["prototype"][1]["trainable_params"] == 0

    # a LoRA run with the same split settings: the same training and test examples (the LoRA run holds out a
    # validation part for early stopping, the probe none), and metrics.json has every key it has
    lora_out = tiny["root"] / "lora"
    lora = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], lora_out, shots=4, epochs=1)), progress=False)
    out, metrics = runs["logistic"]
    assert set(lora) <= set(metrics), set(lora) - set(metrics)
    card, lora_card = (json.loads((d / "data_card.json").read_text())["splits"] for d in (out, lora_out))
    assert {k: card[k]["fingerprint"] for k in ("train", "test")} == {
        k: lora_card[k]["fingerprint"] for k in ("train", "test")}
    assert card["val"]["examples"] == 0 < lora_card["val"]["examples"]


@pytest.mark.parametrize("head", HEADS)
def test_reload_predicts_exactly_what_the_model_in_memory_predicted(runs, head):
    out, metrics = runs[head]
    fitted, policy, splits = refit(out, head)
    texts = splits.test.inputs
    with policy.autocast():  # the embeddings under autocast, the head outside it, as compare's linear-probe does
        emb = fitted.embed(texts).numpy()
    expected, labels = fitted.head.predict_proba(emb), [str(p) for p in fitted.head.predict(emb)]
    loaded = load_run(out)
    assert loaded.fewshot is not None and loaded.kind == "classification" and loaded.fewshot.adapter is None
    assert type(loaded.fewshot.head) is type(fitted.head)
    # not rounded: the reloaded FewShotModel itself, bit for bit
    assert np.array_equal(loaded.fewshot.predict_proba(texts), expected)
    rows = predict(loaded, texts)
    assert [r["label"] for r in rows] == labels == [str(p) for p in loaded.fewshot.predict(texts)]
    columns = [list(fitted.classes).index(n) for n in loaded.label_names]
    got = np.asarray([[r["probabilities"][n] for n in loaded.label_names] for r in rows])
    assert got.tolist() == [[round(float(v), 6) for v in row] for row in expected[:, columns]]
    assert metrics["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(labels, splits.test.labels)]), abs=0)


@pytest.mark.parametrize("head, strategy", [("logistic", "linear-probe"), ("prototype", "prototypes")])
def test_the_run_scores_what_compare_scores(runs, tiny, head, strategy):
    """compare's own code path (``_Frozen`` + ``_run_features``) on the run's split gives the run's test metrics."""
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.strategies import catalog

    out, metrics = runs[head]
    cfg = build_config(out / "run.yaml")
    ds = load_data(cfg.data)
    splits = make_splits(ds, **cfg.split_args())
    frozen = catalog.Frozen(cfg.model, ds, cfg.max_length)
    expected = catalog.run_features(catalog.STRATEGIES[strategy], frozen, splits, "test")
    assert (metrics["accuracy"], metrics["macro_f1"]) == (expected["accuracy"], expected["macro_f1"])
    assert metrics["trainable_params"] == expected["trainable_params"]


def test_eval_gives_the_metrics_of_metrics_json(runs, tiny):
    for out, metrics in runs.values():
        scored = evaluate_run(out)
        assert scored == {k: metrics[k] for k in scored}
        assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss", "examples"} <= set(scored)


def test_int8_is_refused_with_one_line(runs):
    with pytest.raises(ConfigError, match="quantize int8: a probe run predicts from the float embeddings") as e:
        load_run(runs["prototype"][0], quantize="int8")
    assert "\n" not in str(e.value)


def _edit_json(file: Path, **changes) -> None:
    meta = json.loads(file.read_text())
    for key, value in changes.items():
        if key == "adapter":
            meta["embedding"]["adapter"] = value
        else:
            meta[key] = value
    file.write_text(json.dumps(meta))


@pytest.mark.parametrize("head, damage, message", [
    ("prototype", "garbage", "head.safetensors: not a valid safetensors file"),
    ("prototype", "wrong shape", "expected float32 prototypes (3 x features), one per class"),
    ("prototype", "version 1", "head.json: classes, label names, temperature or embedding settings missing"),
    ("prototype", "version 3", "head.json: format_version 3 is newer than this graftune reads (2)"),
    ("logistic", "names an adapter", "reads adapter 'x', which a probe run does not have"),
    ("logistic", "no label names", "head.json: label_names missing"),
    ("logistic", "unknown kind", "not a graftune few-shot head (format='graftune-fewshot-head', kind='svm')"),
    ("logistic", "no head", "head: missing; a probe run keeps its head there"),
])
def test_a_damaged_head_is_one_clear_line(runs, tmp_path, head, damage, message):
    import torch
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(runs[head][0], copy)
    folder = copy / "head"
    meta = folder / "head.json"
    if damage == "garbage":
        (folder / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif damage == "wrong shape":
        save_file({"prototypes": torch.zeros(2, 32)}, folder / "head.safetensors")
    elif damage == "version 1":  # version 1 knew logistic heads read through an adapter only
        _edit_json(meta, format_version=1)
    elif damage == "version 3":
        _edit_json(meta, format_version=3)
    elif damage == "names an adapter":
        _edit_json(meta, adapter="x")
    elif damage == "no label names":
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "label_names"}))
    elif damage == "unknown kind":
        _edit_json(meta, kind="svm")
    else:
        shutil.rmtree(folder)
    with pytest.raises(ArtifactError) as e:
        load_run(copy)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"task": "image"}, "task: got image; --method probe trains text classifiers"),
    ({"epochs": 3}, "epochs: --method probe trains nothing by gradient"),
    ({"lr": 1e-2}, "lr: --method probe trains nothing by gradient"),
    ({"batch_size": 8}, "drop --batch-size"),
    ({"cache": "off"}, "cache: --method probe embeds every text once"),
    ({"init_from": "runs/a"}, "init_from: --method probe reads the frozen base alone"),
    ({"stack_under": "runs/lang"}, "stack_under: --method probe does not stack"),
    ({"resume": True}, "resume: a probe run writes no checkpoints"),
    ({"patience": 2}, "patience: steers train()'s epoch loop, which --method probe does not run"),
    ({"options": {"r": 4}}, "options for probe: unknown option(s) r; use head, head_c, max_chunks"),
    ({"options": {"head": "svm"}}, "head: got 'svm'; use one of logistic, prototype"),
    ({"options": {"head": "prototype", "head_c": 2.0}}, "head_c: sets the logistic regression's"),
    ({"options": {"head_c": 0}}, "head_c: got 0; use a positive number"),
    ({"options": {"max_chunks": 0}}, "max_chunks: got 0; use a positive integer"),
    ({"options": {"max_chunks": 1.5}}, "max_chunks: got 1.5"),
])
def test_bad_configs_fail_before_anything_runs(tiny, tmp_path, change, message):
    args = {**probe_args(tiny, tmp_path / "out"), **change}
    with pytest.raises(ConfigError) as e:
        entry.check(RunConfig(**args))  # the recipe's checks: before data or a model is loaded
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_options_reach_frozen_fit(tiny, tmp_path):
    cfg = RunConfig(**probe_args(tiny, tmp_path / "o", max_length=64, options={"head_c": 0.5, "max_chunks": 2}))
    assert cr.probe_arguments(cfg, pooling="cls") == {"head": "logistic", "max_length": 64, "pooling": "cls",
                                                      "head_c": 0.5, "max_chunks": 2}
    defaults = RunConfig(**probe_args(tiny, tmp_path / "o", options={"head": "prototype"}))
    assert cr.probe_arguments(defaults, pooling=None) == {"head": "prototype", "max_length": 32, "pooling": None,
                                                          "head_c": 1.0, "max_chunks": 4}
    # a LoRA config (epochs, lr, batch_size set): what a probe run would not honour, in the order it is reported
    lora = RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "o", patience=3))
    assert fewshot_run.unused_settings(lora, "probe") == ["epochs", "lr", "batch_size", "patience"]
    assert fewshot_run.unused_settings(lora) == ["epochs", "patience"]  # contrastive's (the default, for --method auto)
