"""Tiny random models built from configs (milliseconds each) and their inputs, shared by every test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# on a busy machine the suite runs on the free cores only, as the CLI does (speed/threads.py); the count is then
# fixed for the suite and the CLI processes it starts, so the CLI's commands do not sample the cores' load before
# each call (tests/unit/test_threads.py clears the variable to test that)
from graftune.speed.threads import fit_to_free_cores  # after the variables above: transformers reads them

fit_to_free_cores()
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_cnn():
    from graftune.zoo import tiny_efficientnet

    torch.manual_seed(0)
    return tiny_efficientnet(num_classes=5).eval()


def text_inputs(batch: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, -2:] = 0  # one padded row: attention masks must be honoured
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(batch, 3, 32, 32, generator=g)}


TINY = {
    "bert": (tiny_bert, text_inputs),
    "llama": (tiny_llama, text_inputs),
    "gpt2": (tiny_gpt2, lambda b=3: {"input_ids": text_inputs(b)["input_ids"]}),
    "cnn": (tiny_cnn, image_inputs),
}


def first_tensor(out) -> torch.Tensor:
    """The main output of a model call (last_hidden_state, logits, or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    build, inputs = TINY[request.param]
    return request.param, build(), inputs()
