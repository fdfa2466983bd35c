"""Augmentation: text edits, embedding-space neighbours, LM synthesis (mocked and on a tiny Llama), image ops and
mixup. Everything seeded and offline."""

from __future__ import annotations

import pytest
import torch

from graftune.data.augment import embedding as emb_aug
from graftune.data.augment import image as img
from graftune.data.augment import text as txt
from graftune.errors import ConfigError, DataError
from tests.conftest import tiny_bert, tiny_llama

SENTENCE = ("The national football team won the final match after a late goal from their young striker in "
            "front of a huge crowd at the stadium")
TEXTS = [SENTENCE, "Shares in the bank fell sharply after the company reported weak quarterly profits and lower sales"]
LABELS = ["sport", "business"]


# --- text: EDA and character noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["swap", "delete", "insert"])
def test_eda_each_op_changes_text_but_keeps_most_words(op):
    out = txt.eda(TEXTS, LABELS, n_per_example=3, p=0.1, ops=[op], seed=0)
    assert len(out) == 6 and out.labels == ["sport"] * 3 + ["business"] * 3 and out.source == [0, 0, 0, 1, 1, 1]
    for new, src in zip(out.texts, out.source):
        before, after = TEXTS[src].split(), new.split()
        assert new != TEXTS[src]
        assert txt._changed_fraction(before, after) <= 0.35
    assert out.record["op"] == "eda" and out.record["ops"][op] == 6 and out.record["new"] == 6


def test_eda_is_deterministic_per_seed():
    a = txt.eda(TEXTS, LABELS, seed=3).texts
    assert a == txt.eda(TEXTS, LABELS, seed=3).texts
    assert a != txt.eda(TEXTS, LABELS, seed=4).texts


def test_eda_rejects_bad_options():
    with pytest.raises(ConfigError, match="ops"):
        txt.eda(TEXTS, LABELS, ops=["shuffle"])
    with pytest.raises(ConfigError, match="neighbours"):
        txt.eda(TEXTS, LABELS, ops=["substitute"])
    with pytest.raises(DataError, match="labels"):
        txt.eda(TEXTS, LABELS[:1])
    with pytest.raises(ConfigError, match="p:"):
        txt.eda(TEXTS, LABELS, p=1.5)


def test_word_helpers():
    import random

    words = ["a", "b", "c", "d", "e"]
    assert sorted(txt.random_swap(words, 2, random.Random(0))) == sorted(words)
    deleted = txt.random_delete(words, 0.0, random.Random(0))
    assert len(deleted) == 4 and set(deleted) < set(words)  # p=0 still drops one word
    assert txt.random_delete(["only"], 0.9, random.Random(0)) == ["only"]
    assert len(txt.random_insert(words, 2, random.Random(0))) == 7


def test_char_noise_changes_letters_not_word_count():
    out = txt.char_noise(TEXTS, LABELS, p=0.1, n_per_example=2, seed=1)
    assert out.texts == txt.char_noise(TEXTS, LABELS, p=0.1, n_per_example=2, seed=1).texts
    for new, src in zip(out.texts, out.source):
        assert new != TEXTS[src]
        assert len(new.split()) == len(TEXTS[src].split())
        changed = sum(a != b for a, b in zip(new.split(), TEXTS[src].split()))
        assert 1 <= changed <= len(TEXTS[src].split()) // 3


# --- text: embedding-space neighbours --------------------------------------------------------------------------

WORDS = ["cat", "kitten", "dog", "car", "truck", "bus", "the", "sat", "##s", "!"]


def hand_built_neighbours(**kw):
    """A tiny BERT whose input embeddings are set by hand: cat ~ kitten > dog; car ~ truck > bus; subword and
    special tokens are copies of "cat" and must never be returned."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    model = tiny_bert()
    e = torch.eye(32)
    rows = {"cat": e[0], "kitten": e[0] + 0.1 * e[1], "dog": e[0] + 0.8 * e[1], "car": e[2],
            "truck": e[2] + 0.2 * e[3], "bus": e[2] + 0.6 * e[3], "the": e[5], "sat": e[6], "##s": e[0],
            "[MASK]": e[0], "!": e[0]}
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        for w, v in rows.items():
            weight[vocab.index(w)] = v
    return txt.EmbeddingNeighbours(model, tok, **kw)


def test_neighbours_of_hand_built_embeddings():
    nb = hand_built_neighbours(k=2, min_similarity=0.0, distinct_stems=False)
    assert nb.words("cat") == ["kitten", "dog"]
    assert nb.words("Cat") == ["kitten", "dog"]  # the tokenizer lowercases
    assert nb.words("car") == ["truck", "bus"]
    assert nb.words("bus") == ["truck", "car"]
    assert nb.words("zebra") == []  # not a vocabulary word
    assert "s" not in nb._row and "mask" not in nb._row  # subword pieces and special tokens are skipped
    sims = dict(nb.neighbours("cat"))
    assert sims["kitten"] > sims["dog"] > 0.5


def test_neighbours_min_similarity_and_stems():
    nb = hand_built_neighbours(k=5, min_similarity=0.9, distinct_stems=False)
    assert nb.words("cat") == ["kitten"]
    assert txt._same_stem("film", "films") and txt._same_stem("rise", "rising") and not txt._same_stem("rise", "rose")


def test_word_of_vocab_conventions():
    assert txt._word_of("##ing", True) is None and txt._word_of("running", True) == "running"
    assert txt._word_of("▁hello", False) == "hello" and txt._word_of("Ġworld", False) == "world"
    assert txt._word_of("llo", False) is None and txt._word_of("▁42", False) is None


def test_neighbour_substitute_uses_neighbours_and_keeps_case():
    nb = hand_built_neighbours(k=2, min_similarity=0.0, distinct_stems=False)
    out = txt.neighbour_substitute(["Cat sat", "the car"], ["a", "b"], nb, p=1.0, seed=0)
    assert out.texts[0].split()[0] in ("Kitten", "Dog")
    assert out.texts[1].split()[1] in ("truck", "bus") and out.texts[1].startswith("the ")  # stop word kept
    assert out.record["substitutions"]
    ops = txt.eda(["the cat sat"], ["a"], ops=["substitute", "insert"], neighbours=nb, n_per_example=4, seed=0)
    assert all(t != "the cat sat" for t in ops.texts)


# --- text: synthesis with a language model ---------------------------------------------------------------------

EXAMPLES = {"sport": ["The team won the cup final", "A late goal decided the match"],
            "business": ["Shares fell after weak profits", "The bank raised interest rates"]}


def keyword_classifier(texts):
    return ["sport" if any(w in t.lower() for w in ("goal", "match", "team")) else "business" for t in texts]


def test_synthesis_filter_drops_inconsistent_examples():
    calls = []

    def generator(prompts):
        calls.append(prompts)
        # the first prompt of each class gets an on-topic answer, the second an off-topic one
        answers = ["The striker scored a goal in the match", "Profits rose at the bank this quarter",
                   "Oil prices rose and the bank gained", "The team celebrated a goal at the match"]
        return answers[:len(prompts)]

    out = txt.synthesize_with_lm(generator, None, EXAMPLES, n_per_class=2, seed=0, filter_model=keyword_classifier)
    assert out.texts == ["The striker scored a goal in the match", "Oil prices rose and the bank gained"]
    assert out.labels == ["sport", "business"] and out.source == [-1, -1]
    rec = out.record
    assert rec["asked"] == 4 and rec["kept"] == 2
    assert rec["per_class"]["sport"] == {"asked": 2, "kept": 1, "rejected_by_filter": 1}
    assert {r["predicted"] for r in rec["rejected_samples"]} == {"sport", "business"}
    # prompts are chat messages that name the class and show its examples
    user = calls[0][0][-1]["content"]
    assert '"sport"' in user and ("team won" in user or "late goal" in user)


def test_synthesis_drops_short_and_duplicate_and_is_seeded():
    def generator(prompts):
        return ["ok", "The team won the cup final", "A brand new text about markets and shares", "\"\""]

    out = txt.synthesize_with_lm(generator, None, EXAMPLES, n_per_class=2, seed=0, min_words=3)
    assert out.texts == ["A brand new text about markets and shares"]
    assert out.record["dropped"] == {"empty_or_short": 2, "duplicate": 1}
    seen = []
    for _ in range(2):
        txt.synthesize_with_lm(lambda p: seen.append(p) or ["x"] * len(p), None, EXAMPLES, n_per_class=3, seed=5)
    assert seen[0] == seen[1]


def tiny_chat_tokenizer():
    """A word-level tokenizer of < 120 entries with a ChatML-style template, for the tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant",
             *sorted({w.strip('.,:"').lower() for texts in EXAMPLES.values() for t in texts for w in t.split()}),
             "here", "are", "texts", "of", "category", "example", "write", "one", "new", "text", "answer", "with"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    assert len(vocab) < 120
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


def test_synthesis_runs_on_a_tiny_llama():
    model, tok = tiny_llama(), tiny_chat_tokenizer()
    out = txt.synthesize_with_lm(model, tok, EXAMPLES, n_per_class=2, seed=0, max_new_tokens=6, min_words=1,
                                 filter_model=keyword_classifier)
    again = txt.synthesize_with_lm(model, tok, EXAMPLES, n_per_class=2, seed=0, max_new_tokens=6, min_words=1,
                                   filter_model=keyword_classifier)
    assert out.record["asked"] == 4 and out.texts == again.texts
    assert all(lab == keyword_classifier([t])[0] for t, lab in zip(out.texts, out.labels))


def test_synthesis_rejects_bad_input():
    with pytest.raises(ConfigError, match="n_per_class"):
        txt.synthesize_with_lm(lambda p: [], None, EXAMPLES, n_per_class=0)
    with pytest.raises(DataError, match="examples_by_class"):
        txt.synthesize_with_lm(lambda p: [], None, {"a": []}, n_per_class=1)
    with pytest.raises(DataError, match="returned"):
        txt.synthesize_with_lm(lambda p: [], None, EXAMPLES, n_per_class=1)
    with pytest.raises(ConfigError, match="tokenizer"):
        txt.synthesize_with_lm(tiny_llama(), None, EXAMPLES, n_per_class=1)


# --- images ----------------------------------------------------------------------------------------------------


def images(b=4, c=3, h=8, w=10, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


GEOMETRIC = {
    "hflip": lambda x, y, g: img.hflip(x, y, generator=g),
    "vflip": lambda x, y, g: img.vflip(x, y, generator=g),
    "random_crop": lambda x, y, g: img.random_crop(x, y, padding=2, generator=g),
    "random_crop_constant": lambda x, y, g: img.random_crop(x, y, padding=2, fill=0.0, generator=g),
    "rotate": lambda x, y, g: img.rotate(x, y, degrees=30, generator=g),
    "color_jitter": lambda x, y, g: img.color_jitter(x, y, generator=g),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_image_ops_are_seeded_and_keep_shape_and_labels(name):
    x, y = images(), torch.tensor([0, 1, 2, 1])
    op = GEOMETRIC[name]
    a, y_out, rec = op(x, y, torch.Generator().manual_seed(7))
    b, _, _ = op(x, y, torch.Generator().manual_seed(7))
    c, _, _ = op(x, y, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and not torch.equal(a, c)
    assert y_out is y and rec["op"] in name
    assert torch.equal(x, images())  # never in place


def test_image_op_identities():
    x = images()
    assert torch.equal(img.hflip(x, p=1.0)[0], x.flip(-1)) and torch.equal(img.hflip(x, p=0.0)[0], x)
    assert torch.equal(img.vflip(x, p=1.0)[0], x.flip(-2))
    assert torch.equal(img.random_crop(x, padding=0)[0], x)
    assert torch.allclose(img.rotate(x, degrees=0.0)[0], x, atol=1e-6)
    assert torch.allclose(img.color_jitter(x, brightness=0, contrast=0, saturation=0)[0], x, atol=1e-6)
    out = img.color_jitter(x, brightness=0.9, contrast=0.9, saturation=0.9, generator=torch.Generator().manual_seed(0))
    assert out[0].min() >= 0 and out[0].max() <= 1


def test_rotate_is_a_rotation_on_a_non_square_image():
    # a bright dot right of centre, rotated by about 90 degrees, lands above or below the centre
    x = torch.zeros(1, 1, 21, 31)
    x[0, 0, 10, 20] = 1.0
    g = torch.Generator().manual_seed(0)
    out, _, rec = img.rotate(x, degrees=90, generator=g)
    angle = rec["mean_abs_angle"]
    ys, xs = torch.nonzero(out[0, 0] > 0.05, as_tuple=True)
    dy, dx = ys.float().mean() - 10, xs.float().mean() - 15
    assert abs(float(torch.hypot(dy, dx)) - 5) < 1.0  # the distance to the centre is kept, in pixels
    assert abs(float(torch.rad2deg(torch.atan2(dy.abs(), dx.abs()))) - angle) < 8


def constant_batch(b=6):
    """Example i is the constant image i (so a mix of images reads off as a mix of their indices)."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).clone(), torch.arange(b)


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_mixing_labels_sum_to_one_and_match_the_pixels(op):
    x, y = constant_batch()
    fn = getattr(img, op)
    out, y_mix, rec = fn(x, y, num_classes=6, alpha=1.0, generator=torch.Generator().manual_seed(3))
    again = fn(x, y, num_classes=6, alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again[0]) and torch.equal(y_mix, again[1])
    assert torch.allclose(y_mix.sum(1), torch.ones(6))
    # each image's mean pixel is the label-weighted mean of the constants: cutmix's label weight is its area
    assert torch.allclose(out.mean(dim=(1, 2, 3)), y_mix @ torch.arange(6, dtype=torch.float32), atol=1e-5)
    assert rec["op"] == op and rec["examples"] == 6


def test_cutmix_pastes_one_box():
    x, y = constant_batch()
    out, y_mix, rec = img.cutmix(x, y, num_classes=6, alpha=1.0, generator=torch.Generator().manual_seed(1))
    partners = rec["partners"]
    assert any(p != i for i, p in enumerate(partners))
    for i in range(6):
        if partners[i] == i:  # pasted from itself: nothing visible changes, and the label stays
            assert torch.equal(out[i], x[i]) and torch.equal(y_mix[i], torch.eye(6)[i])
            continue
        pasted = out[i, 0] != i
        if pasted.any():
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            box = pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()  # a rectangle
        assert abs(1 - pasted.float().mean() - rec["lambda"][i]) < 1e-6


def test_image_ops_reject_bad_input():
    with pytest.raises(DataError, match="batch"):
        img.hflip(torch.rand(3, 8, 8))
    with pytest.raises(ConfigError, match="padding"):
        img.random_crop(images(), padding=20)
    with pytest.raises(ConfigError, match="num_classes"):
        img.mixup(images(), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DataError, match="labels"):
        img.mixup(images(), torch.tensor([0, 1, 0, 5]), num_classes=3)


# --- embeddings ------------------------------------------------------------------------------------------------


def test_embedding_mixup_vectors_and_hidden_states():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 16, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    g1 = torch.Generator().manual_seed(1)
    out, y_mix, rec = emb_aug.mixup_embeddings(h, y, num_classes=3, alpha=0.4, generator=g1)
    assert out.shape == h.shape and torch.allclose(y_mix.sum(1), torch.ones(8))
    partner = torch.tensor(rec["partners"])
    lam = y_mix[torch.arange(8), y]  # for rows whose partner has another class
    differs = y[partner] != y
    expected = lam[:, None] * h + (1 - lam[:, None]) * h[partner]
    assert torch.allclose(out[differs], expected[differs], atol=1e-6)
    again = emb_aug.mixup_embeddings(h, y, num_classes=3, alpha=0.4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again[0])
    seq, y_seq, _ = emb_aug.mixup_embeddings(torch.randn(4, 5, 16), torch.eye(4), generator=g)
    assert seq.shape == (4, 5, 16) and torch.allclose(y_seq.sum(1), torch.ones(4))


def test_beta_draws_are_seeded_and_in_range():
    a = emb_aug.beta(0.4, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, emb_aug.beta(0.4, 1000, torch.Generator().manual_seed(0)))
    assert a.min() >= 0 and a.max() <= 1 and abs(float(a.mean()) - 0.5) < 0.05
    with pytest.raises(ConfigError, match="alpha"):
        emb_aug.beta(0, 3)
