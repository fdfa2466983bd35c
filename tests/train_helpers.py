"""Tiny model folders and data files for the training, evaluation and CLI tests (offline, seconds).

A model folder is what ``zoo.load_base(folder)`` reads: a tiny random BERT encoder or Llama decoder saved with
``save_pretrained`` plus a word-level BERT tokenizer built from a vocabulary written here.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: three topics, each with its own words: a linear head on mean-pooled states can separate them
TOPICS = {
    "sport": ["goal", "match", "team", "player", "coach", "league", "cup", "win", "score", "ball"],
    "money": ["bank", "market", "share", "price", "profit", "trade", "stock", "loss", "fund", "rate"],
    "tech": ["chip", "phone", "software", "data", "cloud", "robot", "code", "app", "web", "laptop"],
}
COMMON = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "with", "by", "at", "from"]
WORDS = COMMON + [w for ws in TOPICS.values() for w in ws]


def write_tokenizer(folder: Path, *, eos: bool = False):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    extra = {"eos_token": "[SEP]"} if eos else {}
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, **extra)
    tok.save_pretrained(folder)
    return tok


def bert_folder(folder: Path, layers: int = 2) -> Path:
    """A BERT (2 layers unless told, hidden 32) whose vocabulary is ``SPECIAL + WORDS``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def llama_folder(folder: Path) -> Path:
    """A 2-layer Llama causal LM with the same word-level tokenizer ([SEP] as end of text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok_size = len(SPECIAL) + len(WORDS)
    cfg = LlamaConfig(vocab_size=tok_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=3, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    write_tokenizer(folder, eos=True)
    return folder


def topic_rows(n_per_class: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(n_per_class):
            n = rng.randint(4, 12)
            text = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(n))
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def topic_csv(path: Path, n_per_class: int = 20, seed: int = 0) -> Path:
    return write_csv(path, topic_rows(n_per_class, seed))


def foreign_csv(src: str | Path, path: Path) -> Path:
    """``src``'s rows with two words the tiny vocabulary lacks appended to every text (one Russian, one Chinese), as
    an English model meets another language: for the vocabulary check."""
    with open(src, encoding="utf-8") as f:
        rows = [{"text": r["text"] + " слово 文字", "label": r["label"]} for r in csv.DictReader(f)]
    return write_csv(path, rows)


def pairs_jsonl(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Prompt/response pairs: 'topic of <words>' -> '{"topic": "<label>"}' (JSON answers, like json-answers)."""
    rows = topic_rows(n // 3 + 1, seed)[:n]
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["text"], "response": r["label"]}) + "\n")
    return path


def train_args(model: Path, data: Path, out: Path, **extra) -> dict:
    """A small, fast RunConfig for the tiny models."""
    args = {"model": str(model), "data": str(data), "out": str(out), "epochs": 3, "batch_size": 8, "lr": 5e-3,
            "max_length": 32, "precision": "fp32"}
    args.update(extra)
    return args


def image_folder(folder: Path, n_per_class: int = 10, seed: int = 0) -> Path:
    """Two classes of noisy grey 20x20 PNGs (dark, light), one subfolder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for label, value in (("dark", 40), ("light", 210)):
        (folder / label).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(rng.normal(value, 20, (20, 20)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def use_tiny_cnn(monkeypatch) -> None:
    """Make ``zoo.load_base`` return a tiny random EfficientNet (32 px) whatever the name."""
    from graftune import zoo

    def tiny_cnn_base(name, task=None, dtype=torch.float32):
        torch.manual_seed(0)
        return zoo.Base(zoo.tiny_efficientnet(num_classes=5).eval().requires_grad_(False), None, "cnn", name,
                        "memory", None, image_size=32)

    # every module that imported the function by name gets the stand-in too (the recipes import it at the top)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("graftune") and getattr(module, "load_base", None) is \
                zoo.load_base and module is not zoo:
            monkeypatch.setattr(module, "load_base", tiny_cnn_base)
    monkeypatch.setattr(zoo, "load_base", tiny_cnn_base)


def check_eval_and_predict(run_dir: Path, texts: list[str]) -> list[dict]:
    """`graftune eval` (JSON and text) gives the run's metrics.json and `graftune predict --json` gives what
    load_run + predict give, with a probability for every label; returns the predicted rows."""
    from typer.testing import CliRunner

    from graftune.cli import app
    from graftune.evaluate import load_run, predict

    runner = CliRunner()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored == {k: metrics[k] for k in scored} and "per_class" in scored
    text = runner.invoke(app, ["eval", str(run_dir)])
    assert text.exit_code == 0 and "macro-F1" in text.stdout and "confusion matrix" in text.stdout
    result = runner.invoke(app, ["predict", str(run_dir), *texts, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r.pop("arg"), r.pop("text")) for r in rows] == list(enumerate(texts, 1))  # which input each answers
    assert rows == predict(load_run(run_dir), texts)
    labels = set(json.loads((run_dir / "metrics.json").read_text())["per_class"])
    assert all(set(r["probabilities"]) == labels for r in rows)
    return rows


def fewshot_cli_data(root: Path) -> dict:
    """What the contrastive and probe CLI tests train and refuse: a tiny BERT, the topic csv, and data they must
    refuse (prompt/response pairs, images, a multi-label csv)."""
    multi = [{"text": r["text"], "label": f"{r['label']}|news"} for r in topic_rows(6)]
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root,
            "pairs": pairs_jsonl(root / "pairs.jsonl"), "images": image_folder(root / "images"),
            "multi": write_csv(root / "multi.csv", multi)}


def one_line_error(result) -> str:
    """A CliRunner result that failed as a user error must: exit 2, one line starting "error: ", no traceback."""
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error: "), text
    return text


def with_flags(args: list[str], flags: list[str], places: dict) -> list[str]:
    """``args`` with ``flags`` (flag, value pairs) set: a flag already there gets the new value (``--set`` is
    added again); a value naming a key of ``places`` becomes that path."""
    args = list(args)
    for flag, value in zip(flags[::2], flags[1::2]):
        value = str(places.get(value, value))
        if flag in args and flag != "--set":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def scripted_predictions(labels: list[str], label_names: list[str], right: float, *, shift: int = 0) -> list[str]:
    """A fake model's labels for ``labels``: right on ``round(right * n)`` of them, counted from position ``shift``
    (wrapping round: two fakes with different shifts are right on different examples), the next class on the
    others."""
    names = list(label_names)
    n = len(labels)
    m = int(right * n + 0.5)
    return [lab if (i - shift) % n < m else names[(names.index(lab) + 1) % len(names)]
            for i, lab in enumerate(labels)]


def check_export_eval_matches(export_dir: Path, run_dir: Path, extra: list[str]) -> None:
    """`graftune eval --json` of an ONNX export and of the run it came from give the same metrics (``extra``: e.g.
    ``["--data", FILE]``; none: the run's own test split)."""
    from typer.testing import CliRunner

    from graftune.cli import app

    runner = CliRunner()
    scored = runner.invoke(app, ["eval", str(export_dir), "--json", *extra])
    ref = runner.invoke(app, ["eval", str(run_dir), "--json", *extra])
    assert scored.exit_code == 0 and ref.exit_code == 0, scored.output + ref.output
    m, m_ref = json.loads(scored.stdout), json.loads(ref.stdout)
    assert m["format"] == "onnx" and m["examples"] == m_ref["examples"] > 0
    assert m["confusion_matrix"] == m_ref["confusion_matrix"] and m["accuracy"] == m_ref["accuracy"]


def export_onnx_cli(run_dir: Path, out: Path, *extra: str):
    """``graftune export RUN_DIR --format onnx --out OUT`` through the CLI, asserted to succeed; its result."""
    from typer.testing import CliRunner

    from graftune.cli import app

    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def predict_json(target: Path, texts: list[str]) -> list[dict]:
    """``graftune predict TARGET TEXT... --json`` through the CLI: one dict per text."""
    from typer.testing import CliRunner

    from graftune.cli import app

    result = CliRunner().invoke(app, ["predict", str(target), *texts, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]
