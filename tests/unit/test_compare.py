"""The comparison harness (strategies/compare.py) and its report, on a tiny random BERT and a synthetic 3-topic csv:
identical splits for every strategy, budget skipping, the results.json schema, the report's parts, --method auto.
Adapter strategies run through a fake train() that records the splits it was given (the real one is covered by
test_train_loop.py); the frozen-encoder strategies run for real on the tiny model."""

from __future__ import annotations

import itertools
import json
import re
import time

import numpy as np
import pytest

from graftune.data.card import fingerprint
from graftune.errors import ConfigError, DataError
from graftune.strategies import auto, catalog, compare
from graftune.strategies.auto import choose_method
from graftune.strategies.compare import run_compare
from graftune.strategies.summary import augmentation_effect, recommend, summarize
from tests.train_helpers import bert_folder, scripted_predictions, topic_csv, train_args

ROW_KEYS = {"strategy", "shots", "seed", "augment", "accuracy", "macro_f1", "trainable_params", "train_seconds",
            "peak_rss_mb", "test_fingerprint", "train_fingerprint"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compare")
    return {"bert": str(bert_folder(root / "bert")), "csv": str(topic_csv(root / "topics.csv", n_per_class=24))}


class FakeTrain:
    """Stands in for graftune.train.train: records the splits and config; accuracy grows with the method's cost."""

    def __init__(self, seconds: float = 0.0):
        self.calls = []
        self.seconds = seconds

    def __call__(self, cfg, *, progress=True, splits=None):
        self.calls.append((cfg, splits))
        time.sleep(self.seconds)
        acc = {"lora": 0.9, "full": 0.95}.get(cfg.method, 0.8) - 0.01 * cfg.seed
        return {"accuracy": acc, "macro_f1": acc - 0.01, "trainable_params": 1000 if cfg.method != "full" else 10**6,
                "train_seconds": self.seconds,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, acc)}


def test_identical_splits_schema_and_report(tiny, tmp_path):
    fake = FakeTrain()
    out = tmp_path / "cmp"
    rows = run_compare(tiny["bert"], tiny["csv"], shots=(2, 4), seeds=2,
                       strategies=["linear-probe", "prototypes", "lora", "full"], augment=(False, True),
                       out_dir=out, train_fn=fake, settings={"max_length": 32}, progress=False)
    assert len(rows) == 2 * 2 * 2 * 4
    done = [r for r in rows if "accuracy" in r]
    assert len(done) == len(rows), [r for r in rows if "accuracy" not in r]
    for r in done:
        assert ROW_KEYS <= set(r)
        assert 0 <= r["accuracy"] <= 1
    # one test set for everything; one training set per (shots, seed, augment), shared by every strategy
    assert len({r["test_fingerprint"] for r in rows}) == 1
    for key in {(r["shots"], r["seed"], r["augment"]) for r in rows}:
        same = {r["train_fingerprint"] for r in rows if (r["shots"], r["seed"], r["augment"]) == key}
        assert len(same) == 1
    # train() got exactly those splits; augmented runs add examples, the test set is never augmented
    for cfg, splits in fake.calls:
        assert fingerprint(splits.test) == rows[0]["test_fingerprint"]
        factor = 1 + catalog.AUGMENT_COPIES if any(r["augment"] and r["train_examples"] == len(splits.train)
                                                   for r in rows) else 1
        assert len(splits.train) == cfg.shots * 3 * factor
    # shots of seed 0 and seed 1 differ; 2 shots nest in 4 for one seed (same seeded order)
    plain = {(r["shots"], r["seed"]): r["shots_fingerprint"] for r in rows}
    assert plain[(2, 0)] != plain[(2, 1)]

    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["test_fingerprint"] == rows[0]["test_fingerprint"]
    page = (out / "report.html").read_text()
    for part in ('id="summary"', 'id="plot-shots"', 'id="plot-params"', 'id="plot-time"', "<svg", "Recommendation",
                 "examples per class", 'id="augmentation"'):
        assert part in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert not list(out.glob(".*.tmp")) and not list(out.glob("compare-*"))


def test_results_and_report_state_the_settings_really_used(tiny, tmp_path):
    """--set epochs=2 is what results.json and the report say (not the default 10), per strategy with its own
    learning rate; every setting recorded for a train strategy is the one its runs got; augmentation is described
    only when augmented runs exist."""
    fake = FakeTrain()
    out = tmp_path / "cmp"
    run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=1, strategies=["prototypes", "lora", "ia3"],
                augment=(False,), out_dir=out, train_fn=fake, settings={"max_length": 32, "epochs": 2},
                progress=False)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["user_settings"] == {"max_length": 32, "epochs": 2}
    assert meta["settings"]["lora"]["epochs"] == 2 and meta["settings"]["ia3"]["epochs"] == 2
    assert meta["settings"]["lora"]["lr"] == catalog.TRAIN_DEFAULTS["lr"]
    assert meta["settings"]["ia3"]["lr"] == catalog.STRATEGIES["ia3"].settings["lr"] != catalog.TRAIN_DEFAULTS["lr"]
    assert meta["settings"]["prototypes"] == {"max_length": 32}
    by_method = {cfg.method: cfg for cfg, _ in fake.calls}
    for name in ("lora", "ia3"):
        for key, value in meta["settings"][name].items():
            assert getattr(by_method[name], key) == value, (name, key)
    page = (out / "report.html").read_text()
    note = page[page.index("How this was measured"):]
    assert "epochs=2" in note and "epochs=10" not in note
    assert "ia3 with lr=0.01" in note and "lr=0.002" in note and "Given with <code>--set</code>: max_length=32, epochs=2" in note
    assert "Augmentation added" not in page and "No run used augmentation" in note
    assert meta["augment"] == [False] and meta["augment_copies"] == 0

    both = tmp_path / "both"
    run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=1, strategies=["prototypes"], augment=(False, True),
                out_dir=both, train_fn=fake, settings={"max_length": 32}, progress=False)
    page = (both / "report.html").read_text()
    assert f"Augmentation added {catalog.AUGMENT_COPIES} new examples per training example" in page


def test_budget_skips_runs_that_would_not_fit(tiny, tmp_path):
    fake = FakeTrain(seconds=0.6)
    rows = run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=3, strategies=["lora"], augment=(False,),
                       budget_s=1.0, out_dir=tmp_path / "b", train_fn=fake, progress=False)
    assert "accuracy" in rows[0]  # the first run is the measurement
    skipped = [r for r in rows if "skipped" in r]
    assert skipped and skipped[0]["skipped"].startswith("would exceed budget (est. ")
    assert "left" in skipped[0]["skipped"]
    assert "exceeded the time budget" in (tmp_path / "b" / "report.html").read_text()


def test_estimates_come_from_runs_done_so_far():
    # fixed + per-example cost; from another adapter strategy, the per-example part scales by the cost factor
    spent = {"lora": [(3.0, 0.5)], "linear-probe": [(0.0, 0.01)]}
    assert compare._estimate(catalog.STRATEGIES["full"], 10, spent) == pytest.approx(3.0 + 0.5 * 2.5 * 10)
    assert compare._estimate(catalog.STRATEGIES["lora"], 4, spent) == pytest.approx(5.0)
    assert compare._estimate(catalog.STRATEGIES["prototypes"], 4, {"linear-probe": [(0.0, 0.01)]}) is None
    assert compare._estimate(catalog.STRATEGIES["lora"], 4, {}) is None


def test_a_comparison_that_fails_midway_leaves_nothing_and_keeps_the_earlier_one(tiny, tmp_path):
    """The folder is assembled aside and renamed into place at the end: a comparison interrupted after some runs
    (Ctrl-C in the second run here) leaves no folder, no scratch run and no parent folder it created; with
    --overwrite, the earlier comparison is still there, unchanged."""
    class Interrupted(FakeTrain):
        def __call__(self, cfg, *, progress=True, splits=None):
            if self.calls:
                raise KeyboardInterrupt
            return super().__call__(cfg, progress=progress, splits=splits)

    common = {"shots": (2,), "seeds": 2, "strategies": ["lora"], "augment": (False,), "progress": False,
              "settings": {"max_length": 32}}
    out = tmp_path / "new" / "deeper" / "cmp"
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny["bert"], tiny["csv"], out_dir=out, train_fn=Interrupted(), **common)
    assert list(tmp_path.iterdir()) == []
    done = tmp_path / "done"
    run_compare(tiny["bert"], tiny["csv"], out_dir=done, train_fn=FakeTrain(), **common)
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    assert set(before) == {"results.json", "report.html"}
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny["bert"], tiny["csv"], out_dir=done, train_fn=Interrupted(), overwrite=True, **common)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["done"]


def test_bad_budget_and_bad_data_leave_no_folder(tiny, tmp_path):
    out = tmp_path / "cmp"
    for budget in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--budget .*: use a positive number of seconds"):
            run_compare(tiny["bert"], tiny["csv"], shots=(2,), budget_s=budget, out_dir=out)
    with pytest.raises(DataError, match="fewer than shots=8"):  # the splits are made before the folder
        run_compare(tiny["bert"], tiny["csv"], shots=(2, 8), test_per_class=20, out_dir=out)
    assert list(tmp_path.iterdir()) == []


def test_unknown_strategy_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="strategies: unknown nope"):
        run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=1, strategies=["nope"], out_dir=tmp_path)


def _s(name, k, acc, std, sec, params, aug=False, runs=3, test_examples=300):
    return {"strategy": name, "augment": aug, "shots": k, "runs": runs, "accuracy": acc, "accuracy_std": std,
            "macro_f1": acc, "macro_f1_std": std, "train_seconds": sec, "trainable_params": params, "peak_rss_mb": 1,
            "test_examples": test_examples}


def test_recommendation_prefers_the_cheap_baseline_within_a_point():
    text = recommend([_s("linear-probe", 8, 0.92, 0.02, 1, 3000), _s("lora", 8, 0.93, 0.01, 120, 80000)])[0]
    assert text.startswith("With 8 examples per class, linear-probe (0.920 +- 0.020, 1 s")
    assert ("within 1 point (on 300 test examples: one point is 3 examples) of the best, lora (0.930 +- 0.010, 120 s"
            in text), text
    assert "not needed" in text and "at 120x less training time" in text
    assert "The gap of 1.0 points (3 of 300 test examples) is within one standard deviation over 3 seeds" in text
    assert "single seed" not in text
    # about the same time: the saving is named in parameters, not as "1x less training time"
    same = recommend([_s("prototypes", 8, 0.92, 0.01, 1, 0), _s("linear-probe", 8, 0.925, 0.01, 1.2, 1925)])[0]
    assert "at about the same training time with fewer trained parameters (0 vs 1,925)" in same, same
    # timing noise does not decide: 2.4 s vs 2.6 s is the same cost, so the one with no trained parameters wins
    noisy = recommend([_s("linear-probe", 8, 0.943, 0.01, 2.4, 1925), _s("prototypes", 8, 0.934, 0.01, 2.6, 0)])[0]
    assert noisy.startswith("With 8 examples per class, prototypes (0.934"), noisy
    one = recommend([_s("linear-probe", 1, 0.80, 0.01, 1, 3000), _s("lora", 1, 0.93, 0.01, 120, 80000)])[0]
    assert one.startswith("With 1 example per class, "), one  # it said "1 examples"
    clear = recommend([_s("linear-probe", 8, 0.80, 0.01, 1, 3000), _s("lora", 8, 0.93, 0.01, 120, 80000)])[0]
    assert "lora (0.930" in clear and "most accurate" in clear and "13.0 points (39 of 300 test examples) ahead" in clear


def test_every_gap_names_the_test_set_size_and_a_single_seed():
    """A point of accuracy is a few test examples (or one example several points): each gap says how many, and a
    claim resting on one seed says so in the sentence itself."""
    one = recommend([_s("linear-probe", 8, 0.92, 0.0, 1, 3000, runs=1, test_examples=60),
                     _s("lora", 8, 0.925, 0.0, 120, 80000, runs=1, test_examples=60)])[0]
    assert ("linear-probe (0.920, 1 seed, 1 s, 3,000 trained parameters) is within 1 point (on 60 test examples: one "
            "example is 1.7 points) of the best, lora (0.925, 1 seed, 120 s, 80,000 trained parameters), at 120x less "
            "training time, on a single seed: more training is not needed here.") in one, one
    assert "within one standard deviation" not in one  # no spread on one seed: not claimed
    mixed = recommend([_s("linear-probe", 8, 0.80, 0.01, 1, 3000, runs=1), _s("lora", 8, 0.93, 0.01, 120, 80000)])
    assert ("13.0 points (39 of 300 test examples) ahead of linear-probe (0.800, 1 seed, 1 s, 3,000 trained "
            "parameters), on a single seed for linear-probe.") in mixed[0], mixed
    for text in one, mixed[0]:  # both ran on one seed in `one`: "One of these ran on a single seed only" read wrong
        assert text.endswith(" A single seed has no spread to judge a gap by: treat small gaps as noise."), text
        assert "One of these" not in text
    assert "on 100 test examples: one point is one example" in recommend(
        [_s("lora", 8, 0.92, 0.0, 1, 1, test_examples=100), _s("prototypes", 8, 0.915, 0.0, 1, 0, test_examples=100)])[0]
    # the augmentation table gives no verdict on one seed (no spread to judge it by)
    from graftune.strategies import report

    effects = augmentation_effect([_s("lora", 8, 0.92, 0.0, 1, 1, runs=1), _s("lora", 8, 0.95, 0.0, 1, 1, aug=True,
                                                                              runs=1)])
    table = report._augmentation(effects, 300)
    assert "a single seed: spread unknown" in table and "helps" not in table
    three = augmentation_effect([_s("lora", 8, 0.92, 0.01, 1, 1), _s("lora", 8, 0.95, 0.01, 1, 1, aug=True)])
    assert "helps" in report._augmentation(three, 300)
    # no size known (rows from an older results.json): no made-up count
    old = recommend([_s("lora", 8, 0.93, 0.01, 1, 1, test_examples=None), _s("ia3", 8, 0.5, 0.01, 1, 1)])[0]
    assert "43.0 points (129 of 300 test examples) ahead" in old
    assert "43.0 points ahead" in recommend([_s("lora", 8, 0.93, 0.01, 1, 1, test_examples=None),
                                             _s("ia3", 8, 0.5, 0.01, 1, 1, test_examples=None)])[0]


def test_summarize_means_and_stds():
    rows = [{"strategy": "lora", "augment": False, "shots": 8, "seed": s, "accuracy": a, "macro_f1": a,
             "train_seconds": 2.0, "trainable_params": 10, "peak_rss_mb": 5} for s, a in enumerate((0.8, 0.9))]
    rows.append({"strategy": "full", "augment": False, "shots": 8, "seed": 0, "skipped": "would exceed budget"})
    (s,) = summarize(rows)
    assert s["accuracy"] == pytest.approx(0.85) and s["accuracy_std"] == pytest.approx(0.0707, abs=1e-3)
    assert s["runs"] == 2 and s["test_examples"] is None  # rows without the size: unknown, not 0
    rows = [{**r, "test_examples": 90} for r in rows]
    assert summarize(rows)[0]["test_examples"] == 90


def test_choose_method_never_sees_the_test_set(tiny, monkeypatch):
    fake = FakeTrain()
    real_contrastive = catalog.run_contrastive

    def contrastive(strategy, model, splits, seed, settings):  # the real candidate, its splits recorded
        fake.calls.append((None, splits))
        return real_contrastive(strategy, model, splits, seed, settings)

    monkeypatch.setattr(auto, "run_contrastive", contrastive)
    method, reason = choose_method(tiny["bert"], tiny["csv"], budget_s=60, shots=8, seed=0, max_length=32,
                                   train_fn=fake)
    assert method in ("probe", "prototypes", "lora", "contrastive")
    assert "cross-validation on the 24 training examples" in reason and "test set untouched" in reason
    assert "contrastive " in reason and any(c is None for c, _ in fake.calls)  # it ran, on the same folds
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits

    ds = load_data(tiny["csv"])
    real = make_splits(ds, seed=0, val_size=0, shots=8)
    train_texts = set(real.train.inputs)
    for _, splits in fake.calls:
        seen = set(splits.train.inputs) | set(splits.test.inputs)
        assert seen <= train_texts  # the inner "test" is the carved validation part of the training examples
        assert not set(splits.train.inputs) & set(splits.test.inputs)


def test_images_run_with_image_augmentation_and_skip_text_only_strategies(tmp_path, monkeypatch):
    import torch

    from tests.train_helpers import image_folder, use_tiny_cnn

    image_folder(tmp_path / "imgs", n_per_class=8)
    use_tiny_cnn(monkeypatch)
    fake = FakeTrain()
    rows = run_compare("tiny-cnn", str(tmp_path / "imgs"), shots=(2,), seeds=1,
                       strategies=["linear-probe", "prototypes", "contrastive", "lora"], out_dir=tmp_path / "c",
                       train_fn=fake, progress=False)
    by = {(r["strategy"], r["augment"]): r for r in rows}
    assert by[("contrastive", False)]["skipped"].startswith("not applicable: text only")
    assert "accuracy" in by[("linear-probe", True)] and "accuracy" in by[("prototypes", False)]
    assert by[("linear-probe", True)]["train_examples"] == 2 * 2 * (1 + catalog.AUGMENT_COPIES)
    augmented = next(s for c, s in fake.calls if len(s.train) > 4)
    assert all(torch.is_tensor(x) and x.shape == augmented.train.inputs[0].shape for x in augmented.train.inputs)


def test_real_train_runs_end_to_end_on_the_tiny_model(tiny, tmp_path):
    rows = run_compare(tiny["bert"], tiny["csv"], shots=(4,), seeds=1, strategies=["ia3", "prefix"],
                       augment=(False,), out_dir=tmp_path / "r", settings={"max_length": 32, "epochs": 1},
                       progress=False)
    assert [r["strategy"] for r in rows] == ["ia3", "prefix"]
    assert all("accuracy" in r and r["trainable_params"] > 0 for r in rows), rows


def test_the_adapter_loop_hands_back_its_test_predictions_without_writing_them(tiny, tmp_path):
    """auto pairs candidates example by example on the adapter loop's own test predictions: returned in order (they
    reproduce the accuracy), kept out of metrics.json and out of what `graftune train` returns."""
    from graftune.config import RunConfig
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.recipes import adapter
    from graftune.runs import train

    cfg = RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "r", epochs=1, max_length=32))
    splits = make_splits(load_data(tiny["csv"]), seed=0, val_size=0, shots=4)
    metrics = adapter.train(cfg, progress=False, splits=splits)
    assert len(metrics["predicted"]) == len(splits.test)
    right = [p == y for p, y in zip(metrics["predicted"], splits.test.labels)]
    assert sum(right) / len(right) == pytest.approx(metrics["accuracy"])
    assert "predicted" not in json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "predicted" not in train(cfg.replace(out=str(tmp_path / "r2")), progress=False, splits=splits)


def test_lora_top2_trains_the_top_layers_from_the_cache(tmp_path):
    """The lora-top2 strategy really is LoRA in the top 2 layers with the frozen-prefix cache on (a 4-layer model,
    so the two differ), and it trains fewer parameters than lora."""
    from graftune.runs import train

    notes = {}

    def recording(cfg, **kw):
        metrics = train(cfg, **kw)
        notes[cfg.options.get("top_k_layers")] = metrics["speed"]["cache"]
        return metrics

    bert = bert_folder(tmp_path / "bert4", layers=4)
    rows = run_compare(str(bert), topic_csv(tmp_path / "t.csv", n_per_class=12), shots=(4,), seeds=1,
                       strategies=["lora", "lora-top2"], augment=(False,), out_dir=tmp_path / "r",
                       settings={"max_length": 32, "epochs": 1}, progress=False, train_fn=recording)
    by = {r["strategy"]: r for r in rows}
    assert by["lora-top2"]["trainable_params"] < by["lora"]["trainable_params"]
    assert notes[2].startswith("on: layers 2..3 run per step"), notes
    assert notes[None].startswith("off"), notes


def test_feature_baselines_read_whole_texts_and_auto_reads_what_head_training_reads(tiny):
    """compare's linear-probe/prototypes embed a text as fewshot.frozen_fit does (windows over a long text), while
    --method auto's head candidate keeps the truncated pooled features that `train --method head` learns from."""
    from graftune.data.sources import load_data
    from graftune.recipes.fewshot import embed
    from graftune.run.scoring import features_of
    from tests.train_helpers import WORDS

    ds = load_data(tiny["csv"])
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(3 * 16))  # about 3 windows of 16 tokens
    texts = [long_text, ds.inputs[0]]
    whole = catalog.Frozen(tiny["bert"], ds, 16)
    cut = catalog.Frozen(tiny["bert"], ds, 16, windows=False)
    got = whole.features(texts)
    with whole.policy.autocast():
        expected = embed(whole.model, whole.task.tokenizer, texts, max_length=16, pooling=whole.task.pooling).numpy()
    assert got == pytest.approx(expected, abs=1e-6)
    truncated = features_of(cut.task, cut.model, texts, policy=cut.policy).numpy()
    assert cut.features(texts) == pytest.approx(truncated, abs=1e-6)
    unit = truncated[0] / np.linalg.norm(truncated[0])
    assert np.abs(got[0] - unit).max() > 1e-3  # the windows changed the long text's embedding


class Folds:
    """A scripted head fit (the frozen candidates' evidence): on each fold in turn, right on the share ``rates[i]``
    of the held-out examples, from position ``shift`` on."""

    def __init__(self, rates, params=99, shift=0):
        self.rates, self.params, self.shift, self.calls = list(rates), params, shift, 0

    def __call__(self, x, labels, fit, val, label_names, head):
        rate = self.rates[self.calls % len(self.rates)]
        self.calls += 1
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 0 if head == "prototype" else self.params,
                "seconds": 0.0, "predicted": scripted_predictions(list(labels[val]), label_names, rate,
                                                                  shift=self.shift)}


class Slow(FakeTrain):  # LoRA right on the share `rate` of each fold (from `shift` on), slower than the features
    def __init__(self, rate=0.8, shift=1):
        super().__init__()
        self.rate, self.shift = rate, shift

    def __call__(self, cfg, *, progress=True, splits=None):
        time.sleep(0.2)
        self.calls.append((cfg, splits))
        rate = self.rate if cfg.method == "lora" else 0.0
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 100_000, "train_seconds": 0.2,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate, shift=self.shift)}


def _contrastive(rate, calls=None):
    """A scripted contrastive candidate: right on the share ``rate`` of its held-out examples."""
    def run(strategy, model, splits, seed, settings):
        if calls is not None:
            calls.append(1)
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 50_000, "train_seconds": 0.0,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate)}
    return run


def test_auto_treats_gaps_within_the_noise_as_ties(tiny, monkeypatch):
    """Two candidates right on as many held-out examples, but not the same ones, are tied, and the tie goes to the
    candidate earlier in auto.PREFERENCE; a clear gap, paired example by example, picks the better one. A trained
    candidate far behind stops after its first fold (successive halving), and the test set is never read."""
    monkeypatch.setattr(auto, "run_contrastive", _contrastive(0.0))
    monkeypatch.setattr(auto, "fit_head", Folds([0.8]))  # the probe: right on 4 of 5 per fold; LoRA as often
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32,
                            train_fn=Slow(0.8, shift=1), candidates=("head", "lora", "contrastive"))
    assert record["folds"] == 5 and record["held_out_per_fold"] == 5
    assert record["candidates"]["probe"]["folds"] == 5 == record["candidates"]["lora"]["folds"]
    assert record["candidates"]["probe"]["held_out"] == 24 == record["candidates"]["lora"]["held_out"]
    assert record["candidates"]["contrastive"]["folds"] == 1  # halved away after the first fold
    assert record["candidates"]["probe"]["accuracy"] == record["candidates"]["lora"]["accuracy"]
    assert record["method"] == "probe", record["reason"]
    assert "ties go to probe" in record["reason"] and "the test set untouched" in record["reason"]
    monkeypatch.setattr(auto, "fit_head", Folds([0.4]))
    clear = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32,
                           train_fn=Slow(1.0), candidates=("head", "lora"))
    assert clear["method"] == "lora" and "lora scored best" in clear["reason"]


def test_a_rare_class_does_not_cut_every_candidate_to_two_folds(tmp_path, tiny, monkeypatch, recwarn):
    """One class of 2 training examples among classes of 8: 5 folds as the others fill (the rare class held out in
    2 of them), every example held out exactly once; before, k was the smallest class's size, 2, and every candidate
    trained on half the examples."""
    from tests.train_helpers import topic_rows, write_csv

    rows = [r for r in topic_rows(8) if r["label"] != "tech"] + [r for r in topic_rows(8) if r["label"] == "tech"][:2]
    data = write_csv(tmp_path / "rare.csv", rows)
    test = write_csv(tmp_path / "test.csv", topic_rows(4, seed=9))
    monkeypatch.setattr(auto, "fit_head", Folds([0.8]))
    record = auto.auto_pick(tiny["bert"], str(data), budget_s=900, max_length=32, test=str(test),
                            candidates=("head", "lora"), train_fn=Slow(0.8))
    assert record["folds"] == 5 and record["training_examples"] == 18
    assert record["candidates"]["probe"]["held_out"] == 18  # every training example held out once
    assert not [w for w in recwarn if "least populated class" in str(w.message)]


def test_one_fold_against_five_is_judged_on_the_examples_both_predicted(tiny, monkeypatch):
    """LoRA gets one fold (the budget's way) and is right on all its 5 examples, where the probe is right on 1:
    on those 5 shared examples the lead is far beyond the noise."""
    monkeypatch.setattr(auto, "fit_head", Folds([0.2]))
    monkeypatch.setattr(auto, "RUNGS", (1,))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32, train_fn=Slow(1.0),
                            candidates=("head", "lora"))
    assert record["candidates"]["lora"]["folds"] == 1 and record["candidates"]["lora"]["held_out"] == 5
    assert record["method"] == "lora", record["reason"]


def _fake_rows():
    """Rows as a real comparison writes them: long strategy names, augmented variants, means + std above 1.0,
    a strategy with no trained parameters and sub-second training."""
    rows = []
    base = {"linear-probe": (0.80, 0.4, 1925), "prototypes": (0.78, 0.2, 0), "contrastive": (0.93, 300, 150000),
            "lora-top2": (0.85, 40, 80000)}
    for k in (8, 16, 64):
        for seed in range(3):
            for aug in (False, True):
                for i, (name, (acc, sec, params)) in enumerate(base.items()):
                    a = min(1.0, acc + 0.02 * k.bit_length() + 0.03 * ((seed * 7 + i) % 3 - 1))
                    rows.append({"strategy": name, "shots": k, "seed": seed, "augment": aug, "test_examples": 500,
                                 "accuracy": a, "macro_f1": a, "trainable_params": params,
                                 "train_seconds": sec * k / 8 * (5 if aug else 1), "peak_rss_mb": 900})
    return rows


def _text_width(text: str, size: float) -> float:
    """The rendered width of ``text`` in the browser's sans-serif (DejaVu Sans where installed), measured."""
    from PIL import ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        font = ImageFont.load_default(size=size)
    return font.getlength(text)


def test_report_plots_have_even_ticks_and_nothing_clipped():
    """Parse every plot of a report: accuracy ticks evenly spaced in a round step within [0, 1], log ticks at
    consecutive powers of 10, shot ticks at the shot counts; every marker, error bar and line inside the plot
    area; every legend label (measured in a real font) inside the svg and clear of the next column."""
    import xml.etree.ElementTree as ET

    from graftune.strategies import report

    rows = _fake_rows()
    page = report.render_report(rows, {"model": "m", "data": "d", "test_examples": 500, "settings": {}})
    svgs = [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, flags=re.DOTALL)]
    assert len(svgs) == 3
    ns = "{http://www.w3.org/2000/svg}"
    for i, svg in enumerate(svgs):
        width, height = float(svg.get("width")), float(svg.get("height"))
        area = svg.find(f"{ns}rect[@class='plot-area']")
        x0, y0 = float(area.get("x")), float(area.get("y"))
        x1, y1 = x0 + float(area.get("width")), y0 + float(area.get("height"))

        def inside(x, y, r=0.0, box=(x0, y0, x1, y1)):
            return box[0] <= x - r and x + r <= box[2] and box[1] <= y - r and y + r <= box[3]

        yticks = [float(t.text) for t in svg.iter(f"{ns}text") if t.get("class") == "ytick"]
        steps = {round(b - a, 6) for a, b in itertools.pairwise(yticks)}
        assert len(yticks) >= 2 and len(steps) == 1 and steps.pop() in report.ACCURACY_STEPS, yticks
        assert all(0 <= v <= 1 for v in yticks)
        xticks = [t for t in svg.iter(f"{ns}text") if t.get("class") == "xtick"]
        if i == 0:  # shots: one tick per shot count
            assert [t.text for t in xticks] == ["8", "16", "64"]
        else:  # log axes: powers of 10, one decade apart
            exps = [float(t.get("data-value")) for t in xticks]
            assert len(exps) >= 2 and all(b - a == 1 for a, b in itertools.pairwise(exps)) and exps == [
                round(e) for e in exps], exps
        for t in xticks:
            assert x0 - 1 <= float(t.get("x")) <= x1 + 1
        # the markers and error bars of the data (the legend's markers sit below the plot area)
        legend = {id(c) for g in svg.iter(f"{ns}g") for c in g.iter()}
        circles = [c for c in svg.iter(f"{ns}circle") if id(c) not in legend]
        assert len(circles) == len({(r["strategy"], r["shots"], r["augment"]) for r in rows})
        for c in circles:
            assert inside(float(c.get("cx")), float(c.get("cy")), float(c.get("r"))), c.attrib
        bars = [line for line in svg.iter(f"{ns}line") if line.get("class") == "errorbar"]
        assert len(bars) == len(circles)
        for b in bars:
            assert inside(float(b.get("x1")), float(b.get("y1"))) and inside(float(b.get("x2")), float(b.get("y2")))
        for poly in svg.iter(f"{ns}polyline"):
            for pt in poly.get("points").split():
                assert inside(*map(float, pt.split(",")))
        labels = [g.find(f"{ns}text") for g in svg.iter(f"{ns}g") if g.get("class") == "legend"]
        assert {t.text for t in labels} == {f"{n}{' + aug' if a else ''}" for n in
                                            ("linear-probe", "prototypes", "contrastive", "lora-top2")
                                            for a in (False, True)}
        size = float(svg.get("font-size"))
        for t in labels:
            end = float(t.get("x")) + _text_width(t.text, size)
            assert end <= width and float(t.get("y")) <= height, (t.text, end, width)
            right = [float(o.get("x")) for o in labels if o.get("y") == t.get("y") and float(o.get("x")) >
                     float(t.get("x"))]
            assert not right or end < min(right) - 20, (t.text, end, right)  # 20: the next swatch


def test_axes_hold_extreme_values():
    """One point, a perfect score, zero accuracy: the axis still has round ticks and holds the marker."""
    from graftune.strategies.report import _x_axis, accuracy_axis

    for lows, highs in (([1.0], [1.0]), ([0.0], [0.0]), ([0.42], [0.43]), ([0.2], [1.05])):
        lo, hi, ticks = accuracy_axis(lows, highs)
        assert lo < min(lows) and hi > max(highs) and len(ticks) >= 2, (lows, ticks)
    lo, hi, ticks = _x_axis([3.0], "trainable_params", [1000])
    assert lo < 3.0 < hi and len(ticks) >= 2


def _evidence(truth: np.ndarray, right: np.ndarray, method: str, params: int = 1_000) -> dict:
    """A candidate's summary as auto.summarize_runs makes it: right where ``right`` is true (else the next class),
    every example held out once."""
    pred = np.where(right, truth, (truth + 1) % 2)
    names = ["a", "b"]
    runs = [{"val": np.arange(len(truth)), "predicted": [names[i] for i in pred], "trainable_params": params}]
    return auto.summarize_runs(method, runs, 0.0, truth, names)


TRUTH = np.arange(100) % 2  # 100 held-out examples of two classes


def test_a_tie_goes_to_the_contrastive_recipe_even_behind():
    """Across the built-in data sets the contrastive recipe was the most accurate (auto.PREFERENCE): 2 examples in
    100 behind the probe, but right and wrong on other examples (10 go one way, 8 the other), it keeps the pick;
    wrong on 10 of the probe's right ones and right on no other, it does not."""
    probe = np.arange(100) < 60
    swing = (np.arange(100) >= 10) & (np.arange(100) < 68)  # loses 0-9, wins 60-67: 58 right
    pick, best, close = auto.decide({"probe": _evidence(TRUTH, probe, "probe"),
                                     "contrastive": _evidence(TRUTH, swing, "contrastive")}, TRUTH)
    assert best["method"] == "probe" and pick["method"] == "contrastive" and len(close) == 2
    steady = probe & (np.arange(100) >= 10)  # 50 right, all of them also right for the probe
    pick, _, close = auto.decide({"probe": _evidence(TRUTH, probe, "probe"),
                                  "contrastive": _evidence(TRUTH, steady, "contrastive")}, TRUTH)
    assert pick["method"] == "probe" and [c["method"] for c in close] == ["probe"]


def test_a_gap_steady_on_the_same_examples_is_no_tie():
    """LoRA is right on every example the probe gets right and on 10 more: paired example by example, a 10-point
    lead is far beyond its noise (unpaired, two accuracies of 0.6 and 0.7 on 100 examples each would be within
    about 7 points of each other by chance). The same 2-point lead made of 12 examples won and 10 lost is a tie."""
    probe = np.arange(100) < 60
    pick, _, close = auto.decide({"probe": _evidence(TRUTH, probe, "probe"),
                                  "lora": _evidence(TRUTH, np.arange(100) < 70, "lora")}, TRUTH)
    assert pick["method"] == "lora" and [c["method"] for c in close] == ["lora"]
    noisy = (np.arange(100) >= 10) & (np.arange(100) < 72)
    pick, _, close = auto.decide({"probe": _evidence(TRUTH, probe, "probe"),
                                  "lora": _evidence(TRUTH, noisy, "lora")}, TRUTH)
    assert pick["method"] == "probe" and len(close) == 2


def test_an_exact_tie_goes_to_the_logistic_probe_not_the_class_means():
    same = np.arange(100) < 75
    pick, _, _ = auto.decide({"prototypes": _evidence(TRUTH, same, "prototypes", 0),
                              "probe": _evidence(TRUTH, same, "probe", 770)}, TRUTH)
    assert pick["method"] == "probe"


def test_macro_f1_in_numpy_is_classification_metrics_own():
    """auto's batched macro-F1 (for the bootstrap) follows the project's convention: the classes in the truth or
    the predictions, for any number of resamples at once."""
    from graftune.tasks.classification import classification_metrics

    rng = np.random.default_rng(0)
    for n, k in ((3, 2), (16, 2), (48, 6), (120, 20)):
        y = rng.integers(0, k, size=(4, n))
        p = np.where(rng.random((4, n)) < 0.6, y, rng.integers(0, k, size=(4, n)))
        expected = [classification_metrics(y[i], p[i], [str(c) for c in range(k)])["macro_f1"] for i in range(4)]
        assert auto.macro_f1(y, p) == pytest.approx(expected)


def test_auto_stops_comparing_once_the_pick_is_settled(tiny, monkeypatch):
    """The contrastive recipe is right on all 5 examples of its first fold, the probe on 1 of them: far beyond two
    standard errors; more folds would not change the pick, so none are run."""
    calls = []
    monkeypatch.setattr(auto, "run_contrastive", _contrastive(1.0, calls))
    monkeypatch.setattr(auto, "fit_head", Folds([0.2]))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32, train_fn=Slow(),
                            candidates=("head", "contrastive"))
    assert record["method"] == "contrastive" and len(calls) == 1 == record["candidates"]["contrastive"]["folds"]
    # a close race runs on: LoRA as often right as the probe gets all five folds (the tie test above)


def test_auto_stops_after_three_folds_when_the_preferred_candidate_leads(tiny, monkeypatch):
    """Futility: the contrastive recipe (first in auto.PREFERENCE) is right on the same examples as the probe, so no
    other candidate is ahead of it after auto.FUTILITY_FOLDS folds, and more folds could only overrule it by a
    2-standard-error lead against it: the last two are not run. With the probe ahead, all five run."""
    calls = []
    monkeypatch.setattr(auto, "run_contrastive", _contrastive(0.8, calls))
    monkeypatch.setattr(auto, "fit_head", Folds([0.8]))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32, train_fn=Slow(),
                            candidates=("head", "contrastive"))
    assert record["method"] == "contrastive" and len(calls) == auto.FUTILITY_FOLDS == 3
    assert record["candidates"]["contrastive"]["folds"] == 3 and record["candidates"]["probe"]["folds"] == 5
    assert "stopped after 3 of 5 folds: contrastive, which wins ties" in record["reason"]

    calls.clear()
    monkeypatch.setattr(auto, "run_contrastive", _contrastive(0.6, calls))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=8, max_length=32, train_fn=Slow(),
                            candidates=("head", "contrastive"))
    assert len(calls) == 5 and "stopped after" not in record["reason"]


class FoldRates(FakeTrain):
    """LoRA right on the share ``rates[i]`` of its i-th fold's held-out examples."""

    def __init__(self, rates):
        super().__init__()
        self.rates = list(rates)

    def __call__(self, cfg, *, progress=True, splits=None):
        rate = self.rates[len(self.calls) % len(self.rates)]
        self.calls.append((cfg, splits))
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 100_000, "train_seconds": 0.0,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate, shift=1)}


def test_a_candidate_halving_stopped_as_beaten_cannot_win_a_tie_later(tiny, monkeypatch):
    """LoRA is right on every example of the first fold, the contrastive recipe on 3 in 5 of them: halving stops the
    contrastive recipe there as beaten. LoRA then misses everything on the other folds, so at the end the probe is
    best, and the contrastive recipe's one fold is within its noise of the probe's. It stays out: the pick is the
    probe, not the candidate the preference order puts first, on one fold of evidence already judged beaten (it won
    that tie before, 24.6 points behind)."""
    calls = []
    monkeypatch.setattr(auto, "run_contrastive", _contrastive(0.6, calls))
    monkeypatch.setattr(auto, "fit_head", Folds([0.8]))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, max_length=32,
                            train_fn=FoldRates([1.0, 0.0, 0.0, 0.0, 0.0]), candidates=("head", "lora", "contrastive"))
    assert len(calls) == 1 and record["dropped"]["contrastive"] == "lora", record["reason"]
    assert record["method"] == "probe", record["reason"]
    assert "contrastive stopped after 1 fold: lora was ahead of it by more than 2 standard errors there" \
        in record["reason"]
    assert "(12 examples, 0 s, stopped)" in record["reason"]  # the listing marks the frozen score


def test_a_candidate_that_ran_every_fold_is_compared_not_stopped(tiny, monkeypatch):
    """3 a class give 3 folds: the rung of 3 folds is every fold, so a candidate beaten there has not been stopped
    (it said "stopped after 3 folds"): it is simply behind in the comparison."""
    rates = iter([0.67, 0.0, 0.0])

    def contrastive(strategy, model, splits, seed, settings):
        rate = next(rates)
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 50_000, "train_seconds": 0.0,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate)}

    monkeypatch.setattr(auto, "run_contrastive", contrastive)
    monkeypatch.setattr(auto, "fit_head", Folds([0.6]))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=900, shots=3, max_length=32,
                            train_fn=FoldRates([1.0]), candidates=("head", "lora", "contrastive"))
    assert record["folds"] == 3 == record["candidates"]["contrastive"]["folds"], record["reason"]
    assert record["dropped"] == {} and "stopped" not in record["reason"], record["reason"]


def test_a_test_file_that_shares_examples_with_training_is_warned_about(tiny, tmp_path):
    # train and check warn about a leaking --test; compare trained and recommended on it in silence
    import csv

    with open(tiny["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    leak = tmp_path / "leak.csv"
    with leak.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:6])  # every test example is also a training example
    run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=1, strategies=["prototypes"], test=str(leak),
                out_dir=tmp_path / "cmp", settings={"max_length": 32}, progress=False)
    warnings = json.loads((tmp_path / "cmp" / "results.json").read_text())["meta"]["warnings"]
    assert any("the test set shares 6 exact" in w for w in warnings), warnings


def test_a_candidate_cut_short_by_the_budget_is_not_reported_as_stopped_by_futility(tiny, monkeypatch):
    """The contrastive recipe leads, but the budget let it run one fold: the reason must not say the folds stopped
    after 3 because it led (QA found "stopped after 3 of 5 folds" beside a single contrastive fold)."""
    calls = []
    slow = _contrastive(0.8, calls)

    def run(*args):
        time.sleep(2.0)
        return slow(*args)

    monkeypatch.setattr(auto, "run_contrastive", run)
    monkeypatch.setattr(auto, "fit_head", Folds([0.8]))
    record = auto.auto_pick(tiny["bert"], tiny["csv"], budget_s=3.0, shots=8, max_length=32, train_fn=Slow(),
                            candidates=("head", "contrastive"))
    assert len(calls) == 1 == record["candidates"]["contrastive"]["folds"]
    assert "stopped after" not in record["reason"]


def test_a_spent_budget_runs_nothing_more_and_infinity_is_refused(tiny, tmp_path):
    # QA: a strategy without a timing yet ran even with the budget spent (11 s past a 1 s budget); inf was
    # accepted and written into results.json as the non-JSON `Infinity`
    rows = run_compare(tiny["bert"], tiny["csv"], shots=(2,), seeds=1, strategies=["prototypes", "lora"],
                       budget_s=1e-9, out_dir=tmp_path / "spent", train_fn=FakeTrain(), progress=False,
                       settings={"max_length": 32})
    # the first run measures (a comparison with nothing in it helps no one); after it, nothing more runs
    assert "accuracy" in rows[0] and all("skipped" in r for r in rows[1:])
    assert "the budget is spent" in {r["skipped"] for r in rows[1:]}  # lora: no timing of its own, still skipped
    with pytest.raises(ConfigError, match="--budget inf"):
        run_compare(tiny["bert"], tiny["csv"], shots=(2,), budget_s=float("inf"), out_dir=tmp_path / "inf")
    from graftune.config import RunConfig

    with pytest.raises(ConfigError, match="auto_budget"):
        RunConfig(model="m", data="d", method="auto", auto_budget=float("inf"))


def test_a_tie_is_called_a_tie_and_a_group_gap_names_two_groups():
    # QA: "linear-probe (1.000) is the most accurate, 0.0 points ahead of lora", and "group gap 0.000 (north vs
    # north)" when every group scored the same
    text = recommend([_s("linear-probe", 8, 0.93, 0.01, 1, 3000), _s("lora", 8, 0.93, 0.01, 120, 80000)])[0]
    assert "are tied for the most accurate" in text and "ahead" not in text, text
    from graftune.run.scoring import group_metrics

    gaps = group_metrics(["a", "b", "a", "b"], ["a", "b", "a", "b"], ["north", "north", "south", "south"], ["a", "b"])
    assert gaps["accuracy_gap"] == {"gap": 0.0, "best": "north", "worst": "south"}
    # and the progress line says the groups are level rather than naming a best and a worst
    from graftune.strategies.compare import _trust_line

    assert _trust_line({"groups": gaps}) == "; group gap 0.000 (the groups are level)"


def test_a_built_in_text_model_on_images_is_refused_before_any_run(tmp_path):
    # QA: `compare --model minilm --data digits` exited 0 with a report of failed runs ("No run finished")
    from graftune.errors import ModelError
    from tests.train_helpers import image_folder

    with pytest.raises(ModelError, match="'minilm' does not serve task 'image-classification'"):
        run_compare("minilm", str(image_folder(tmp_path / "imgs")), shots=(2,), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_settings_offered_are_those_a_comparison_uses():
    from graftune.strategies.catalog import check_settings

    with pytest.raises(ConfigError) as err:
        check_settings({"rank": 4})
    for offered in ("epochs", "lr", "max_length", "precision"):
        assert offered in str(err.value)
    for causal_lm_only in ("prompt_column", "response_column", "max_new_tokens"):
        assert causal_lm_only not in str(err.value)


def test_one_test_example_a_class_names_the_small_class_only_when_it_is_the_cause():
    from graftune.data.sources import Dataset
    from graftune.strategies.compare import _one_test_each

    ds = Dataset(modality="text", inputs=[f"t{i}" for i in range(12)], labels=["a"] * 10 + ["b"] * 2,
                 label_names=["a", "b"])
    assert "smallest class (b, 2 examples) has room for no more beside 1 training example;" in _one_test_each(ds, 2, 1)
    asked = _one_test_each(ds, 2, 0)  # room for more: one a class was asked for (--test-per-class 1)
    assert "smallest class" not in asked and asked.startswith("the test set holds 1 example a class (2 in all); ")


def test_a_class_of_one_example_is_named_in_the_singular():
    from graftune.data.sources import Dataset
    from graftune.strategies.catalog import fitting_shots

    ds = Dataset("text", ["a", "b", "c", "d"], ["x", "x", "x", "y"], ["x", "y"], origin="m")
    with pytest.raises(DataError, match="the smallest class has 1 example, too few"):  # it said "1 examples"
        fitting_shots(ds, [2])
