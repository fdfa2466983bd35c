"""The data layer on tiny files written here: loading, errors, splits, shots, data card. Offline and fast."""

from __future__ import annotations

import builtins
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graftune.data.card import data_card, fingerprint
from graftune.data.sources import ALIASES, Dataset, load_data
from graftune.data.splits import check_labels, make_splits, sample_shots
from graftune.errors import DataError

BUILTIN = Path(__file__).resolve().parents[2] / "src" / "graftune" / "data" / "builtin"


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def text_rows(per_class: dict[str, int]) -> list[dict]:
    return [
        {"text": f"{label} example number {i}", "label": label} for label, n in per_class.items() for i in range(n)
    ]


def text_dataset(per_class: dict[str, int]) -> Dataset:
    rows = text_rows(per_class)
    return Dataset(
        modality="text",
        inputs=[r["text"] for r in rows],
        labels=[r["label"] for r in rows],
        label_names=sorted(per_class),
        origin="synthetic",
    )


def data_error(fn, *args, **kwargs) -> str:
    """Call fn, expect a DataError, and return its message (which must be one line)."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading ------------------------------------------------------------------------------------------------------


def test_csv_tsv_jsonl_json_load_the_same_examples(tmp_path):
    rows = text_rows({"ham": 3, "spam": 2})
    write_csv(tmp_path / "d.csv", rows)
    write_csv(tmp_path / "d.tsv", rows, delimiter="\t")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "cols.json").write_text(
        json.dumps({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}), encoding="utf-8"
    )
    loaded = [load_data(str(tmp_path / n)) for n in ("d.csv", "d.tsv", "d.jsonl", "d.json", "cols.json")]
    for ds in loaded:
        assert ds.modality == "text" and not ds.multi_label
        assert ds.inputs == [r["text"] for r in rows]
        assert ds.labels == [r["label"] for r in rows]
        assert ds.label_names == ["ham", "spam"]
        assert ds.counts() == {"ham": 3, "spam": 2}
        assert len(ds.sha256) == 64
    assert loaded[0].origin == str(tmp_path / "d.csv")


def test_custom_columns_and_integer_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"t{i}", "y": i % 2}) + "\n" for i in range(4)), encoding="utf-8")
    ds = load_data(str(path), text_column="body", label_column="y")
    assert ds.labels == ["0", "1", "0", "1"] and ds.label_names == ["0", "1"]


def test_csv_with_bom_quotes_and_long_fields(tmp_path):
    long_text = "word " * 40_000  # over csv's default 128 KiB field limit
    rows = [{"text": long_text, "label": "a"}, {"text": 'says "hi", then\nleaves', "label": "b"}]
    path = write_csv(tmp_path / "d.csv", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load_data(str(path))
    assert ds.inputs == [long_text, 'says "hi", then\nleaves']


def test_pairs_are_inferred_from_prompt_and_response_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    ds = load_data(str(path))
    assert ds.modality == "pairs" and ds.inputs[0] == ("q0", "a0") and ds.labels == [] and ds.counts() == {}


def test_builtin_aliases_are_listed():
    assert set(ALIASES) == {"bbc-news", "json-answers", "mnist-5k", "trec", "rotten-tomatoes", "sms-spam",
                            "convention-2012", "digits"}


def test_json_answers_is_shipped_and_regenerates_byte_for_byte():
    spec = importlib.util.spec_from_file_location("make_json_answers", BUILTIN / "make_json_answers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (BUILTIN / "json_answers.jsonl").read_text(encoding="utf-8")
    assert module.render(module.generate()) == shipped
    assert len(shipped.encode()) < 100_000

    ds = load_data("json-answers")
    assert ds.modality == "pairs" and 150 <= len(ds) <= 300 and ds.duplicates_removed == 0
    for prompt, response in ds.inputs:
        answer = json.loads(response)
        assert list(answer) == ["city", "country"]
        assert answer["city"] in prompt and answer["country"] in prompt


# --- multi-label --------------------------------------------------------------------------------------------------


def test_multi_label_from_pipes_json_lists_and_csv_cells(tmp_path):
    write_csv(tmp_path / "m.csv", [{"text": "x", "label": "a|b"}, {"text": "y", "label": "c"}])
    write_csv(tmp_path / "j.csv", [{"text": "x", "label": '["a", "b"]'}, {"text": "y", "label": ""}])
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"text": "x", "label": ["b", "a"]}) + "\n" + json.dumps({"text": "y", "label": "c"}) + "\n"
    )
    pipes, cells, lists = (load_data(str(tmp_path / n)) for n in ("m.csv", "j.csv", "m.jsonl"))
    assert pipes.multi_label and pipes.labels == [["a", "b"], ["c"]] and pipes.label_names == ["a", "b", "c"]
    assert cells.multi_label and cells.labels == [["a", "b"], []]
    assert lists.multi_label and lists.labels == [["a", "b"], ["c"]]
    assert pipes.counts() == {"a": 1, "b": 1, "c": 1}


def test_multi_label_switch(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"text": "x", "label": "a|b"}, {"text": "y", "label": "c"}])
    literal = load_data(str(path), multi_label=False)
    assert not literal.multi_label and literal.labels == ["a|b", "c"]
    forced = load_data(str(write_csv(tmp_path / "s.csv", text_rows({"a": 1, "b": 1}))), multi_label=True)
    assert forced.multi_label and forced.labels == [["a"], ["b"]]
    listed = tmp_path / "l.jsonl"
    listed.write_text(json.dumps({"text": "x", "label": ["a", "b"]}) + "\n" + json.dumps({"text": "y", "label": "a"}))
    assert "line 1" in data_error(load_data, str(listed), multi_label=False)


# --- loading errors -----------------------------------------------------------------------------------------------


def test_missing_file_and_unknown_alias(tmp_path):
    assert "no such file" in data_error(load_data, str(tmp_path / "nope.csv"))
    message = data_error(load_data, "bbc")
    assert "unknown data alias 'bbc'" in message and "bbc-news, convention-2012, digits, json-answers" in message


def test_unsupported_suffix_and_unknown_task(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"x")
    assert ".csv" in data_error(load_data, str(tmp_path / "d.xlsx"))
    assert "unknown task 'regression'" in data_error(load_data, "json-answers", task="regression")
    assert "pairs data" in data_error(load_data, "json-answers", task="image")


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_csv(tmp_path / "data.csv", text_rows({"a": 2, "b": 2}))
    message = data_error(load_data, str(path), text_column="txt")
    assert message == f"{path}: no text column 'txt'; columns found: text, label. Use --text-column NAME"
    assert "--label-column" in data_error(load_data, str(path), label_column="y")


def test_wrong_delimiter_gets_a_hint(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nhello;a\nbye;b\n")
    assert "delimiter" in data_error(load_data, str(path))


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header.csv").write_text("text,label\n")
    assert "empty" in data_error(load_data, str(tmp_path / "empty.csv"))
    assert "empty" in data_error(load_data, str(tmp_path / "blank.jsonl"))
    assert "no examples" in data_error(load_data, str(tmp_path / "header.csv"))


def test_one_class_only(tmp_path):
    path = write_csv(tmp_path / "d.csv", text_rows({"spam": 4}))
    assert "needs at least 2 classes" in data_error(load_data, str(path))


def test_empty_label_names_the_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": ""}])
    assert "line 3: empty label" in data_error(load_data, str(path))


def test_undecodable_text_names_line_and_byte(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nhello,a\ncaf" + b"\xe9,b\n")
    message = data_error(load_data, str(path))
    assert "not UTF-8 at line 3 (byte offset 22)" in message and "iconv" in message


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"\n')
    assert "line 3: not valid JSON" in data_error(load_data, str(path))
    path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
    assert "line 2: expected a JSON object" in data_error(load_data, str(path))


def test_bad_json_document(tmp_path):
    (tmp_path / "d.json").write_text('{"text": "a"')
    (tmp_path / "s.json").write_text('"just a string"')
    assert "not valid JSON" in data_error(load_data, str(tmp_path / "d.json"))
    assert "list of records" in data_error(load_data, str(tmp_path / "s.json"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    assert "pip install pyarrow" in data_error(load_data, str(tmp_path / "d.parquet"))


def test_dataset_dict_folder_asks_for_one_split(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    message = data_error(load_data, str(tmp_path / "dd"))
    assert "splits train, test" in message and str(tmp_path / "dd" / "train") in message


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("hello")
    assert "one subfolder per class" in data_error(load_data, str(tmp_path / "flat"))


# --- class folders ------------------------------------------------------------------------------------------------


def make_text_folder(root: Path, files: dict[str, list[str]]) -> Path:
    for label, texts in files.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / label / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def test_text_folder_dedups_on_normalized_whitespace_keeping_the_first(tmp_path):
    root = make_text_folder(
        tmp_path / "news",
        {
            "sport": ["Title\n\nA  match was won.", "Another story", "Title\nA match was won.\n"],
            "tech": ["New chip", "Another story"],
        },
    )
    (root / "README.TXT").write_text("ignored: not in a class folder")
    (root / ".hidden").mkdir()
    ds = load_data(str(root))
    assert ds.duplicates_removed == 2
    assert ds.inputs == ["Title\n\nA  match was won.", "Another story", "New chip"]
    assert ds.labels == ["sport", "sport", "tech"]
    kept_all = load_data(str(root), dedup=False)
    assert len(kept_all) == 5 and kept_all.duplicates_removed == 0


def test_folder_hash_covers_names_and_bytes(tmp_path):
    root = make_text_folder(tmp_path / "a", {"x": ["one", "two"], "y": ["three"]})
    first = load_data(str(root)).sha256
    assert load_data(str(root)).sha256 == first
    (root / "y").rename(root / "z")
    assert load_data(str(root)).sha256 != first


def test_folder_text_not_utf8_names_the_file(tmp_path):
    root = make_text_folder(tmp_path / "d", {"a": ["fine"], "b": ["fine too"]})
    (root / "b" / "bad.txt").write_bytes(b"caf\xe9")
    message = data_error(load_data, str(root))
    assert "b/bad.txt: not UTF-8 at line 1 (byte offset 3)" in message


def test_image_folder(tmp_path):
    from PIL import Image

    for label, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6 + i, 4), color).save(tmp_path / "img" / label / f"{i}.png")
    Image.new("L", (5, 5), 128).save(tmp_path / "img" / "blue" / "gray.png")
    ds = load_data(str(tmp_path / "img"))
    assert ds.modality == "image" and ds.label_names == ["blue", "red"] and len(ds) == 7
    first = ds.inputs[0]
    assert tuple(first.shape) == (3, 4, 6) and str(first.dtype) == "torch.float32"
    assert float(first[2].max()) == 1.0 and float(first[0].max()) == 0.0  # blue, in [0, 1]
    assert tuple(ds.inputs[3].shape) == (3, 5, 5)  # grayscale converted to RGB
    assert "holds image files" in data_error(load_data, str(tmp_path / "img"), task="text")


def test_unreadable_image_names_the_file(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / label / "ok.png")
    (tmp_path / "img" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert "img/b/broken.jpg: not a readable image" in data_error(load_data, str(tmp_path / "img"))


def test_csv_of_image_paths_relative_to_the_file(tmp_path):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    for name, shade in (("a", 0), ("b", 255)):
        Image.new("RGB", (2, 3), (shade, shade, shade)).save(tmp_path / "pics" / f"{name}.png")
    path = write_csv(
        tmp_path / "d.csv", [{"image": "pics/a.png", "label": "x"}, {"image": "pics/b.png", "label": "y"}]
    )
    ds = load_data(str(path))
    assert ds.modality == "image" and tuple(ds.inputs[1].shape) == (3, 3, 2)
    write_csv(path, [{"image": "pics/a.png", "label": "x"}, {"image": "pics/gone.png", "label": "y"}])
    assert "line 3: image file" in data_error(load_data, str(path))


# --- Hugging Face files (need pyarrow) ----------------------------------------------------------------------------


def hf_table(pa, texts, label_ids, names):
    features = {
        "text": {"dtype": "string", "_type": "Value"},
        "label": {"names": names, "_type": "ClassLabel"},
    }
    schema = pa.schema(
        [("text", pa.string()), ("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    return pa.table({"text": texts, "label": label_ids}, schema=schema)


def test_parquet_and_save_to_disk_folder_map_class_ids_to_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = hf_table(pa, ["a b", "c", "d", "e"], [0, 1, 1, 0], ["neg", "pos"])
    pq.write_table(table, tmp_path / "d.parquet")
    folder = tmp_path / "saved"
    folder.mkdir()
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for spec in (tmp_path / "d.parquet", folder):
        ds = load_data(str(spec))
        assert ds.labels == ["neg", "pos", "pos", "neg"] and ds.label_names == ["neg", "pos"]
        assert ds.inputs == ["a b", "c", "d", "e"]


def test_parquet_image_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (3, 2), color).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    table = pa.table({"image": [png((255, 0, 0)), png((0, 255, 0))], "label": ["r", "g"]})
    pq.write_table(table, tmp_path / "img.parquet")
    ds = load_data(str(tmp_path / "img.parquet"))
    assert ds.modality == "image" and tuple(ds.inputs[0].shape) == (3, 2, 3)


# --- splits -------------------------------------------------------------------------------------------------------


def test_stratified_split_counts_and_disjointness():
    ds = text_dataset({"a": 50, "b": 30, "c": 20})
    s = make_splits(ds, seed=0, test_size=0.2, val_size=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert s.test.counts() == {"a": 10, "b": 6, "c": 4}
    assert s.val.counts() == {"a": 5, "b": 3, "c": 2}
    texts = [set(part.inputs) for part in (s.train, s.val, s.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert set().union(*texts) == set(ds.inputs)
    assert s.train.label_names == ds.label_names


def test_integer_sizes_and_zero_val():
    ds = text_dataset({"a": 20, "b": 20})
    s = make_splits(ds, seed=1, test_size=10, val_size=0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 0, 10)


def test_same_seed_same_split_other_seed_other_split():
    ds = text_dataset({"a": 40, "b": 40, "c": 40})
    one, again, other = (make_splits(ds, seed=s, shots=4) for s in (3, 3, 4))
    for name in ("train", "val", "test"):
        assert getattr(one, name).inputs == getattr(again, name).inputs
    assert one.test.inputs != other.test.inputs and one.train.inputs != other.train.inputs


@pytest.mark.slow
def test_split_does_not_depend_on_hash_randomization(tmp_path):
    path = write_csv(tmp_path / "d.csv", text_rows({"a": 30, "b": 30, "c": 30}))
    code = (
        "import sys; from graftune.data.sources import load_data; from graftune.data.splits import make_splits;"
        "from graftune.data.card import data_card; ds = load_data(sys.argv[1]);"
        "card = data_card(make_splits(ds, seed=2, shots=5), source=ds);"
        "print([card['splits'][k]['fingerprint'] for k in ('train', 'val', 'test')])"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONHASHSEED": "12345", "PYTHONPATH": src}
    command = [sys.executable, "-c", code, str(path)]
    other = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    ds = load_data(str(path))  # this process runs under another (usually random) hash seed
    card = data_card(make_splits(ds, seed=2, shots=5), source=ds)
    assert other.stdout.strip() == str([card["splits"][k]["fingerprint"] for k in ("train", "val", "test")])


def test_test_per_class_and_shots_exact():
    ds = text_dataset({"a": 60, "b": 45, "c": 40})
    s = make_splits(ds, seed=0, test_per_class=10, shots=8)
    assert s.test.counts() == {"a": 10, "b": 10, "c": 10}
    assert s.train.counts() == {"a": 8, "b": 8, "c": 8}
    assert s.val.counts() == {"a": 8, "b": 8, "c": 8}  # max(8, 8) per class, never the shots
    assert not set(s.train.inputs) & set(s.test.inputs)
    assert not set(s.val.inputs) & (set(s.train.inputs) | set(s.test.inputs))
    assert (s.seed, s.shots, s.shot_seed) == (0, 8, 0)


def test_val_with_shots_takes_what_is_left_and_can_be_switched_off():
    ds = text_dataset({"a": 40, "b": 25})
    s = make_splits(ds, seed=0, test_per_class=5, shots=16)
    assert s.val.counts() == {"a": 16, "b": 4}  # b has 20 left after the test: 16 shots, 4 for val
    assert len(make_splits(ds, seed=0, test_per_class=5, shots=16, val_size=0).val) == 0


def test_shot_seed_keeps_the_test_set_and_shots_nest():
    ds = text_dataset({"a": 40, "b": 40})
    first = make_splits(ds, seed=0, test_per_class=10, shots=4, shot_seed=1)
    second = make_splits(ds, seed=0, test_per_class=10, shots=4, shot_seed=2)
    assert first.test.inputs == second.test.inputs and first.train.inputs != second.train.inputs
    more = make_splits(ds, seed=0, test_per_class=10, shots=8, shot_seed=1)
    assert set(first.train.inputs) < set(more.train.inputs)


def test_too_few_examples_for_shots_names_classes_and_counts():
    ds = text_dataset({"a": 30, "b": 12, "c": 9})
    message = data_error(make_splits, ds, seed=0, test_per_class=5, shots=8)
    assert "fewer than shots=8" in message and "b (7), c (4)" in message and "a (" not in message
    assert "c (9)" in data_error(sample_shots, ds, 10, 0)
    assert "leaves no training examples for c (9)" in data_error(make_splits, ds, test_per_class=9)


def test_sample_shots_is_exact_and_seeded():
    ds = text_dataset({"a": 20, "b": 20})
    one = sample_shots(ds, 5, seed=0)
    assert one.counts() == {"a": 5, "b": 5}
    assert sample_shots(ds, 5, seed=0).inputs == one.inputs != sample_shots(ds, 5, seed=1).inputs


def test_bad_split_arguments():
    ds = text_dataset({"a": 10, "b": 10})
    assert "test_size" in data_error(make_splits, ds, test_size=1.5)
    assert "shots" in data_error(make_splits, ds, shots=0)
    assert "test_size" in data_error(make_splits, ds, test_size=20)
    assert "either" in data_error(make_splits, ds, test=ds, test_per_class=2)


def test_a_class_of_one_cannot_be_tested_and_says_so_in_plain_words():
    ds = text_dataset({"a": 10, "b": 1})
    message = data_error(make_splits, ds, test_size=0.2)
    assert "b (1) has too few examples to hold one out for a test set" in message and "--test" in message
    assert "test_size =" not in message and "should be" not in message  # scikit-learn's wording never reaches users


def test_small_data_splits_hold_every_class_on_both_sides():
    for classes in (3, 6, 17):
        ds = text_dataset({f"c{i}": 8 for i in range(classes)})
        s = make_splits(ds, seed=0)  # the defaults: test 0.2, val 0.1
        for part in (s.train, s.val, s.test):
            assert set(part.labels) == set(ds.label_names), (classes, part)
        assert s.notes == []
    tiny = make_splits(text_dataset({"a": 2, "b": 2, "c": 2}), seed=0)
    assert len(tiny.val) == 0 and "no validation part" in tiny.notes[0]
    assert set(tiny.train.labels) == set(tiny.test.labels) == {"a", "b", "c"}


def test_user_test_set_is_used_as_is():
    ds = text_dataset({"a": 20, "b": 20})
    test = text_dataset({"a": 3, "b": 2})
    test.origin = "test.csv"
    s = make_splits(ds, seed=0, test=test, val_size=4)
    assert s.test is test
    assert len(s.train) + len(s.val) == 40 and len(s.val) == 4
    card = data_card(s, source=ds)
    assert card["test_source"]["origin"] == "test.csv" and card["splits"]["test"]["examples"] == 5


def test_user_test_set_with_unseen_labels_or_other_kind():
    ds = text_dataset({"a": 20, "b": 20})
    test = text_dataset({"a": 2, "zebra": 3, "yak": 1})
    test.origin = "test.csv"
    assert data_error(make_splits, ds, test=test).startswith(
        "test.csv: labels never seen in training: yak (1), zebra (3)"
    )
    pairs = Dataset("pairs", [("q", "a")], [], [], origin="pairs.jsonl")
    assert "same kind" in data_error(make_splits, ds, test=pairs)


def test_check_labels_multi_label():
    train = Dataset("text", ["x", "y"], [["a"], ["a", "b"]], ["a", "b"], multi_label=True)
    check_labels(train, Dataset("text", ["z"], [["b"]], ["b"], multi_label=True))
    assert "c (1)" in data_error(check_labels, train, Dataset("text", ["z"], [["a", "c"]], ["a", "c"], True))


def test_multi_label_split_and_greedy_shots():
    rng = np.random.RandomState(0)
    names = ["a", "b", "c", "d"]
    labels = [sorted(set(rng.choice(names, size=rng.randint(1, 3)).tolist())) for _ in range(200)]
    ds = Dataset("text", [f"t{i}" for i in range(200)], labels, names, multi_label=True, origin="m")
    s = make_splits(ds, seed=0, shots=5)
    assert len(s.test) == 40
    assert all(n >= 5 for n in s.train.counts().values())
    assert not set(s.train.inputs) & (set(s.test.inputs) | set(s.val.inputs))
    assert len(s.val) == 8 * 4
    assert "test_per_class needs single-label" in data_error(make_splits, ds, test_per_class=2)


def test_pairs_split_and_shots():
    ds = Dataset("pairs", [(f"q{i}", f"a{i}") for i in range(50)], [], [], origin="p")
    s = make_splits(ds, seed=0, shots=10)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 10, 10)
    assert not set(s.train.inputs) & set(s.test.inputs)
    assert "only 40 training pairs" in data_error(make_splits, ds, shots=41)


# --- data card ----------------------------------------------------------------------------------------------------


def test_data_card_records_provenance_and_counts(tmp_path):
    path = write_csv(
        tmp_path / "d.csv", text_rows({"a": 30, "b": 30}) + [{"text": "a example number 0", "label": "a"}]
    )
    ds = load_data(str(path))
    s = make_splits(ds, seed=0, test_per_class=5, shots=4)
    card = data_card(s, source=ds)
    json.dumps(card)
    assert card["origin"] == str(path) and card["sha256"] == ds.sha256 and card["modality"] == "text"
    assert card["label_names"] == ["a", "b"] and card["examples"] == 60 and card["duplicates_removed"] == 1
    assert (card["seed"], card["shots"], card["shot_seed"], card["test_source"]) == (0, 4, 0, None)
    assert card["splits"]["train"]["counts"] == {"a": 4, "b": 4}
    assert card["splits"]["test"]["counts"] == {"a": 5, "b": 5}
    assert card["splits"]["train"]["fingerprint"] == fingerprint(s.train) != fingerprint(s.test)
