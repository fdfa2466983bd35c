"""Causal language modelling on prompt/response pairs (instruction tuning), and generation.

Each pair becomes ``prompt tokens + response tokens + eos``. The prompt is wrapped in the tokenizer's chat
template when it has one (``user`` turn, then the assistant header), otherwise followed by a newline. The loss
is next-token cross-entropy on the response tokens only: the labels are -100 on the prompt and on padding, so
the model is taught to answer, not to repeat questions.

Metrics: perplexity of the held-out responses, exact match of greedy generations, and, when every reference
response is JSON, the rate of generations that are well-formed JSON (``json_valid_rate``) and that equal the
reference once parsed (``json_match_rate``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftune.tasks.base import pad

IGNORE = -100


@dataclass
class CausalLM:
    """Args:
    tokenizer: the base's Hugging Face tokenizer.
    max_length: a longer pair loses the start of its prompt first, then the end of its response.
    use_chat_template: wrap prompts in the tokenizer's chat template when it has one.
    """

    tokenizer: Any
    max_length: int = 256
    use_chat_template: bool = True
    name: str = "causal-lm"

    def __post_init__(self):
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_id or 0)

    # --- text -> tokens ----------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        tok = self.tokenizer
        if self.use_chat_template and getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return prompt + "\n"

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.prompt_text(prompt)
        templated = self.use_chat_template and getattr(self.tokenizer, "chat_template", None)
        # a chat template already holds the special tokens it wants
        return self.tokenizer(text, add_special_tokens=not templated)["input_ids"]

    def encode(self, inputs: Sequence[tuple[str, str]], labels: Sequence[Any] | None = None) -> list[dict]:
        out = []
        for prompt, response in inputs:
            p = self.prompt_ids(prompt)
            r = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            if self.eos_id is not None:
                r = r + [self.eos_id]
            overflow = len(p) + len(r) - self.max_length
            if overflow > 0:
                cut = min(overflow, max(len(p) - 1, 0))
                p = p[cut:]
                r = r[: self.max_length - len(p)]
            out.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt": prompt, "response": response})
        return out

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad(ids, self.pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0),
                "labels": pad([e["labels"] for e in examples], IGNORE)}

    # --- training ----------------------------------------------------------------------------------------------
    def build_head(self) -> nn.Module | None:
        return None

    def forward(self, model: nn.Module, head: nn.Module | None, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        total, count = self.token_loss(logits, batch)
        return total / count.clamp(min=1)

    def token_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss over the response tokens, and their count (for perplexity)."""
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        # only the positions that predict a response token: the full vocabulary-sized logits of the prompt
        # positions are never up-cast to float32
        picked = logits[:, :-1][keep].float()
        total = F.cross_entropy(picked, labels[keep], reduction="sum")
        return total, keep.sum()

    # --- generation --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, model: nn.Module, prompts: Sequence[str], *, max_new_tokens: int = 64,
                 batch_size: int = 8, on_batch: Callable[[int], Any] | None = None) -> list[str]:
        """Greedy answers to ``prompts`` (batched, left-padded), with the prompt and the end token cut off.
        ``on_batch(n)`` is called after each batch of ``n`` answers (a progress bar's ``update``)."""
        out: list[str] = [""] * len(prompts)
        encoded = [self.prompt_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids = [encoded[i] for i in idx]
            input_ids = pad(ids, self.pad_id, left=True)
            mask = pad([[1] * len(s) for s in ids], 0, left=True)
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id)
            for row, i in enumerate(idx):
                out[i] = self.tokenizer.decode(gen[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
            if on_batch is not None:
                on_batch(len(idx))
        return out


def _as_json(text: str) -> tuple[bool, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False, None
    return isinstance(value, (dict, list)), value


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """exact_match; and json_valid_rate / json_match_rate when every reference is a JSON object or list."""
    n = max(len(references), 1)
    out: dict[str, Any] = {
        "examples": len(references),
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
    }
    refs = [_as_json(r) for r in references]
    if references and all(ok for ok, _ in refs):
        parsed = [_as_json(p) for p in predictions]
        out["json_valid_rate"] = sum(ok for ok, _ in parsed) / n
        out["json_match_rate"] = sum(ok and v == ref for (ok, v), (_, ref) in zip(parsed, refs)) / n
    return out
