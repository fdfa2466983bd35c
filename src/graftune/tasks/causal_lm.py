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

    def first_too_long(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int, int] | None:
        """``(index, tokens, room)`` of the first tokenized prompt that leaves its answer no room within
        ``max_length`` (the length training pairs were cut to), else None: the bound on the work one prompt can
        ask for (characters alone do not bound tokens, and a base's positions end somewhere). ``graftune generate``
        and the server refuse such a prompt."""
        room = self.max_length - max_new_tokens
        return next(((i, len(ids), max(room, 0)) for i, ids in enumerate(prompts) if len(ids) > room), None)

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
    def generate(self, model: nn.Module, prompts: Sequence[str], *, max_new_tokens: int | Sequence[int] = 64,
                 batch_size: int = 8, on_batch: Callable[[int], Any] | None = None,
                 adapter_names: Sequence[str | None] | None = None) -> list[str]:
        """Greedy answers to ``prompts`` (batched, left-padded), with the prompt and the end token cut off.
        ``on_batch(n)`` is called after each batch of ``n`` answers (a progress bar's ``update``). See
        :meth:`generate_ids` for ``max_new_tokens`` per prompt and ``adapter_names``."""
        answers = self.generate_ids(model, [self.prompt_ids(p) for p in prompts], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, on_batch=on_batch, adapter_names=adapter_names)
        return [self.decode(a) for a in answers]

    @torch.inference_mode()
    def generate_ids(self, model: nn.Module, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int | Sequence[int] = 64, batch_size: int = 8,
                     on_batch: Callable[[int], Any] | None = None,
                     adapter_names: Sequence[str | None] | None = None) -> list[list[int]]:
        """Greedy answer tokens to tokenized prompts, each ending before its first end token.

        Args:
            max_new_tokens: one limit, or one per prompt. A batch generates up to its largest limit and each answer
                is cut at its own: greedy decoding of a row does not depend on the rows beside it (up to rounding,
                which in bf16 can turn a near-tie), so the cut answer is the one that row would get alone.
            adapter_names: one per prompt (None for the base), for an ``AdapterModel``: every batch then runs as ONE
                mixed-adapter generation, each row routed to its own adapter at every decoding step (the engine's
                batched routing). None: the model's active adapters for every row.
        """
        n = len(prompts)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n or (adapter_names is not None and len(adapter_names) != n):
            raise ValueError("max_new_tokens and adapter_names need one value per prompt")
        out: list[list[int]] = [[] for _ in range(n)]
        order = sorted(range(n), key=lambda i: -len(prompts[i]))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            ids = [prompts[i] for i in idx]
            input_ids = pad(ids, self.pad_id, left=True)
            mask = pad([[1] * len(s) for s in ids], 0, left=True)
            per_row = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(limits[i] for i in idx),
                                 do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id, **per_row)
            new = gen[:, input_ids.shape[1]:].tolist()
            for row, i in enumerate(idx):
                answer = new[row][:limits[i]]
                # after its end token a row holds padding until the whole batch is done: cut it there
                out[i] = answer[:answer.index(self.eos_id)] if self.eos_id in answer else answer
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def decode(self, answer: Sequence[int]) -> str:
        return self.tokenizer.decode(answer, skip_special_tokens=True).strip()

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
