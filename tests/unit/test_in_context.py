"""In-context few-shot scoring on a tiny random Llama: the cached tree forward equals the plain full-prompt one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.recipes.in_context import FILE, InContextConfig, fit, load, select_examples

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant",
         "classify", "each", "text", "into", "one", "of", "these", "categories:", "answer", "with", "the",
         "category", "only.", "sport", "match", "business", "tech", "goal", "shares", "market", "chip", "phone",
         "team", "won", "a", "great", "new", "big", "label:"]

POOL = ["team won a goal", "great match", "the team won", "shares market", "big market", "new shares",
        "new chip", "phone chip", "a big phone"]
POOL_LABELS = ["sport"] * 3 + ["business"] * 3 + ["tech"] * 3


def tiny_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    if chat:
        tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


def tiny_lm(positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).eval()


def make(chat: bool = True, **options):
    options = {"k": 2, "seed": 0, "max_example_tokens": 3, "max_text_tokens": 6, **options}
    return fit(POOL, POOL_LABELS, ["business", "sport", "tech"], model=tiny_lm(), tokenizer=tiny_tokenizer(chat),
               **options)


# --- the cache is an optimization only ------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-template"])
def test_cached_tree_scores_equal_the_plain_full_prompt(chat):
    # answers of different lengths that share a first token: "sport match" vs "sport" would be scored wrongly
    # if a branch saw another branch's tokens or the positions were off
    model = make(chat, label_words={"sport": "sport match", "tech": "sport"}, texts_per_forward=3)
    texts = ["team won a great goal", "new phone", "", "shares market big new chip"]
    cached = model.label_scores(texts)  # 3 texts packed in one forward, then the last alone
    plain = model.label_scores(texts, use_cache=False)
    # fp32 throughout: the two paths differ only in the order of float additions (attention over one tree
    # forward vs. separate sequences), ~1e-6 on log-probabilities of order 10; 1e-4 leaves two orders of margin
    # and is far below the gaps between labels (> 1e-2 here)
    np.testing.assert_allclose(cached, plain, atol=1e-4, rtol=0)
    assert np.abs(cached[:, None, :] - cached[:, :, None]).max() > 1e-2
    assert cached.shape == (4, 3) and (cached < 0).all()
    assert model.cost["prefix_tokens"] == len(model.prefix_ids) > 20


def test_the_prefix_cache_is_not_changed_by_scoring_and_packing_changes_nothing():
    model = make(texts_per_forward=1)
    alone = model.label_scores(["phone chip"])
    after = model.label_scores(["team won", "big market", "phone chip"])
    np.testing.assert_array_equal(alone, after[2:])
    packed = make(texts_per_forward=8).label_scores(["team won", "big market", "phone chip"])
    np.testing.assert_allclose(packed, after, atol=1e-5, rtol=0)  # fp32 rounding only (tree vs one text)


def test_mean_score_divides_by_answer_tokens():
    summed = make(label_words={"sport": "sport match"}).label_scores(["great goal"])
    mean = make(label_words={"sport": "sport match"}, score="mean").label_scores(["great goal"])
    # answers: business <|im_end|> (2 tokens), sport match <|im_end|> (3), tech <|im_end|> (2)
    np.testing.assert_allclose(mean, summed / np.array([2, 3, 2]), rtol=1e-6)


def test_predict_proba_is_a_distribution_in_label_order():
    model = make()
    p = model.predict_proba(["team won", "phone chip", "shares"])
    assert p.shape == (3, 3) and np.allclose(p.sum(axis=1), 1) and (p > 0).all()
    scores = model.label_scores(["team won", "phone chip", "shares"])
    assert (p.argmax(axis=1) == scores.argmax(axis=1)).all()
    assert model.cost["texts"] == 3 and model.cost["seconds_per_text"] > 0
    assert model.predict(["team won"]) == [model.label_names[int(scores[0].argmax())]]


def test_calibration_divides_by_the_content_free_probabilities():
    plain, calibrated = make(), make(calibrate=True)
    texts = ["team won", "new chip"]
    bias = calibrated.label_scores(["N/A", "", "[MASK]"]).mean(axis=0)
    expected = torch.softmax(torch.tensor(plain.label_scores(texts) - bias), dim=1).numpy()
    np.testing.assert_allclose(calibrated.predict_proba(texts), expected, rtol=1e-6)


# --- examples and prompt --------------------------------------------------------------------------------------
def test_select_examples_is_balanced_seeded_and_interleaved():
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 2
    idx = select_examples(labels, ["a", "b", "c"], k=4, seed=3)
    assert sorted(labels[i] for i in idx) == ["a"] * 4 + ["b"] * 4 + ["c"] * 2  # c has only 2
    assert len(set(idx)) == len(idx) and idx == select_examples(labels, ["a", "b", "c"], k=4, seed=3)
    assert idx != select_examples(labels, ["a", "b", "c"], k=4, seed=4)
    assert [labels[i] for i in idx] != sorted(labels[i] for i in idx)  # shuffled, not grouped by class
    assert select_examples(labels, ["a", "b", "c"], k=0, seed=0) == []


def test_prompt_holds_the_examples_and_label_words():
    model = make(label_words={"sport": "sport match"})
    assert len(model.examples) == 6 and sorted(lab for _, lab in model.examples) == ["business"] * 2 + [
        "sport"] * 2 + ["tech"] * 2
    assert model.prompt_prefix.startswith("<|im_start|> system Classify each text into one of these categories: "
                                          "business, sport match, tech")
    assert model.prompt_prefix.count("<|im_start|> assistant sport match <|im_end|>") == 2
    # example texts are cut to max_example_tokens (3): "team won a goal" -> "team won a"
    assert "team won a goal" not in model.prompt_prefix
    zero = make(k=0)
    assert zero.examples == [] and zero.label_scores(["team"]).shape == (1, 3)


# --- data-only save / load ------------------------------------------------------------------------------------
def test_save_load_round_trip_is_json_and_scores_the_same(tmp_path):
    model = make(label_words={"sport": "sport match"}, calibrate=True)
    out = model.save(tmp_path / "icl")
    assert sorted(p.name for p in out.iterdir()) == [FILE]
    data = json.loads((out / FILE).read_text(encoding="utf-8"))
    assert data["format"] == "graftune-in-context" and data["model"] is None
    assert data["label_names"] == ["business", "sport", "tech"] and len(data["examples"]) == 6
    assert data["config"]["label_words"] == {"sport": "sport match"} and data["prompt_prefix"] == model.prompt_prefix
    again = load(out, model=tiny_lm(), tokenizer=tiny_tokenizer())
    texts = ["team won", "new phone chip"]
    np.testing.assert_allclose(again.predict_proba(texts), model.predict_proba(texts), rtol=1e-6)
    model.save(out)  # its own earlier directory may be replaced


def test_load_errors_are_one_line(tmp_path):
    model = make()
    out = model.save(tmp_path / "icl")
    with pytest.raises(ArtifactError, match="fitted on a model passed in code: pass the same model"):
        load(out)
    with pytest.raises(ArtifactError, match="differs from the saved one"):
        load(out, model=tiny_lm(), tokenizer=tiny_tokenizer(chat=False))
    with pytest.raises(ArtifactError, match="holds no in_context.json"):
        load(tmp_path)
    (out / FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        load(out, model=tiny_lm(), tokenizer=tiny_tokenizer())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        model.save(mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_user_errors():
    with pytest.raises(ConfigError, match="unknown in-context option 'shots'"):
        make(shots=3)
    with pytest.raises(ConfigError, match="score='max'"):
        InContextConfig(score="max")
    with pytest.raises(ConfigError, match="label_words names 'cars', which is not a label"):
        make(label_words={"cars": "car"})
    with pytest.raises(ConfigError, match="label words must differ"):
        make(label_words={"sport": "tech"})
    with pytest.raises(DataError, match="label 'sport' is not among the label names"):
        fit(POOL, POOL_LABELS, ["business", "tech"], model=tiny_lm(), tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="needs up to .* tokens but the model reads 64; lower k"):
        fit(POOL, POOL_LABELS, model=tiny_lm(positions=64), tokenizer=tiny_tokenizer(), k=3)
