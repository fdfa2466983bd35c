"""train(): the run directory contract, reproducibility, head-only, early stopping, causal LM, images, every
method with a bf16 frozen base. Tiny models from tests/train_helpers.py; seconds in all."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from graftune import all_methods
from graftune.config import RunConfig, build_config
from graftune.errors import ConfigError, DataError
from graftune.evaluate import evaluate_run, generate, load_run, predict
from graftune.run.rundir import partial_dir
from graftune.runs import train
from tests.train_helpers import bert_folder, llama_folder, pairs_jsonl, topic_csv, train_args

RUN_FILES = {"adapter", "run.yaml", "metrics.json", "log.jsonl", "data_card.json"}
TIMING = ("train_seconds", "train_cpu_seconds", "wall_seconds", "peak_rss_mb")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"bert": bert_folder(root / "bert"), "llama": llama_folder(root / "llama"),
            "csv": topic_csv(root / "topics.csv"), "pairs": pairs_jsonl(root / "pairs.jsonl")}


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def test_run_directory_contract(tiny, tmp_path):
    out = tmp_path / "run"
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out)), progress=False)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert not partial_dir(out).exists()
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "trainable_params", "total_params",
                "train_seconds", "peak_rss_mb", "adapter_bytes"):
        assert key in m, key
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["adapter_bytes"] == (out / "adapter" / "adapter.safetensors").stat().st_size
    assert 0 < m["trainable_params"] < m["total_params"]
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and events.count("epoch") == 3
    card = json.loads((out / "data_card.json").read_text())
    assert set(card["splits"]) == {"train", "val", "test"}
    assert yaml.safe_load((out / "run.yaml").read_text())["method"] == "lora"


def test_run_yaml_reproduces_the_run(tiny, tmp_path):
    first = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "a", seed=3)), progress=False)
    again = train(build_config(tmp_path / "a" / "run.yaml", out=str(tmp_path / "b")), progress=False)
    assert _stable(first) == _stable(again)
    other_seed = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "c", seed=4)), progress=False)
    assert _stable(other_seed) != _stable(first)


def test_existing_out_needs_overwrite_and_errors_leave_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out)), progress=False)
    with pytest.raises(DataError, match="label column"):
        train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "bad", label_column="nope")),
              progress=False)
    assert not (tmp_path / "bad").exists() and not partial_dir(tmp_path / "bad").exists()
    train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, overwrite=True, epochs=1)), progress=False)
    assert (out / "metrics.json").exists()


def test_head_only_trains_only_the_head_and_loads_back(tiny, tmp_path):
    out = tmp_path / "head"
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, method="head", lr=0.05, epochs=5)),
              progress=False)
    assert m["trainable_params"] == 32 * 3 + 3
    run = load_run(out)
    assert not run.model.info  # no adapter grafted
    [row] = predict(run, ["goal match team"])
    assert set(row["probabilities"]) == {"money", "sport", "tech"}
    assert evaluate_run(out)["accuracy"] == pytest.approx(m["accuracy"])


def _epoch_losses(out) -> list[float]:
    return [e["train_loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if e["event"] == "epoch"]


def test_training_fits_the_training_data(tiny, tmp_path):
    out = tmp_path / "r"
    train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, lr=0.02, epochs=15, patience=0, val_size=0,
                                 dropout=0.0)), progress=False)
    losses = _epoch_losses(out)
    assert losses[-1] < 0.5 * losses[0]
    # a random tiny BERT generalizes poorly, but it must fit what it was trained on
    assert evaluate_run(out, data=str(tiny["csv"]))["accuracy"] > 0.8


def test_eval_and_predict_match_the_run(tiny, tmp_path):
    out = tmp_path / "run"
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out)), progress=False)
    again = evaluate_run(out)  # rebuilds the test split from run.yaml; LoRA is merged for inference
    assert again["accuracy"] == pytest.approx(m["accuracy"]) and again["examples"] == m["examples"]
    run = load_run(out)
    rows = predict(run, ["bank market share", "goal team"])
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    assert rows[0]["label"] in run.label_names
    with pytest.raises(DataError, match="classifier"):
        generate(run, ["hi"])


def test_early_stopping_restores_the_best_epoch(tiny, tmp_path):
    out = tmp_path / "run"
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, epochs=12, patience=2, lr=1e-4)),
              progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e["event"] == "epoch"]
    best = max(range(len(epochs)), key=lambda i: (epochs[i]["val"]["macro_f1"], -i))
    assert m["best_epoch"] == best + 1
    if m["epochs_run"] < 12:
        assert any(e["event"] == "early_stop" for e in log)
        assert m["epochs_run"] - m["best_epoch"] == 2


def test_grad_accumulation_matches_one_big_batch(tiny, tmp_path):
    common = train_args(tiny["bert"], tiny["csv"], tmp_path / "a", epochs=2, batch_size=8, dropout=0.0)
    whole = train(RunConfig(**common), progress=False)
    split = train(RunConfig(**{**common, "out": str(tmp_path / "b"), "grad_accum": 2}), progress=False)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4)


def test_causal_lm_run_and_generate(tiny, tmp_path):
    out = tmp_path / "lm"
    m = train(RunConfig(**train_args(tiny["llama"], tiny["pairs"], out, epochs=2, max_new_tokens=4)),
              progress=False)
    assert m["task"] == "causal-lm" and m["perplexity"] > 1 and "exact_match" in m
    run = load_run(out)
    [answer] = generate(run, ["goal match"], max_new_tokens=3)
    assert isinstance(answer, str)
    with pytest.raises(ConfigError, match="head"):
        train(RunConfig(**train_args(tiny["llama"], tiny["pairs"], tmp_path / "h", method="head")), progress=False)


def test_causal_lm_loss_goes_down(tiny, tmp_path):
    out = tmp_path / "lm"
    train(RunConfig(**train_args(tiny["llama"], tiny["pairs"], out, epochs=6, lr=1e-2, val_size=0,
                                 max_new_tokens=2)), progress=False)
    losses = _epoch_losses(out)
    assert losses[-1] < losses[0]


def test_image_classification_on_a_tiny_cnn(tmp_path, monkeypatch):
    from tests.train_helpers import image_folder, use_tiny_cnn

    image_folder(tmp_path / "imgs", n_per_class=10)
    use_tiny_cnn(monkeypatch)
    out = tmp_path / "img"
    m = train(RunConfig(model="tiny-cnn", data=str(tmp_path / "imgs"), method="lora", out=str(out), epochs=2,
                        batch_size=4, precision="fp32", val_size=0, test_size=0.3), progress=False)
    assert m["task"] == "image" and m["examples"] == 6
    bn = next(b for b in load_run(out).model.base.modules() if isinstance(b, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # frozen base: statistics unchanged
    from graftune.evaluate import read_image

    run = load_run(out)
    [row] = predict(run, [read_image(tmp_path / "imgs" / "dark" / "0.png")])
    assert set(row["probabilities"]) == {"dark", "light"}
    # the plain-text predict line names the image file given as an argument (it showed `arg 1  dark  0.996`)
    from typer.testing import CliRunner

    from graftune.cli import app

    image = str(tmp_path / "imgs" / "dark" / "0.png")
    result = CliRunner().invoke(app, ["predict", str(out), image])
    assert result.exit_code == 0, result.output
    line = result.stdout.rstrip("\n")
    assert line.startswith("arg 1\t") and line.endswith(f"  {image}"), line


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_every_method_trains_and_predicts_in_bf16(method, tiny, tmp_path):
    """The default CPU policy: a bf16 frozen base under bf16 autocast in training (batched-matmul attention), and a
    bf16 frozen base for inference (LoRA-like adapters merged into it): each method's adapter must cope with both,
    and the run must load back."""
    options = {"top_k_layers": 1} if method == "topk" else {}
    out = tmp_path / "r"
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, method=method, options=options,
                                     epochs=1, precision="bf16", val_size=0)), progress=False)
    assert m["precision"] == "bf16" and m["trainable_params"] > 0
    run = load_run(out)
    assert predict(run, ["goal team"])[0]["label"] in run.label_names


def test_mlflow_and_tensorboard_are_optional(tiny, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name in ("mlflow", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for tracker in ("mlflow", "tensorboard"):
        with pytest.raises(ConfigError, match=rf"--log-to {tracker} needs {tracker}: pip install 'graftune\[tracking\]'"):
            train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / tracker, log_to=tracker)),
                  progress=False)
        assert not (tmp_path / tracker).exists()


def test_log_to_mlflow_records_params_and_metrics(tiny, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # the `mlflow` extra, installed by `make test`
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "run", log_to="mlflow")), progress=False)
    assert mlflow.active_run() is None  # the run is closed with the training
    (logged,) = mlflow.tracking.MlflowClient(tracking_uri=uri).search_runs(["0"])
    assert logged.data.params["method"] == "lora"
    assert {"step/loss", "epoch/train_loss", "end/test_accuracy"} <= set(logged.data.metrics), logged.data.metrics


def test_log_to_tensorboard_writes_the_scalars(tiny, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    train(RunConfig(**train_args(tiny["bert"], tiny["csv"], out, log_to="tensorboard")), progress=False)
    (events,) = (out / "tensorboard").iterdir()
    reader = event_accumulator.EventAccumulator(str(events.parent))
    reader.Reload()
    assert {"step/loss", "epoch/train_loss", "end/test_accuracy"} <= set(reader.Tags()["scalars"])

@pytest.mark.parametrize("labels", [("sport", "money", "tech"), ("sport", "money")])
def test_probe_head_init_reproduces_the_logistic_regression(labels, tiny):
    from sklearn.linear_model import LogisticRegression

    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.recipes.adapter import init_head_from_probe
    from graftune.run.scoring import features_of
    from graftune.speed import precision
    from graftune.tasks import build_task
    from graftune.zoo import load_base

    ds = load_data(str(tiny["csv"]))
    ds = ds.subset([i for i, y in enumerate(ds.labels) if y in labels])
    ds.label_names = sorted(labels)
    base = load_base(str(tiny["bert"]))
    task = build_task("classification", base, label_names=ds.label_names)
    model, head = AdapterModel(base.model), task.build_head().eval()
    init_head_from_probe(task, model, head, ds, policy=precision.choose("fp32"))
    x = features_of(task, model, ds.inputs)
    y = [ds.label_names.index(v) for v in ds.labels]
    expected = LogisticRegression(max_iter=2000, random_state=0).fit(x.numpy(), y).predict_proba(x.numpy())
    got = torch.softmax(head(x.clone()), -1).detach().numpy()
    assert abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("method", ["lora", "probe", "contrastive"])
def test_max_length_beyond_the_models_positions_is_refused_before_training(tiny, tmp_path, method):
    # the tiny BERT has 64 positions; a longer max_length would fail on the first text that long (maybe in predict)
    args = train_args(tiny["bert"], tiny["csv"], tmp_path / "run", method=method, max_length=65)
    if method != "lora":
        del args["epochs"], args["lr"], args["batch_size"]  # the loop's settings: refused for these recipes
    cfg = RunConfig(**args)
    with pytest.raises(ConfigError, match="max_length: got 65, but .* reads at most 64 tokens"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "probe"])
def test_a_test_file_of_one_class_is_scored(tiny, tmp_path, method):
    # QA: train refused it ("only 1 class ... needs at least 2 classes"), while eval --data scores such a file
    rows = tiny["csv"].read_text().splitlines()
    one = tmp_path / "sport.csv"
    one.write_text("\n".join([rows[0], *[r for r in rows[1:] if r.endswith(",sport")][:5]]) + "\n")
    args = train_args(tiny["bert"], tiny["csv"], tmp_path / "run", method=method, test=str(one))
    if method != "lora":
        del args["epochs"], args["lr"], args["batch_size"]
    m = train(RunConfig(**args), progress=False)
    assert m["examples"] == 5 and 0.0 <= m["accuracy"] <= 1.0
