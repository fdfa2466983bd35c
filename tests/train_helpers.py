"""Tiny model folders and data files for the training, evaluation and CLI tests (offline, seconds).

A model folder is what ``zoo.load_base(folder)`` reads: a tiny random BERT encoder or Llama decoder saved with
``save_pretrained`` plus a word-level BERT tokenizer built from a vocabulary written here.
"""

from __future__ import annotations

import csv
import json
import random
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

    monkeypatch.setattr(zoo, "load_base", tiny_cnn_base)
