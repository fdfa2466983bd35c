"""Tasks: batching, pooling, heads, losses and metrics (tiny tensors and a word-level tokenizer)."""

from __future__ import annotations

import math

import pytest
import torch

from graftune.tasks import batches, pad, task_name
from graftune.tasks.causal_lm import IGNORE, CausalLM, generation_metrics
from graftune.tasks.classification import (
    ClassifierHead,
    TextClassification,
    classification_loss,
    classification_metrics,
    encode_labels,
    pool,
)
from tests.train_helpers import write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), eos=True)


def test_batches_cover_every_example_once_and_group_by_length():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    examples = [{}] * len(lengths)
    got = list(batches(examples, lengths, 3, generator=torch.Generator().manual_seed(0)))
    assert sorted(i for b in got for i in b) == list(range(10))
    # sorted by length before cutting: inside a batch the lengths are neighbours
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in got)


def test_batches_are_seeded_and_evaluation_order_is_longest_first():
    lengths = [1] * 20
    a = list(batches([{}] * 20, lengths, 4, generator=torch.Generator().manual_seed(1)))
    b = list(batches([{}] * 20, lengths, 4, generator=torch.Generator().manual_seed(1)))
    c = list(batches([{}] * 20, lengths, 4, generator=torch.Generator().manual_seed(2)))
    assert a == b and a != c
    ev = list(batches([{}] * 4, [2, 9, 5, 1], 2))
    assert ev == [[1, 2], [0, 3]]


def test_pad_right_and_left():
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], 0, left=True).tolist() == [[1, 2, 3], [0, 0, 4]]


def test_task_names_and_aliases():
    assert task_name("text") == "classification" and task_name("pairs") == "causal-lm"
    from graftune.errors import ConfigError

    with pytest.raises(ConfigError, match="task"):
        task_name("regression")


def test_mean_pooling_ignores_padding_and_last_pooling_finds_the_last_real_token():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, mask, "last"), torch.stack([h[0, 1], h[1, 2]]))
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.allclose(pool(h, left, "last")[0], h[0, 2])
    assert torch.allclose(pool(h, mask, "cls"), h[:, 0])
    # changing a padded position changes nothing
    h2 = h.clone()
    h2[0, 2] = 1e6
    assert torch.allclose(pool(h2, mask, "mean"), pool(h, mask, "mean"))


def test_text_classification_collates_with_dynamic_padding(tokenizer):
    task = TextClassification(tokenizer, ["money", "sport"], hidden_size=8, max_length=6)
    ex = task.encode(["goal", "bank market share price profit trade stock"], ["sport", "money"])
    assert len(ex[1]["input_ids"]) == 6  # truncated to max_length
    b = task.collate(ex[:1])
    assert b["input_ids"].shape == (1, 3)  # [CLS] goal [SEP]: padded to the batch's longest only
    assert b["labels"].tolist() == [1]
    full = task.collate(ex)
    assert full["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0]


def test_multilabel_labels_loss_and_metrics():
    y = encode_labels([["a"], ["a", "c"], []], ["a", "b", "c"], True)
    assert y == [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    logits = torch.zeros(3, 3)
    loss = classification_loss(logits, torch.tensor(y), True)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    m = classification_metrics([[1, 0, 0], [1, 0, 1]], [[1, 0, 0], [1, 0, 0]], ["a", "b", "c"], True)
    assert m["accuracy"] == 0.5 and m["per_class"]["c"]["recall"] == 0.0
    assert m["confusion_matrix"]["a"] == [[0, 0], [0, 2]]


def test_classification_metrics_single_label():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], ["x", "y", "z"])
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["x"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["accuracy_interval"] == pytest.approx(wilson(3, 4))


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson's score interval written out (Wilson 1927), to check the library's against."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


@pytest.mark.parametrize("k, n", [(9, 14), (0, 10), (10, 10), (480, 500)])
def test_accuracy_interval_is_wilsons_and_stays_in_range(k, n):
    from graftune.tasks.classification import accuracy_interval

    low, high = accuracy_interval(k, n)
    assert [low, high] == pytest.approx(wilson(k, n), abs=1e-6)
    assert 0.0 <= low <= k / n <= high <= 1.0 and high - low > 0
    assert accuracy_interval(0, 0) is None


def test_accuracy_interval_narrows_with_more_examples():
    from graftune.tasks.classification import accuracy_interval, format_accuracy

    few, many = accuracy_interval(9, 14), accuracy_interval(900, 1400)
    assert few[1] - few[0] > 0.4 and many[1] - many[0] < 0.06
    assert format_accuracy({"accuracy": 9 / 14, "accuracy_interval": few}) == \
        "accuracy 0.643 (95% interval 0.388-0.837)"
    assert format_accuracy({"accuracy": 0.5}) == "accuracy 0.500"  # metrics written before the interval existed


def test_head_is_dropout_then_linear():
    torch.manual_seed(0)
    head = ClassifierHead(4, 3, dropout=0.5).eval()
    x = torch.randn(2, 4)
    assert torch.allclose(head(x), head.linear(x))
    assert head.in_features == 4 and head.num_labels == 3


def test_causal_lm_labels_cover_the_response_only(tokenizer):
    task = CausalLM(tokenizer, max_length=64)
    [ex] = task.encode([("the bank", "money")])
    n_prompt = len(task.prompt_ids("the bank"))
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_causal_lm_loss_ignores_prompt_and_padding(tokenizer):
    task = CausalLM(tokenizer, max_length=64)
    batch = task.collate(task.encode([("the bank market", "money"), ("goal", "sport team")]))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 40)
    base = task.loss(logits, batch)
    # logits at positions that predict prompt tokens or padding do not matter
    changed = logits.clone()
    predicts_ignored = torch.cat([batch["labels"][:, 1:] == IGNORE, torch.ones(2, 1, dtype=torch.bool)], 1)
    changed[predicts_ignored] += 100.0
    assert task.loss(changed, batch).item() == pytest.approx(base.item())


def test_causal_lm_truncates_the_prompt_first(tokenizer):
    task = CausalLM(tokenizer, max_length=6)
    [ex] = task.encode([("the a of and to in is was for on", "bank")])
    assert len(ex["input_ids"]) == 6
    assert ex["labels"][-2:] == ex["input_ids"][-2:]  # the response and end token survive


def test_generation_metrics_json_rates():
    refs = ['{"city": "Porto", "country": "Portugal"}', '{"city": "Oslo", "country": "Norway"}']
    preds = ['{"country": "Portugal", "city": "Porto"}', "Oslo, Norway"]
    m = generation_metrics(preds, refs)
    assert m["json_valid_rate"] == 0.5 and m["json_match_rate"] == 0.5 and m["exact_match"] == 0.0
    assert "json_valid_rate" not in generation_metrics(["a"], ["plain text"])


def test_macro_f1_counts_only_the_classes_that_occur():
    from graftune.tasks.classification import classification_metrics

    names = ["a", "b", "c"]
    perfect_on_two = classification_metrics([0, 0, 1], [0, 0, 1], names)
    assert perfect_on_two["macro_f1"] == 1.0 and perfect_on_two["per_class"]["c"]["support"] == 0
    wrong_class = classification_metrics([0, 0], [0, 2], names)  # c was predicted: it counts, with F1 0
    assert wrong_class["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
