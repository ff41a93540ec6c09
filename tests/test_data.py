"""The labelled-data layer: formats, presets on the real shared data, bad input, few-shot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dynprompt.training.data import (
    FEWSHOT32_TASKS,
    PRESETS,
    ColumnMapping,
    DataError,
    Example,
    LabelledData,
    data_dir,
    few_shot,
    load_fewshot32,
    load_hf,
    load_preset,
    preset_splits,
    read_file,
)

DATA = data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "sst2" / "train.tsv").is_file(),
    reason=f"shared data folder not found at {DATA} (set DYNPROMPT_DATA_DIR to run these tests)",
)

SST2 = ColumnMapping(text="sentence", label="label", labels=["negative", "positive"])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- formats


def test_tsv_keeps_quotes_verbatim(tmp_path: Path) -> None:
    f = write(
        tmp_path / "s.tsv",
        'sentence\tlabel\n"a quoted start and no end\t1\nit \'s "fine" , really \t0\n',
    )
    data = read_file(f, SST2)
    assert [e.text for e in data.examples] == [
        '"a quoted start and no end',
        'it \'s "fine" , really',
    ]
    assert [e.label for e in data.examples] == [1, 0]
    assert data.labels == ["negative", "positive"]
    assert data.name == "s"


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path: Path) -> None:
    f = write(
        tmp_path / "q.csv",
        '0,"What county is Modesto , California in ?"\n1,"two\nlines"\n0,plain\n',
    )
    data = read_file(f, ColumnMapping(text="1", label="0"), has_header=False)
    assert [e.text for e in data.examples] == [
        "What county is Modesto , California in ?",
        "two\nlines",
        "plain",
    ]
    assert data.labels == ["0", "1"]  # inferred
    # A bad row after a multi-line quoted field is reported at its own first line.
    bad = write(tmp_path / "b.csv", '0,"two\nlines"\n1,ok\n1,  \n')
    with pytest.raises(DataError, match=r"b\.csv line 4: field '1': empty text"):
        read_file(bad, ColumnMapping(text="1", label="0"), has_header=False)


def test_jsonl_pairs_and_bool_labels(tmp_path: Path) -> None:
    f = jsonl(
        tmp_path / "p.jsonl",
        [
            {"q": "is it?", "p": "It is.", "label": True},
            {"q": "is it not?", "p": "It is.", "label": False},
        ],
    )
    data = read_file(f, ColumnMapping(text="q", text_pair="p", label="label", labels=["no", "yes"]))
    assert data.examples == [Example("is it?", "It is.", 1), Example("is it not?", "It is.", 0)]
    inferred = read_file(f, ColumnMapping(text="q", text_pair="p", label="label"))
    assert inferred.labels == ["false", "true"]
    assert [e.label for e in inferred.examples] == [1, 0]
    assert inferred.has_pairs


def test_label_matching_by_name_case_and_index(tmp_path: Path) -> None:
    f = write(tmp_path / "l.tsv", "t\tl\na\tPositive\nb\t0\nc\tnegative\n")
    data = read_file(f, ColumnMapping(text="t", label="l", labels=["negative", "positive"]))
    assert [e.label for e in data.examples] == [1, 0, 0]
    # Numeric label names win over indices: "1" is the name "1", index 0.
    g = write(tmp_path / "n.tsv", "t\tl\na\t1\nb\t2\n")
    data = read_file(g, ColumnMapping(text="t", label="l", labels=["1", "2"]))
    assert [e.label for e in data.examples] == [0, 1]


def test_inferred_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = "".join(f"{i}\tx{i}\n" for i in (10, 2, 9, 1))
    data = read_file(write(tmp_path / "n.tsv", rows), ColumnMapping("1", "0"), has_header=False)
    assert data.labels == ["1", "2", "9", "10"]
    assert [e.label for e in data.examples] == [3, 1, 2, 0]


def test_format_override_and_unknown_suffix(tmp_path: Path) -> None:
    f = write(tmp_path / "data.txt", "a\t0\nb\t1\n")
    with pytest.raises(DataError, match=r"data\.txt.*suffix '\.txt'"):
        read_file(f, ColumnMapping("0", "1"), has_header=False)
    assert len(read_file(f, ColumnMapping("0", "1"), fmt="tsv", has_header=False)) == 2


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    f = write(
        tmp_path / "g.jsonl", '{"t": "a", "l": 0}\n\n{"t": "b", "l": 1}\n\n{"t": "", "l": 1}\n'
    )
    with pytest.raises(DataError, match=r"g\.jsonl line 5: field 't': empty text"):
        read_file(f, ColumnMapping(text="t", label="l"))


# --------------------------------------------------------------------------- bad input


def test_missing_column_in_header(tmp_path: Path) -> None:
    f = write(tmp_path / "h.tsv", "text\tlabel\na\t0\n")
    with pytest.raises(DataError) as err:
        read_file(f, SST2)
    msg = str(err.value)
    assert "h.tsv line 1: field 'sentence': no such column" in msg
    assert "columns: text, label" in msg
    assert (err.value.line, err.value.field) == (1, "sentence")


def test_missing_column_headerless_and_jsonl(tmp_path: Path) -> None:
    f = write(tmp_path / "short.tsv", "0\tgood\n1\n0\tfine\n")
    with pytest.raises(DataError, match=r"short\.tsv line 2: field '1': missing"):
        read_file(f, ColumnMapping(text="1", label="0"), has_header=False)
    g = jsonl(
        tmp_path / "m.jsonl", [{"premise": "a", "label": "x"}, {"premise": "b", "label": "y"}]
    )
    mapping = ColumnMapping(text="premise", text_pair="hypothesis", label="label")
    with pytest.raises(DataError) as err:
        read_file(g, mapping)
    assert "m.jsonl line 1: field 'hypothesis': missing" in str(err.value)
    assert "1 more rows with this problem: lines 2" in str(err.value)
    h = jsonl(tmp_path / "nolabel.jsonl", [{"premise": "a", "hypothesis": "b"}])
    with pytest.raises(DataError, match=r"nolabel\.jsonl line 1: field 'label': missing"):
        read_file(h, mapping)


def test_unknown_label_names_line_field_and_counts_repeats(tmp_path: Path) -> None:
    rows = ["sentence\tlabel"] + [
        f"s{i}\t{7 if i in (16, 19, 30) else i % 2}" for i in range(1, 40)
    ]
    f = write(tmp_path / "train.tsv", "\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_file(f, SST2)
    msg = str(err.value)
    # Row s16 is on line 17 (the header is line 1).
    assert "train.tsv line 17: field 'label': unknown label '7' (known: negative, positive" in msg
    assert "2 more rows with this problem: lines 20, 31" in msg
    assert (err.value.line, err.value.field, err.value.count) == (17, "label", 3)


def test_empty_text(tmp_path: Path) -> None:
    f = write(tmp_path / "e.tsv", "sentence\tlabel\nok\t0\n   \t1\n")
    with pytest.raises(DataError, match=r"e\.tsv line 3: field 'sentence': empty text"):
        read_file(f, SST2)
    g = jsonl(tmp_path / "e.jsonl", [{"t": "a", "p": " ", "l": 0}])
    with pytest.raises(DataError, match=r"e\.jsonl line 1: field 'p': empty text"):
        read_file(g, ColumnMapping(text="t", text_pair="p", label="l"))
    h = jsonl(tmp_path / "n.jsonl", [{"t": 5, "l": 0}])
    with pytest.raises(DataError, match=r"n\.jsonl line 1: field 't': expected a string, got int"):
        read_file(h, ColumnMapping(text="t", label="l"))


def test_one_class_split(tmp_path: Path) -> None:
    f = write(tmp_path / "one.tsv", "sentence\tlabel\na\t1\nb\t1\n")
    with pytest.raises(DataError) as err:
        read_file(f, SST2)
    msg = str(err.value)
    assert "one.tsv" in msg and "field 'label'" in msg
    assert "all 2 examples have class 'positive'" in msg
    assert len(read_file(f, SST2, min_classes=1)) == 2


def test_empty_file(tmp_path: Path) -> None:
    f = write(tmp_path / "empty.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"empty\.tsv: no examples"):
        read_file(f, SST2)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.tsv: cannot read: file not found"):
        read_file(tmp_path / "nothere.tsv", SST2)
    with pytest.raises(DataError, match="cannot read"):
        read_file(tmp_path, SST2, fmt="tsv")  # a directory


def test_bad_json_line(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.jsonl", '{"t": "a", "l": 0}\n{"t": "b", "l": 1}\n{"t": "c", "l" 1}\n')
    with pytest.raises(DataError) as err:
        read_file(f, ColumnMapping(text="t", label="l"))
    assert "bad.jsonl line 3: not valid JSON" in str(err.value)
    assert err.value.line == 3
    g = write(tmp_path / "arr.jsonl", '{"t": "a", "l": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"arr\.jsonl line 2: expected a JSON object, got list"):
        read_file(g, ColumnMapping(text="t", label="l"))


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin.tsv"
    f.write_bytes("sentence\tlabel\nfine\t0\ncaf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_file(f, SST2)
    assert "latin.tsv line 3: not valid UTF-8 (byte 0xe9 at column 4)" in str(err.value)


def test_stray_delimiter_is_reported(tmp_path: Path) -> None:
    f = write(tmp_path / "x.tsv", "sentence\tlabel\na\tb\t0\nc\t1\n")
    with pytest.raises(DataError, match=r"x\.tsv line 2: row has 3 fields, the header has 2"):
        read_file(f, SST2)


def test_labelled_data_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        LabelledData("t", ["a", "b"], [Example("x", None, 2)], "hand")


# --------------------------------------------------------------------------- few-shot


def _toy(n_per_class: dict[int, int]) -> LabelledData:
    examples = [Example(f"c{c} #{i}", None, c) for c, n in n_per_class.items() for i in range(n)]
    return LabelledData("toy", ["a", "b", "c"], examples, "toy.tsv")


def test_few_shot_is_seeded_and_balanced() -> None:
    data = _toy({0: 50, 1: 80, 2: 30})
    a, b, c = few_shot(data, 8, seed=1), few_shot(data, 8, seed=1), few_shot(data, 8, seed=2)
    assert a.examples == b.examples
    assert a.examples != c.examples
    assert a.label_counts() == {"a": 8, "b": 8, "c": 8}
    assert c.label_counts() == {"a": 8, "b": 8, "c": 8}
    assert len(set(a.examples)) == 24  # no example drawn twice
    assert set(a.examples) <= set(data.examples)
    assert a.labels == data.labels and a.name == "toy"


def test_few_shot_too_few_in_a_class() -> None:
    with pytest.raises(DataError, match=r"k=5 .* 'c' has 3"):
        few_shot(_toy({0: 10, 1: 10, 2: 3}), 5, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        few_shot(_toy({0: 10, 1: 10, 2: 10}), 0, seed=0)


# --------------------------------------------------------------------------- presets


def test_preset_registry() -> None:
    assert set(PRESETS) == {"sst2", "sst5", "trec", "rte", "cb", "boolq", "wic", "wsc"}
    assert all(PRESETS.values())
    assert preset_splits("trec") == ["train", "test", "dev"]
    with pytest.raises(DataError, match="unknown preset 'sst3'"):
        load_preset("sst3", "train")
    with pytest.raises(DataError, match="no split 'test'"):
        load_preset("sst2", "test")


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        load_preset("sst2", "dev", data_dir=tmp_path / "nowhere")


def test_data_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sst2").mkdir()
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    monkeypatch.setenv("DYNPROMPT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert load_preset("sst2", "dev").label_counts() == {"negative": 1, "positive": 1}


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "rows", "counts"),
    [
        ("sst2", "train", 67349, {"negative": 29780, "positive": 37569}),
        ("sst2", "dev", 872, {"negative": 428, "positive": 444}),
        ("sst5", "train", 8544, None),
        ("sst5", "dev", 1101, None),
        ("sst5", "test", 2210, None),
        (
            "trec",
            "train",
            5452,
            {"DESC": 1162, "ENTY": 1250, "ABBR": 86, "HUM": 1223, "LOC": 835, "NUM": 896},
        ),
        ("trec", "test", 500, None),
        ("rte", "train", 2490, {"entailment": 1249, "not_entailment": 1241}),
        ("rte", "dev", 277, {"entailment": 146, "not_entailment": 131}),
        ("cb", "train", 250, {"entailment": 115, "contradiction": 119, "neutral": 16}),
        ("cb", "dev", 56, None),
        ("wsc", "train", 554, None),
        ("wsc", "dev", 104, None),
    ],
)
def test_preset_rows_and_balance(
    name: str, split: str, rows: int, counts: dict[str, int] | None
) -> None:
    data = load_preset(name, split)
    assert len(data) == rows
    assert data.name == name
    if counts is not None:
        assert data.label_counts() == counts
    assert all(e.text and e.text == e.text.strip() for e in data.examples)


@needs_data
def test_preset_contents() -> None:
    sst2 = load_preset("sst2", "dev")
    assert sst2.examples[0] == Example("it 's a charming and often affecting journey .", None, 1)
    sst5 = load_preset("sst5", "train")
    assert sst5.labels[sst5.examples[0].label] == "very positive"  # "4<TAB>a stirring , funny ..."
    assert sst5.label_counts()["very negative"] == 1092
    trec = load_preset("trec", "dev")  # TREC's dev is its test file
    assert len(trec) == 500
    assert trec.labels[trec.examples[0].label] == "NUM"  # "How far is it from Denver to Aspen ?"
    assert trec.examples[1].text == "What county is Modesto , California in ?"
    rte = load_preset("rte", "val")
    assert rte.has_pairs and rte.examples[0].text_pair == "Christopher Reeve had an accident."
    wic = load_preset("wic", "train").examples + load_preset("wic", "dev").examples
    first = Example(
        "class: An emerging professional class.",
        "Apologizing for losing your temper, even though you were badly provoked, "
        "showed real class.",
        0,
    )
    assert first in wic


@needs_data
def test_wsc_marks_spans() -> None:
    train = load_preset("wsc", "train")
    assert train.examples[0].text == (
        "*Mark* told Pete many lies about himself, which Pete included in his book. "
        "[He] should have been more skeptical."
    )
    assert all(e.text.count("*") >= 2 and "[" in e.text for e in train.examples)
    dev = load_preset("wsc", "dev")
    # Row 43's pronoun index is off by one in the source; the span is found nearby.
    assert "might want to use [it] ," in dev.examples[42].text
    # Row 96 has one span inside the other.
    assert "*[their] mothers*" in dev.examples[95].text


@needs_data
@pytest.mark.parametrize(("name", "total"), [("boolq", 3270), ("wic", 638)])
def test_seeded_split_of_single_file(name: str, total: int) -> None:
    train, dev = load_preset(name, "train", seed=0), load_preset(name, "dev", seed=0)
    assert len(train) + len(dev) == total
    assert abs(len(dev) / total - 0.2) < 0.01
    assert not set(train.examples) & set(dev.examples)
    assert load_preset(name, "dev", seed=0).examples == dev.examples
    assert load_preset(name, "dev", seed=1).examples != dev.examples
    if name == "boolq":
        whole = {"false": 1237, "true": 2033}
        both = {k: train.label_counts()[k] + dev.label_counts()[k] for k in whole}
        assert both == whole
        assert dev.label_counts() == {"false": 247, "true": 407}  # stratified
        assert train.examples[0].text_pair  # the passage


@needs_data
def test_fewshot32_splits() -> None:
    assert FEWSHOT32_TASKS == ("boolq", "cb", "rte", "wic", "wsc")
    for task in FEWSHOT32_TASKS:
        assert len(load_fewshot32(task, "dev")) == 32
    rte = load_preset("rte", "train", regime="fewshot32")
    assert len(rte) == 32 and rte.label_counts() == {"entailment": 13, "not_entailment": 19}
    assert load_fewshot32("cb", "train").label_counts()["neutral"] == 3
    # FewGLUE's WSC train file is all positives: refused as a one-class split.
    with pytest.raises(DataError, match=r"wsc/train\.jsonl: field 'label': all 32 .* 'true'"):
        load_fewshot32("wsc", "train")
    assert len(load_fewshot32("wsc", "train", min_classes=1)) == 32
    with pytest.raises(DataError, match="no fewshot32 split for 'sst2'"):
        load_fewshot32("sst2", "train")


@needs_data
def test_few_shot_on_real_data() -> None:
    trec = load_preset("trec", "train")
    a = few_shot(trec, 16, seed=13)
    assert a.label_counts() == dict.fromkeys(trec.labels, 16)
    assert a.examples == few_shot(trec, 16, seed=13).examples
    with pytest.raises(DataError, match="'ABBR' has 86"):
        few_shot(trec, 100, seed=0)


# --------------------------------------------------------------------------- Hugging Face


def test_hf_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, nothing is fetched
    with pytest.raises(DataError, match=r"hf:glue/sst2\[train\].*optional package `datasets`"):
        load_hf("glue", "train", ColumnMapping(text="sentence", label="label"), config="sst2")


# --------------------------------------------------------------------------- layouts, streaming


def test_read_inputs_streams_rows_with_their_lines(tmp_path: Path) -> None:
    from dynprompt.training.data import InputRow, Layout, read_inputs

    f = tmp_path / "in.tsv"
    f.write_bytes(b"\xef\xbb\xbfreview\tid\r\ngood fun\t1\r\n\r\nsad plot\t2\r\n")
    rows = read_inputs(f, Layout(text_field="review"))
    assert next(rows) == InputRow(2, "good fun", None)  # BOM and CRLF gone
    assert list(rows) == [InputRow(4, "sad plot", None)]
    # A bad row is reported when it is reached: the rows before it have come out.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y"}\n{"a": "x"}\n')
    rows = read_inputs(bad, Layout(text_field="a", pair_field="b"))
    assert next(rows) == InputRow(1, "x", "y")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: field 'b': missing"):
        next(rows)


def test_layout_format_comes_from_the_flag_the_suffix_or_the_checkpoint(tmp_path: Path) -> None:
    from dynprompt.training.data import Layout

    stored = Layout(format="csv")
    assert stored.resolve_format(tmp_path / "a.jsonl") == "jsonl"  # the suffix first
    assert stored.resolve_format(tmp_path / "a.txt") == "csv"  # else what was stored
    assert stored.resolve_format(tmp_path / "a.jsonl", "tsv") == "tsv"  # a flag beats both
    assert stored.resolve_format("-") == "csv"
    with pytest.raises(DataError, match="<stdin>: say which format"):
        Layout().resolve_format("-")
    with pytest.raises(DataError, match="cannot tell the format"):
        Layout().resolve_format(tmp_path / "a.txt")


@needs_data
def test_preset_layout_reads_files_like_the_preset() -> None:
    """A checkpoint trained on a preset stores the preset; its files then read with the
    preset's own way of building texts (WiC: "word: sentence1", with sentence2 as pair)."""
    from dynprompt.training.data import Layout, read_inputs, read_labelled

    path = DATA / "superglue" / "wic" / "val.jsonl"
    layout = Layout.of_preset("wic")
    assert (layout.format, layout.pair_field, layout.preset) == ("jsonl", "sentence2", "wic")
    first = next(read_inputs(path, layout))
    record = json.loads(path.read_text().splitlines()[0])
    assert first.text == f"{record['word']}: {record['sentence1']}"
    assert first.text_pair == record["sentence2"]
    labelled = read_labelled(path, layout, ["false", "true"])
    assert len(labelled) == 638 and labelled.examples[0].text == first.text
