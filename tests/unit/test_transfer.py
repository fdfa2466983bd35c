"""Transfer (strategies/transfer.py) on a tiny random "multilingual" BERT whose vocabulary holds the topic words
of two languages: warm starts begin at the source weights, a stacked adapter computes what both adapters applied
by hand compute and is reloaded by eval, mismatched sources are one-line errors, and a run trained on English
data is scored on German data with the same label names."""

from __future__ import annotations

import copy
import json
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from graftune.config import RunConfig, parse_sets
from graftune.core.model import AdapterModel, target_name
from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.evaluate import evaluate_run, load_run
from graftune.io.artifact import HEAD_PREFIX, save_adapter
from graftune.recipes import transfer
from graftune.runs import train
from graftune.zoo import load_base
from tests.train_helpers import SPECIAL, train_args, write_csv

EN = {"sport": ["goal", "match", "team", "player", "coach", "league", "cup", "win"],
      "money": ["bank", "market", "share", "price", "profit", "trade", "stock", "fund"],
      "tech": ["chip", "phone", "software", "data", "cloud", "robot", "code", "app"]}
DE = {"sport": ["tor", "spiel", "mannschaft", "spieler", "trainer", "liga", "pokal", "sieg"],
      "money": ["bank", "markt", "aktie", "preis", "gewinn", "handel", "boerse", "fonds"],
      "tech": ["chip", "handy", "daten", "wolke", "roboter", "programm", "rechner", "netz"]}
COMMON = {"en": ["the", "a", "of", "and", "to", "in", "is"], "de": ["der", "die", "das", "und", "zu", "im", "ist"]}


def rows(topics: dict, common: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = [{"text": " ".join(rng.choice(ws) if rng.random() < 0.6 else rng.choice(common)
                             for _ in range(rng.randint(4, 10))), "label": label}
           for label, ws in topics.items() for _ in range(n)]
    rng.shuffle(out)
    return out


def multilingual_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level tokenizer covering the English and the German words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in (EN, DE) for ws in t.values() for w in ws} | {w for c in COMMON.values() for w in c})
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + words) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    t = {"root": root, "bert": multilingual_bert(root / "bert"),
         "en": write_csv(root / "en.csv", rows(EN, COMMON["en"], 16, 0)),
         "de": write_csv(root / "de.csv", rows(DE, COMMON["de"], 8, 1))}
    # the English task run every test starts from
    train(RunConfig(**train_args(t["bert"], t["en"], root / "en-run", options={"r": 4, "alpha": 8})), progress=False)
    t["en_run"] = root / "en-run"
    # two "language adapters": LoRA with random (non-zero) weights, saved without a head
    for lang, seed in (("en", 1), ("de", 2)):
        model = AdapterModel(load_base(str(t["bert"])).model)
        model.add_adapter(lang, "lora", r=2, alpha=4)
        with torch.no_grad():
            torch.manual_seed(seed)
            for p in model.adapters[lang].parameters():
                p.normal_(0, 0.3)
        t[f"lang_{lang}"] = save_adapter(model, lang, root / f"lang-{lang}")
    return t


def cfg_for(tiny, out: Path, **extra) -> RunConfig:
    return RunConfig(**train_args(tiny["bert"], tiny["en"], out, **{"options": {"r": 4, "alpha": 8}, **extra}))


def adapter_tensors(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter.safetensors")


def fresh(tiny, method: str = "lora", **options) -> AdapterModel:
    model = AdapterModel(load_base(str(tiny["bert"])).model)
    model.add_adapter("new", method, **options)
    model.set_active("new")
    model.set_trainable("new")
    return model


# --- warm start -------------------------------------------------------------------------------------------------
def test_warm_start_starts_at_the_source_weights(tiny, tmp_path):
    source = adapter_tensors(tiny["en_run"])
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in source.items())  # B starts at 0 when fresh
    # a learning rate so small that training cannot move the weights: the run ends where it started
    still = {"lr": 1e-12, "head_lr": 1e-12, "epochs": 1}
    m = train(cfg_for(tiny, tmp_path / "warm", init_from=str(tiny["en_run"]), **still), progress=False)
    warm = adapter_tensors(tmp_path / "warm")
    assert set(warm) == set(source)
    for k in source:
        torch.testing.assert_close(warm[k], source[k], atol=1e-6, rtol=0)  # adapter and head (same labels)
    assert m["transfer"] == {"init_from": str(tiny["en_run"]), "init_method": "lora", "init_head": "loaded"}
    cold = adapter_tensors(train(cfg_for(tiny, tmp_path / "cold", **still), progress=False) and tmp_path / "cold")
    assert max(v.abs().max() for k, v in cold.items() if k.endswith("lora_B")) < 1e-6  # without it: B is zero
    # the adapter directory itself works as a source too
    model = fresh(tiny, r=4, alpha=8)
    record = transfer.warm_start(model, "new", tiny["en_run"] / "adapter")
    assert "init_head" not in record
    for k, v in model.adapter_state_dict("new").items():
        torch.testing.assert_close(v, source[k])


def test_warm_start_reinitializes_the_head_when_labels_differ(tiny):
    from graftune.tasks import build_task

    base = load_base(str(tiny["bert"]))
    model = AdapterModel(base.model)
    model.add_adapter("new", "lora", r=4, alpha=8)
    head = build_task("classification", base, label_names=["a", "b", "c"], max_length=32).build_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    record = transfer.warm_start(model, "new", tiny["en_run"], head=head, label_names=["a", "b", "c"])
    assert record["init_head"] == "re-initialized: the label names differ"
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    same = transfer.warm_start(model, "new", tiny["en_run"], head=head, label_names=["money", "sport", "tech"])
    assert same["init_head"] == "loaded"
    saved = {k[len(HEAD_PREFIX):]: v for k, v in adapter_tensors(tiny["en_run"]).items() if k.startswith(HEAD_PREFIX)}
    assert all(torch.equal(saved[k], v) for k, v in head.state_dict().items())


def test_mismatched_sources_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"does not have this run's shapes .*train with its options: --set r=4$"):
        transfer.warm_start(fresh(tiny, r=8, alpha=8), "new", tiny["en_run"])
    with pytest.raises(ConfigError, match=r"its adapter is lora, this run trains bottleneck; .*\(--method lora\)"):
        transfer.warm_start(fresh(tiny, "bottleneck"), "new", tiny["en_run"])
    with pytest.raises(ConfigError, match="not a run directory .* or an adapter directory"):
        transfer.warm_start(fresh(tiny, r=4, alpha=8), "new", tmp_path)
    other = multilingual_bert(tmp_path / "other-bert", seed=5)  # same architecture, other weights
    model = AdapterModel(load_base(str(other)).model)
    model.add_adapter("new", "lora", r=4, alpha=8)
    with pytest.raises(ArtifactError, match="same architecture, other weights"):
        transfer.warm_start(model, "new", tiny["en_run"])
    # through train(): a one-line error and no run directory left behind
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="head-only run has no adapter"):
        train(cfg_for(tiny, out, method="head", options={}, init_from=str(tiny["en_run"])), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".bad.partial"))


def test_a_shape_mismatch_names_set_flags_that_work_when_pasted(tiny, tmp_path):
    # a source with its own targets and top_k_layers (what a contrastive run saves): the message printed
    # "targets={'names': [...], 'regex': None, ...}", which --set read with 'None' as a string
    source = AdapterModel(load_base(str(tiny["bert"])).model)
    source.add_adapter("src", "lora", r=4, alpha=8, targets=["query", "key", "attention.output.dense"], top_k_layers=1)
    save_adapter(source, "src", tmp_path / "src")
    with pytest.raises(ConfigError) as err:
        transfer.warm_start(fresh(tiny, r=4, alpha=8), "new", tmp_path / "src")
    msg = str(err.value)
    assert msg.endswith("train with its options: --set 'targets=[query, key, attention.output.dense]' "
                        "--set top_k_layers=1"), msg
    flags = shlex.split(msg.split("train with its options: ")[1])
    pasted = parse_sets(flags[1::2])
    transfer.warm_start(fresh(tiny, r=4, alpha=8, **pasted), "new", tmp_path / "src")  # what it suggests loads


# --- stacking ---------------------------------------------------------------------------------------------------
def test_stacked_output_equals_applying_both_adapters(tiny):
    base = load_base(str(tiny["bert"]))
    reference = copy.deepcopy(base.model)
    model = fresh(tiny, r=4, alpha=8)
    with torch.no_grad():
        for p in model.adapters["new"].parameters():
            p.normal_(0, 0.3)
    under = transfer.stack_under(model, "new", tiny["lang_en"])
    assert model.active == (under, "new")
    assert [p for p in model.adapters[under].parameters() if p.requires_grad] == []  # the language adapter is frozen
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.adapters["new"].parameters()}

    batch = base.tokenizer(["goal match the team", "tor spiel der liga", "bank markt"], return_tensors="pt",
                           padding=True)
    with torch.no_grad():
        stacked = model(**batch).last_hidden_state
        model.set_active("new")
        alone = model(**batch).last_hidden_state
        # by hand: each LoRA adds s * B A to its target's weight
        for name in (under, "new"):
            for key, module in model.adapters[name].items():
                reference.get_submodule(target_name(key)).weight += module.delta()
        expected = reference(**batch).last_hidden_state
    torch.testing.assert_close(stacked, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stacked, alone, atol=1e-3)  # the language adapter does change the output


def test_a_stacked_run_reloads_both_and_the_language_adapter_can_be_swapped(tiny, tmp_path):
    run = tmp_path / "stacked"
    m = train(cfg_for(tiny, run, stack_under=str(tiny["lang_en"])), progress=False)
    assert m["transfer"] == {"stack_under": str(tiny["lang_en"]), "stack_under_method": "lora"}
    copied = load_file(run / transfer.UNDER_DIR / "adapter.safetensors")
    source = load_file(tiny["lang_en"] / "adapter.safetensors")
    assert copied.keys() == source.keys() and all(torch.equal(copied[k], source[k]) for k in source)

    loaded = load_run(run)
    assert loaded.model.active == (transfer.UNDER_NAME, "stacked")
    # the test metrics of training come back from the run directory alone: both adapters were reloaded
    again = evaluate_run(run)
    assert again["accuracy"] == m["accuracy"] and again["loss"] == pytest.approx(m["loss"], abs=1e-4)

    # swap in the German language adapter and score German data (same labels): MAD-X style transfer
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped)
    shutil.rmtree(swapped / transfer.UNDER_DIR)
    shutil.copytree(tiny["lang_de"], swapped / transfer.UNDER_DIR)
    de_with_en = evaluate_run(run, data=str(tiny["de"]))
    de_with_de = evaluate_run(swapped, data=str(tiny["de"]))
    assert de_with_de["examples"] == de_with_en["examples"] == 24
    assert de_with_de["loss"] != pytest.approx(de_with_en["loss"], abs=1e-6)
    # without its stack folder the run is a plain task adapter again: other numbers
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    shutil.rmtree(plain / transfer.UNDER_DIR)
    assert evaluate_run(plain)["loss"] != pytest.approx(m["loss"], abs=1e-6)


def test_stack_under_a_mismatched_or_stacked_source_is_an_error(tiny, tmp_path):
    other = multilingual_bert(tmp_path / "other-bert", seed=5)
    model = AdapterModel(load_base(str(other)).model)
    with pytest.raises(ArtifactError, match="cannot load onto this base"):
        transfer.stack_under(model, None, tiny["lang_en"])
    run = tmp_path / "s"
    train(cfg_for(tiny, run, stack_under=str(tiny["lang_en"]), epochs=1), progress=False)
    with pytest.raises(ConfigError, match="stack one level only"):
        transfer.stack_under(fresh(tiny, r=4, alpha=8), "new", run)


# --- another language -------------------------------------------------------------------------------------------
def test_eval_on_data_in_another_language(tiny, tmp_path):
    from graftune.cli import app

    m = evaluate_run(tiny["en_run"], data=str(tiny["de"]))
    assert m["examples"] == 24 and m["label_names"] == ["money", "sport", "tech"]
    assert sum(c["support"] for c in m["per_class"].values()) == 24 and 0 <= m["accuracy"] <= 1
    result = CliRunner().invoke(app, ["eval", str(tiny["en_run"]), "--data", str(tiny["de"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == m["accuracy"]
    # labels the run never saw (here: translated label names) are a one-line error, not a wrong score
    renamed = write_csv(tmp_path / "de-labels.csv", [{"text": "tor spiel", "label": "fussball"},
                                                            {"text": "bank markt", "label": "money"}])
    with pytest.raises(DataError, match="labels the run was not trained on: fussball"):
        evaluate_run(tiny["en_run"], data=str(renamed))


def test_cli_flags_reach_the_run_and_predict_reloads_the_stack(tiny, tmp_path):
    from graftune.cli import app

    runner = CliRunner()
    out = tmp_path / "both"
    args = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["en"]), "--out", str(out), "--epochs", "1",
            "--max-length", "32", "--precision", "fp32", "--set", "r=4", "--set", "alpha=8", "--quiet", "--json",
            "--init-from", str(tiny["en_run"]), "--stack-under", str(tiny["lang_en"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["transfer"]
    assert record["init_head"] == "loaded" and record["stack_under"] == str(tiny["lang_en"])
    saved = RunConfig(**yaml.safe_load((out / "run.yaml").read_text()))
    assert saved.init_from == str(tiny["en_run"]) and saved.stack_under == str(tiny["lang_en"])
    result = runner.invoke(app, ["predict", str(out), "goal match team", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["probabilities"]) == {"money", "sport", "tech"}
    # a mismatched source: one line, exit 2, no run directory
    bad = [a if a != str(out) else str(tmp_path / "bad") for a in args]
    bad[bad.index("r=4")] = "r=8"
    result = runner.invoke(app, bad)
    assert result.exit_code == 2 and result.output.startswith("error: init_from ")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_an_in_context_run_as_a_source_says_it_has_no_adapter(tmp_path):
    (tmp_path / "run.yaml").write_text("method: in-context\nmodel: smollm2\n")
    with pytest.raises(ConfigError, match=r"^init_from .*: an in-context run, a prompt of examples \(in_context/\), "
                                          "has no adapter to start from; pass the --out of a run trained with an "
                                          "adapter method"):
        transfer.source_dir(tmp_path, "init_from")
