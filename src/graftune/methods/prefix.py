"""Prefix tuning: trainable keys and values prepended in every attention layer.

Each layer l attends over P learned key/value vectors before the sequence's own (Li & Liang 2021,
https://arxiv.org/abs/2101.00190):

    head_l(x) = softmax(q [P_k,l ; K_l]^T / sqrt(d)) [P_v,l ; V_l]

with P_k,l, P_v,l in R^(P x d) per key/value head. The prefix is passed to the base as a pre-filled
``DynamicCache`` (``cache``, formerly ``past_key_values``) with the attention mask extended by P ones on the
left, which is how transformers models (decoders, and in 5.x encoders such as BERT too) attend to earlier
keys/values; a cached ``generate`` then just continues that cache. As in the paper's GPT-2 setup the prefix occupies positions
0..P-1, so a row's real tokens are at positions P + (the positions the base would give them).

Reparameterization (``projection=True``, paper section 4.3): the prefix is produced by an MLP from a small
P x hidden embedding, ``[P_k ; P_v] = W_2 tanh(W_1 E)``, which the paper found to stabilise training; the MLP
stays in the saved adapter (it is small) and is evaluated once per forward.

Init (``init``): "vocab" fills the prefix with the keys/values the base computes for P random real tokens (the
paper's real-word initialisation, which helps most with little data, section 7.4); with ``projection`` it
copies P random word embeddings into E. "random" draws from N(0, 1).

Mixed batches: each row gathers its adapter's prefix; adapters with fewer virtual tokens are left-padded with
masked zeros, and base rows get an all-masked zero prefix and unshifted positions, so they compute as the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from graftune.core import routing, virtual_tokens
from graftune.core.method import Capabilities, Method, MethodConfig, check, register
from graftune.core.virtual_tokens import vocab_sample
from graftune.errors import ConfigError

FAMILIES = ("bert", "llama", "gpt2")
INITS = ("vocab", "random")


@dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    """Args:
    num_virtual_tokens: P, the number of prefix key/value positions per layer (1..512).
    projection: produce the prefix with an MLP from a P x hidden embedding (the paper's reparameterization).
    projection_hidden: width of that MLP's hidden layer.
    init: "vocab" (keys/values of random real tokens; with projection, random word embeddings) or "random".
    """

    num_virtual_tokens: int = 10
    projection: bool = False
    projection_hidden: int = 512
    init: str = "vocab"
    averaging_ignores: ClassVar[tuple[str, ...]] = (*MethodConfig.averaging_ignores, "init")

    def validate(self):
        n = self.num_virtual_tokens
        check(isinstance(n, int) and 1 <= n <= 512, "num_virtual_tokens", f"got {n!r}; use an integer from 1 to 512")
        check(isinstance(self.projection, bool), "projection", f"got {self.projection!r}; use true or false")
        h = self.projection_hidden
        check(isinstance(h, int) and h >= 1, "projection_hidden", f"got {h!r}; use a positive integer (e.g. 512)")
        check(self.init in INITS, "init", f"got {self.init!r}; use one of {', '.join(INITS)}")
        check(self.targets is None, "targets", "prefix tuning attaches to every attention layer; leave targets unset")
        check(self.top_k_layers is None, "top_k_layers", "prefix tuning covers every layer; leave top_k_layers unset")


def attention_shape(base: nn.Module) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head dim, hidden size) of a transformers model, from its config."""
    cfg = base.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim, cfg.hidden_size


class PrefixModule(nn.Module):
    """The prefix of one adapter. ``forward()`` returns keys and values as (layers, 2, kv_heads, P, head_dim)."""

    def __init__(self, base: nn.Module, cfg: PrefixConfig):
        super().__init__()
        layers, kv_heads, head_dim, hidden = attention_shape(base)
        self.shape = (layers, 2, kv_heads, cfg.num_virtual_tokens, head_dim)
        self.num_virtual_tokens = cfg.num_virtual_tokens
        p = cfg.num_virtual_tokens
        if cfg.projection:
            self.prefix_embedding = nn.Parameter(torch.empty(p, hidden))
            self.prefix_mlp = nn.Sequential(nn.Linear(hidden, cfg.projection_hidden), nn.Tanh(),
                                            nn.Linear(cfg.projection_hidden, layers * 2 * kv_heads * head_dim))
            with torch.no_grad():
                if cfg.init == "vocab":
                    words = base.get_input_embeddings().weight[vocab_sample(base, p)]
                    self.prefix_embedding.copy_(words.float())
                else:
                    nn.init.normal_(self.prefix_embedding)
        else:
            self.prefix_kv = nn.Parameter(torch.empty(self.shape))
            with torch.no_grad():
                if cfg.init == "vocab":
                    self.prefix_kv.copy_(_real_token_kv(base, p, self.shape))
                else:
                    nn.init.normal_(self.prefix_kv)

    def forward(self) -> torch.Tensor:
        if hasattr(self, "prefix_kv"):
            return self.prefix_kv
        layers, two, kv_heads, p, head_dim = self.shape
        out = self.prefix_mlp(self.prefix_embedding).view(p, layers, two, kv_heads, head_dim)
        return out.permute(1, 2, 3, 0, 4)


def _real_token_kv(base: nn.Module, p: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The keys/values every layer of ``base`` computes for p random real tokens (no adapter applied)."""
    from transformers import DynamicCache

    device = base.get_input_embeddings().weight.device
    ids = vocab_sample(base, p).to(device)[None]
    cache = DynamicCache(config=base.config)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), routing.routed(routing.Route(())):
            base(input_ids=ids, use_cache=True, **{virtual_tokens.cache_argument(base): cache})
    finally:
        base.train(was_training)
    got = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    if tuple(got.shape) != shape:
        raise ConfigError(f"this base's attention caches keys/values of shape {tuple(got.shape)}, not the "
                          f"{shape} its config implies; use init='random'")
    return got.float()


def generation_expansion(base: nn.Module, kwargs: dict) -> int:
    """How many sequences ``generate`` runs per input row (beams x returned sequences): it repeats tensor inputs
    itself, but not a cache object passed in."""
    config = kwargs.get("generation_config") or getattr(base, "generation_config", None)

    def pick(name: str) -> int:
        value = kwargs.get(name)
        return int(value if value is not None else getattr(config, name, 1) or 1)

    return max(pick("num_beams"), 1) * max(pick("num_return_sequences"), 1)


@register
class Prefix(Method):
    name = "prefix"
    description = "Trainable key/value prefixes in every attention layer (P virtual tokens; MLP reparameterization)."
    config_cls = PrefixConfig
    capabilities = Capabilities(mergeable=False, mixed_batch=True, identity_at_init=False, changes_seq_len=True)
    site = "model"
    families = FAMILIES
    merge_note = "the prefix adds attention positions; it is not a change of any weight"

    def build_model_site(self, base, config):
        virtual_tokens.check_family(base, "prefix", FAMILIES)
        return PrefixModule(base, config)

    def prepare(self, modules, rows, base, kwargs, *, generating=False):
        from transformers import DynamicCache

        kwargs = dict(kwargs)
        batch, length, device = virtual_tokens.inputs_shape(kwargs, "prefix")
        checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers 5.x's name for the old
        if checkpointing is None:
            checkpointing = getattr(base, "is_gradient_checkpointing", False)
        if base.training and checkpointing:
            raise ConfigError("prefix tuning passes the prefix as a cache, which gradient checkpointing drops; "
                              "turn gradient checkpointing off")
        dtype = virtual_tokens.compute_dtype(base, device)
        width = max(m.num_virtual_tokens for m in modules)
        # each adapter's prefix left-padded to the widest; the last entry (all zeros, masked) is the base rows'
        table = torch.stack([nn.functional.pad(m(), (0, 0, width - m.num_virtual_tokens, 0)) for m in modules])
        table = torch.cat([table, table.new_zeros(1, *table.shape[1:])]).to(dtype)
        counts = torch.tensor([*(m.num_virtual_tokens for m in modules), 0], device=device)
        idx = virtual_tokens.row_index(rows, len(modules), batch, device)
        kv = table[0].expand(batch, *table.shape[1:]) if rows is None else table[idx]
        if generating:
            kv = kv.repeat_interleave(generation_expansion(base, kwargs), dim=0)
        cache = DynamicCache(ddp_cache_data=[(layer[:, 0], layer[:, 1]) for layer in kv.unbind(1)], config=base.config)
        virtual_tokens.extend_inputs(base, kwargs, counts[idx], width, length, generating=generating,
                                     virtual_positions=False)
        kwargs[virtual_tokens.cache_argument(base)] = cache
        if not generating:
            kwargs.setdefault("use_cache", False)  # a returned cache would hold the prefix too
        return kwargs, _identity


def _identity(x):
    return x
