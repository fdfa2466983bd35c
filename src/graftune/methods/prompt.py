"""Prompt tuning: P trainable "soft token" embeddings prepended to the input embeddings.

    h_0 = [S ; E(x)],   S in R^(P x hidden) trainable, E the base's frozen input embeddings

(Lester, Al-Rfou & Constant 2021, https://arxiv.org/abs/2104.08691). The base then runs on P + T positions as
usual (position and token-type embeddings are added to S like to any token; the soft tokens take positions
0..P-1 and the real tokens P..P+T-1); the attention mask gets P ones on the left, ``labels`` P ignored
positions, and the outputs that run along the sequence (``last_hidden_state``, ``logits``, ``hidden_states``)
are trimmed back to the caller's T tokens.

Init (``init``): "vocab" copies the embeddings of P random real tokens (the paper's best init besides class
labels, section 3); "random" draws from N(0, s^2) with s the standard deviation of the base's embedding matrix.

Generation: ``generate`` receives ``inputs_embeds`` (soft tokens and the embedded prompt) together with the
``input_ids``, so it returns the prompt's ids followed by the new tokens, like the base.

Mixed batches: each row gathers its adapter's soft tokens; adapters with fewer tokens are left-padded with
masked zeros, and base rows get an all-masked zero block and unshifted positions, so they compute as the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from graftune.core import virtual_tokens
from graftune.core.method import Capabilities, Method, MethodConfig, check, register

FAMILIES = ("bert", "llama", "gpt2")
INITS = ("vocab", "random")


@dataclass(frozen=True)
class PromptConfig(MethodConfig):
    """Args:
    num_virtual_tokens: P, the number of soft tokens (1..512).
    init: "vocab" (embeddings of random real tokens) or "random" (normal, scaled like the vocabulary).
    """

    num_virtual_tokens: int = 10
    init: str = "vocab"
    averaging_ignores: ClassVar[tuple[str, ...]] = (*MethodConfig.averaging_ignores, "init")

    def validate(self):
        n = self.num_virtual_tokens
        check(isinstance(n, int) and 1 <= n <= 512, "num_virtual_tokens", f"got {n!r}; use an integer from 1 to 512")
        check(self.init in INITS, "init", f"got {self.init!r}; use one of {', '.join(INITS)}")
        check(self.targets is None, "targets", "prompt tuning attaches to the model's inputs; leave targets unset")
        check(self.top_k_layers is None, "top_k_layers", "prompt tuning feeds the first layer; leave top_k_layers unset")


class PromptModule(nn.Module):
    """The soft tokens of one adapter: ``prompt_embeddings`` (P x hidden)."""

    def __init__(self, base: nn.Module, cfg: PromptConfig):
        super().__init__()
        words = base.get_input_embeddings().weight.detach().float()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        if cfg.init == "vocab":
            init = words[virtual_tokens.vocab_sample(base, cfg.num_virtual_tokens).to(words.device)].clone()
        else:
            init = torch.randn(cfg.num_virtual_tokens, words.shape[1], device=words.device) * words.std()
        self.prompt_embeddings = nn.Parameter(init)


@register
class Prompt(Method):
    name = "prompt"
    description = "Trainable soft-token embeddings prepended to the input (P virtual tokens)."
    config_cls = PromptConfig
    capabilities = Capabilities(mergeable=False, mixed_batch=True, identity_at_init=False, changes_seq_len=True)
    site = "model"
    families = FAMILIES
    merge_note = "soft tokens are extra inputs; they are not a change of any weight"

    def build_model_site(self, base, config):
        virtual_tokens.check_family(base, "prompt", FAMILIES)
        return PromptModule(base, config)

    def prepare(self, modules, rows, base, kwargs, *, generating=False):
        kwargs = dict(kwargs)
        batch, length, device = virtual_tokens.inputs_shape(kwargs, "prompt")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = base.get_input_embeddings()(kwargs["input_ids"])
        width = max(m.num_virtual_tokens for m in modules)
        # each adapter's tokens left-padded to the widest; the last entry (all zeros, masked) is the base rows'
        table = torch.stack([nn.functional.pad(m.prompt_embeddings, (0, 0, width - m.num_virtual_tokens, 0))
                             for m in modules])
        table = torch.cat([table, table.new_zeros(1, *table.shape[1:])]).to(embeds.dtype)
        counts = torch.tensor([*(m.num_virtual_tokens for m in modules), 0], device=device)
        idx = virtual_tokens.row_index(rows, len(modules), batch, device)
        soft = table[0].expand(batch, *table.shape[1:]) if rows is None else table[idx]
        virtual_tokens.extend_inputs(base, kwargs, counts[idx], width, length, generating=generating,
                                     virtual_positions=True)
        kwargs["inputs_embeds"] = torch.cat([soft, embeds], dim=1)
        if not generating:
            kwargs.pop("input_ids", None)
        elif kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is None:
            # generate keeps input_ids next to inputs_embeds, so that its output starts with the prompt's ids, and
            # then counts max_length from the end of the embeddings; the caller counted it from the ids
            kwargs["max_new_tokens"] = max(kwargs.pop("max_length") - length, 0)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, width), types], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length and not labels.is_floating_point():
            kwargs["labels"] = torch.cat([labels.new_full((batch, width), -100), labels], dim=1)
        return kwargs, virtual_tokens.trimmer(width, length)
