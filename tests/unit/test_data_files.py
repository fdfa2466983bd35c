"""User data files that are wrong in ways a QA pass found: each is refused in one line naming the problem and the fix
(or, where the file is fine but was misread, read right). Small valid files keep loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftune.data.sources import Dataset, load_data
from graftune.data.splits import make_splits
from tests.unit.test_data import data_error

SPORT = ["The striker scored twice", "The team won the cup", "Tennis star reaches the final", "Coach praises defence"]
TECH = ["Chip maker shows a new card", "Hackers breach a retailer", "Console sales beat forecasts", "Phones get faster"]


def csv_text(extra: str = "", header: str = "text,label") -> str:
    body = [f"{t},sport" for t in SPORT] + [f"{t},tech" for t in TECH]
    return "\n".join([header, *body]) + "\n" + extra


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def rows(label=lambda i: "sport" if i < 4 else "tech") -> list[dict]:
    return [{"text": t, "label": label(i)} for i, t in enumerate(SPORT + TECH)]


def text_dataset(per_class: dict[str, int]) -> Dataset:
    labels = [name for name, n in per_class.items() for _ in range(n)]
    return Dataset("text", [f"{name} example {i}" for i, name in enumerate(labels)], labels, sorted(per_class),
                   origin="synthetic")


# --- rows with more or fewer fields than the header ----------------------------------------------------------------


def test_an_unquoted_comma_in_a_text_is_refused_not_read_as_a_new_class(tmp_path):
    """csv.DictReader kept the row, the text's tail became the label: 'then fell sharply' was a class."""
    path = write(tmp_path / "d.csv", csv_text("Shares rose, then fell sharply,tech\n"))
    message = data_error(load_data, path)
    assert message.endswith("d.csv line 10: 3 fields but the header has 2; quote texts that contain commas"), message
    quoted = write(tmp_path / "ok.csv", csv_text('"Shares rose, then fell sharply",tech\n'))
    assert load_data(quoted).label_names == ["sport", "tech"]


def test_a_trailing_comma_on_a_row_is_refused_with_its_own_fix(tmp_path):
    path = write(tmp_path / "d.csv", csv_text("Shares rose,tech,\n"))
    assert data_error(load_data, path).endswith(
        "line 10: 3 fields but the header has 2; remove the trailing commas, or name the extra column in the header"
    )


def test_a_tsv_row_with_an_extra_tab_names_tabs(tmp_path):
    path = write(tmp_path / "d.tsv", csv_text("Shares rose\tthen fell\ttech\n").replace(",", "\t"))
    assert "line 10: 3 fields but the header has 2; quote texts that contain tabs" in data_error(load_data, path)


@pytest.mark.parametrize(("header", "row", "message"), [
    ("text,label", "A row without its label", "line 10: 1 field but the header has 2"),
    ("text,label,source", "A row without its source,tech", "line 10: 2 fields but the header has 3"),
], ids=["label", "unused-column"])  # a missing label read as "empty label"; a missing unused field passed silently
def test_a_row_with_fewer_fields_than_the_header_is_refused(tmp_path, header, row, message):
    tail = ",bbc" * (header.count(",") - 1)
    body = "".join(f"{t},sport{tail}\n" for t in SPORT) + "".join(f"{t},tech{tail}\n" for t in TECH)
    path = write(tmp_path / "d.csv", f"{header}\n{body}{row}\n")
    assert f"{message}; add the missing fields or remove the row" in data_error(load_data, path)


def test_blank_lines_and_unnamed_trailing_columns_still_load(tmp_path):
    """Spreadsheets export trailing delimiters (unnamed columns, repeated) and blank lines: nothing wrong there."""
    text = "text,label,,\n" + "".join(f"{t},sport,,\n" for t in SPORT) + "\n  \n" + "".join(f"{t},tech,,\n" for t in TECH)
    ds = load_data(write(tmp_path / "d.csv", text))
    assert len(ds) == 8 and ds.label_names == ["sport", "tech"]


# --- encodings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be-bom", "utf-32"])
def test_utf16_and_utf32_with_a_byte_order_mark_are_decoded(tmp_path, codec):
    """Excel's "Unicode text" is UTF-16 with a mark; it was refused with a latin-1 iconv line that made garbage."""
    text = csv_text("Café reopens in Zürich,tech\n")
    data = b"\xfe\xff" + text.encode("utf-16-be") if codec == "utf-16-be-bom" else text.encode(codec)
    (tmp_path / "d.csv").write_bytes(data)
    ds = load_data(str(tmp_path / "d.csv"))
    assert len(ds) == 9 and ds.label_names == ["sport", "tech"] and "Café reopens in Zürich" in ds.inputs


def test_utf16_without_a_mark_gets_the_utf16_fix_not_latin1(tmp_path):
    (tmp_path / "d.csv").write_bytes(csv_text().encode("utf-16-le"))
    message = data_error(load_data, str(tmp_path / "d.csv"))
    assert "iconv -f utf-16le -t utf-8" in message and "latin1" not in message


# --- the header ----------------------------------------------------------------------------------------------------


def test_a_column_named_twice_is_refused(tmp_path):
    path = write(tmp_path / "d.csv", "text,label,label\n" + "".join(f"{t},sport,x\n" for t in SPORT + TECH))
    assert data_error(load_data, path).endswith("the header names the column 'label' twice; rename or remove one "
                                                "of them")


def test_spaces_around_header_names_are_ignored(tmp_path):
    path = write(tmp_path / "d.csv", csv_text(header="text, label "))
    assert load_data(path).label_names == ["sport", "tech"]
    assert load_data(path, label_column=" label").label_names == ["sport", "tech"]
    spaced = write_jsonl(tmp_path / "d.jsonl", [{"text": r["text"], " label": r["label"]} for r in rows()])
    assert load_data(spaced).label_names == ["sport", "tech"]


# --- values --------------------------------------------------------------------------------------------------------


def test_json_labels_1_and_1_0_are_one_class(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(lambda i: [1, 1.0, 2, 2.0][i % 4]))
    ds = load_data(path)
    assert ds.label_names == ["1", "2"] and ds.counts() == {"1": 4, "2": 4}
    assert load_data(write_jsonl(tmp_path / "f.jsonl", rows(lambda i: [0.5, 1.5][i % 2]))).label_names == ["0.5", "1.5"]


def test_csv_labels_are_text_as_written(tmp_path):
    """A CSV cell is never parsed as a number: "1.0" there is a name, which may mean a version."""
    path = write(tmp_path / "d.csv", csv_text().replace(",sport", ",1").replace(",tech", ",1.0"))
    assert load_data(path).label_names == ["1", "1.0"]


@pytest.mark.parametrize("value", [{"a": "The striker scored"}, ["The striker", "scored"]], ids=["object", "array"])
def test_an_object_or_array_in_the_text_field_is_refused(tmp_path, value):
    records = rows()
    records[2]["text"] = value
    kind = "an object" if isinstance(value, dict) else "an array"
    message = data_error(load_data, write_jsonl(tmp_path / "d.jsonl", records))
    assert message.endswith(f"d.jsonl line 3: 'text' holds {kind}, not text; put the text itself there as a JSON "
                            "string")


def test_an_object_as_a_response_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Extract the city", "response": {"city": "Prague"}}])
    assert "line 1: 'response' holds an object, not text" in data_error(load_data, path)


# --- quoting -------------------------------------------------------------------------------------------------------


def test_a_quote_never_closed_is_named_where_it_opens(tmp_path):
    """It used to read as "line 3: empty label": the open quote swallows the rest of the file into one field."""
    path = write(tmp_path / "d.csv", 'text,label\n"unterminated,sport\nok,tech\n')
    assert "d.csv line 2: a quote opened here is never closed" in data_error(load_data, path)
    later = write(tmp_path / "e.csv", csv_text('"A quoted text\nover two lines",tech\n"It never ends,tech\nmore\n'))
    assert "e.csv line 12: a quote opened here is never closed" in data_error(load_data, later)
    last = write(tmp_path / "f.csv", csv_text('"still open,tech'))
    assert "f.csv line 10: a quote opened here is never closed" in data_error(load_data, last)


def test_closed_quotes_over_several_lines_still_load(tmp_path):
    path = write(tmp_path / "d.csv", csv_text('"A text with ""quotes""\nover two lines",tech\ntech,"a label\n"'))
    ds = load_data(path, dedup=False)
    assert 'A text with "quotes"\nover two lines' in ds.inputs and len(ds) == 10


# --- messages about classes ----------------------------------------------------------------------------------------


def test_a_text_column_read_as_the_labels_gets_a_short_message_about_the_label_column(tmp_path):
    """Every text became a class and the message listed all of them on one line."""
    texts = [f"Headline number {i} about something long enough to fill a line of a terminal" for i in range(60)]
    path = write(tmp_path / "d.csv", "text,label\n" + "".join(f"{t},{'ab'[i % 2]}\n" for i, t in enumerate(texts)))
    ds = load_data(path, label_column="text")
    for kwargs in ({}, {"shots": 8}, {"test_per_class": 1}):
        message = data_error(make_splits, ds, **kwargs)
        assert "nearly every label is unique (60 classes in 60 examples" in message and "--label-column" in message
        assert len(message) < 400, message


def test_many_small_classes_are_listed_up_to_ten_with_the_verb_agreeing(tmp_path):
    ds = text_dataset({**{f"c{i:02d}": 1 for i in range(15)}, "big": 40})
    message = data_error(make_splits, ds)
    assert "c09 (1) ... and 5 more have too few examples to hold one out for a test set" in message, message
    assert "c10" not in message
    two = data_error(make_splits, text_dataset({"a": 10, "b": 1, "c": 1}))
    assert "b (1), c (1) have too few examples" in two


def test_a_text_repeated_under_another_label_is_counted_and_warned_about(tmp_path):
    from graftune.data.checks import split_warnings
    from graftune.data.sources import load_data

    path = tmp_path / "conflict.csv"
    path.write_text("text,label\ngoal scored,sport\nbank rates,money\ngoal scored,money\nbank rates,money\n"
                    "chip maker,tech\n")
    ds = load_data(str(path))
    assert (len(ds), ds.duplicates_removed, ds.conflicts_removed) == (3, 2, 1)
    (line,) = split_warnings({"conflicting_duplicates_removed": ds.conflicts_removed})
    assert line.startswith("1 repeated text had another label than its first copy and was dropped")


def test_empty_texts_are_dropped_and_counted_with_where_they_were(tmp_path):
    """A row whose text is empty or whitespace only has nothing to classify: loading drops it, keeps where it was
    (the line an editor shows, the header being line 1; JSONL lines; Parquet rows from 0), and the run's data card
    and warnings say how many and where, as they say the duplicates dropped under another label."""
    from graftune.data.card import data_card
    from graftune.data.checks import split_warnings

    path = write(tmp_path / "gaps.csv", csv_text(',sport\n   ,tech\n"",tech\n'))  # lines 10, 11 and 12
    ds = load_data(path)
    assert len(ds) == 8 and all(t.strip() for t in ds.inputs)
    assert ds.empty_texts_removed == ("line 10", "line 11", "line 12")
    card = data_card(make_splits(ds, test_size=2, val_size=0), source=ds)
    assert card["checks"]["empty_texts_removed"] == {path: {"count": 3, "where": ["line 10", "line 11", "line 12"]}}
    assert f"{path}: 3 rows with an empty text were dropped (line 10, line 11, line 12); fill them in or remove " \
           "them" in split_warnings(card["checks"])
    (line,) = split_warnings({"empty_texts_removed": {"m.csv": {"count": 5, "where": ["line 2", "line 7", "line 9"]},
                                                      "t.csv": {"count": 1, "where": ["line 4"]}}})[:1]
    assert line == "m.csv: 5 rows with an empty text were dropped (line 2, line 7, line 9, ...); fill them in or " \
                   "remove them"
    assert split_warnings({"empty_texts_removed": {"t.csv": {"count": 1, "where": ["line 4"]}}}) == [
        "t.csv: 1 row with an empty text was dropped (line 4); fill it in or remove it"]
    jsonl = write_jsonl(tmp_path / "gaps.jsonl", rows()[:3] + [{"text": " \n", "label": "tech"}] + rows()[3:])
    assert load_data(jsonl).empty_texts_removed == ("line 4",) and len(load_data(jsonl)) == 8
    # graftune check reads the file as it is
    assert load_data(path, dedup=False, drop_empty=False).inputs[-3:] == ["", "   ", ""]


def test_empty_texts_in_a_parquet_table_name_their_row_and_a_file_of_only_empty_texts_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = rows()
    table.insert(2, {"text": "", "label": "sport"})
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "d.parquet")
    assert load_data(str(tmp_path / "d.parquet")).empty_texts_removed == ("row 2",)
    blank = write(tmp_path / "blank.csv", "text,label\n,sport\n  ,tech\n")
    assert data_error(load_data, blank) == (f"{blank}: every text in column 'text' is empty (2 rows); fill them in, "
                                            "or pick the text column with --text-column NAME")


def test_a_run_from_before_empty_texts_were_dropped_rebuilds_its_own_splits(tmp_path):
    """A run trained when empty texts were kept has a data card without "empty_texts_removed": its unchanged file
    rebuilds the splits it recorded (not "changed since the run was trained"); a card that has the key drops them."""
    from graftune.config import RunConfig
    from graftune.data.card import data_card
    from graftune.data.splits import run_splits

    path = write(tmp_path / "gaps.csv", csv_text(',sport\n   ,tech\n'))
    cfg = RunConfig(model="m", data=path, test_size=2, val_size=0)
    old = load_data(path, drop_empty=False)  # what that run trained on
    card = data_card(make_splits(old, **cfg.split_args()), source=old)
    del card["checks"]["empty_texts_removed"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data_card.json").write_text(json.dumps(card))
    rebuilt = run_splits(cfg, run_dir=tmp_path / "run")
    assert "" in rebuilt.train.inputs + rebuilt.test.inputs  # the run's own examples, empty ones included
    new = load_data(path)
    (tmp_path / "run" / "data_card.json").write_text(json.dumps(data_card(make_splits(new, **cfg.split_args()),
                                                                          source=new)))
    assert all(t.strip() for t in run_splits(cfg, run_dir=tmp_path / "run").train.inputs)


def test_a_null_text_is_dropped_as_an_empty_one_is(tmp_path):
    """Review: a JSONL null (or a Parquet null) text stopped the load with 'no value in column', while "" was dropped
    with a counted warning; both are empty texts."""
    path = write_jsonl(tmp_path / "nulls.jsonl", rows()[:3] + [{"text": None, "label": "tech"}] + rows()[3:])
    ds = load_data(path)
    assert len(ds) == 8 and ds.empty_texts_removed == ("line 4",)
