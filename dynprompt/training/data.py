"""Labelled data for `dynprompt train` and `dynprompt eval`.

Everything here turns a file, a preset or (online only) a Hugging Face dataset
into a `LabelledData`: a label list plus `Example(text, text_pair, label)` rows.
Bad input is refused here, before any model is built, with a `DataError` whose
message names the file, the line and the field, so that a typo in a 60,000-row
file costs seconds rather than a failed training run.

Regimes: full data (`read_file`, `load_preset`), few-shot (`few_shot` for `k`
per class; `load_fewshot32` for the FewGLUE 32-example SuperGLUE splits), and
multitask, which is just a list of `LabelledData` handed to the trainer.
Nothing in this module touches the network unless `load_hf` is called.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DATA_DIR_ENV",
    "FEWSHOT32_TASKS",
    "PRESETS",
    "ColumnMapping",
    "DataError",
    "Example",
    "InputRow",
    "LabelledData",
    "Layout",
    "data_dir",
    "few_shot",
    "load_fewshot32",
    "load_hf",
    "load_preset",
    "preset_splits",
    "read_file",
    "read_inputs",
    "read_labelled",
]

DATA_DIR_ENV = "DYNPROMPT_DATA_DIR"

# How many offending line numbers to quote when many rows share one problem.
_QUOTED_LINES = 5


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Example:
    """One labelled input; `label` indexes `LabelledData.labels`."""

    text: str
    text_pair: str | None
    label: int


@dataclass
class LabelledData:
    """A labelled split. `labels` is in index order: the head's output order."""

    name: str
    labels: list[str]
    examples: list[Example]
    source: str

    def __post_init__(self) -> None:
        # Cheap, and catches hand-built data that would otherwise fail deep in the loss.
        if not self.labels:
            raise ValueError(f"{self.source}: a LabelledData needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.source}: duplicate label names in {self.labels}")
        n = len(self.labels)
        for i, ex in enumerate(self.examples):
            if not 0 <= ex.label < n:
                raise ValueError(
                    f"{self.source}: example {i} has label index {ex.label}, "
                    f"outside 0..{n - 1} ({', '.join(self.labels)})"
                )

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_pairs(self) -> bool:
        return any(ex.text_pair is not None for ex in self.examples)

    def label_counts(self) -> dict[str, int]:
        """Examples per label name, every label present (0 where absent), in index order."""
        counts = Counter(ex.label for ex in self.examples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.labels)}


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns (TSV/CSV header names, index strings "0", "1"... for headerless
    files, or JSON keys) hold the text, the optional pair text and the label.

    Without `labels`, the label set is inferred from the file (sorted; numerically when
    every value is an integer). Pass `labels` when reading a dev or test file so its
    indices agree with the training file even if it lacks a class.
    """

    text: str
    label: str
    text_pair: str | None = None
    labels: list[str] | None = None


class DataError(ValueError):
    """Input data that cannot be trained on; the message names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        count: int = 1,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field
        self.count = count


def _where(path: str, line: int | None, field: str | None, unit: str = "line") -> str:
    parts = [path]
    if line is not None:
        parts.append(f" {unit} {line}")
    out = "".join(parts) + ":"
    if field is not None:
        out += f" field {field!r}:"
    return out


@dataclass
class _Problem:
    line: int
    field: str | None
    kind: str  # groups "the same problem" across rows
    message: str


class _FieldError(Exception):
    """Raised by a row accessor; becomes a `_Problem` with the row's line number."""

    def __init__(self, field: str | None, kind: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.kind = kind
        self.message = message


def _raise_problems(path: str, problems: list[_Problem], unit: str = "line") -> None:
    """Raise the first problem, saying how many other rows share it: one run of the
    command then shows whether the file is broken throughout or in one place."""
    if not problems:
        return
    first = problems[0]
    same = [p for p in problems[1:] if (p.field, p.kind) == (first.field, first.kind)]
    other = len(problems) - 1 - len(same)
    msg = f"{_where(path, first.line, first.field, unit)} {first.message}"
    if same:
        quoted = ", ".join(str(p.line) for p in same[:_QUOTED_LINES])
        more = ", ..." if len(same) > _QUOTED_LINES else ""
        msg += f" (and {len(same)} more rows with this problem: {unit}s {quoted}{more})"
    if other:
        msg += f" ({other} other rows have other problems)"
    raise DataError(msg, path=path, line=first.line, field=first.field, count=len(problems))


# --------------------------------------------------------------------------- reading


_SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl"}
_FORMATS = ("tsv", "csv", "jsonl")

Record = dict[str, Any]


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in _FORMATS:
            raise DataError(
                f"{path}: unknown format {fmt!r} (known: {', '.join(_FORMATS)})", path=str(path)
            )
        return fmt
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r} "
            f"(known: {', '.join(_SUFFIX_FORMATS)}); pass the format explicitly",
            path=str(path),
        )
    return _SUFFIX_FORMATS[suffix]


STDIN = "-"


def _open_binary(source: Path | str) -> IO[bytes]:
    """The file (or stdin for "-") as bytes; a file that cannot be opened is a `DataError`."""
    if str(source) == STDIN:
        return sys.stdin.buffer
    try:
        return open(source, "rb")  # noqa: SIM115 - closed by the reading generator
    except FileNotFoundError:
        raise DataError(f"{source}: cannot read: file not found", path=str(source)) from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc.strerror or exc}", path=str(source)) from exc


def _decoded_lines(handle: IO[bytes], where: str) -> Iterator[str]:
    """UTF-8 lines (endings kept), decoded one at a time so that a bad byte is reported
    with its line and column, however large the file."""
    for i, raw in enumerate(handle, start=1):
        if i == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            byte = raw[exc.start : exc.start + 1].hex()
            raise DataError(
                f"{_where(where, i, None)} not valid UTF-8 (byte 0x{byte} at column "
                f"{exc.start + 1}); re-encode the file as UTF-8",
                path=where,
                line=i,
            ) from None


def _iter_records(
    source: Path | str, fmt: str, has_header: bool, needed: Sequence[str]
) -> Iterator[tuple[int, Record]]:
    """Yield (line number of the row's first line, record), reading `source` (a path,
    or "-" for stdin) as a stream. Blank rows are skipped.

    Delimited rows become {column name: str}; a short row simply lacks keys, which
    the field accessors report as missing.
    """
    where = "<stdin>" if str(source) == STDIN else str(source)
    handle = _open_binary(source)
    try:
        yield from _records(_decoded_lines(handle, where), where, fmt, has_header, needed)
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _records(
    lines: Iterator[str], where: str, fmt: str, has_header: bool, needed: Sequence[str]
) -> Iterator[tuple[int, Record]]:
    if fmt == "jsonl":
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{_where(where, i, None)} not valid JSON ({exc.msg} at column {exc.colno})",
                    path=where,
                    line=i,
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{_where(where, i, None)} expected a JSON object, got {type(obj).__name__}",
                    path=where,
                    line=i,
                )
            yield i, obj
        return

    # Lines keep their endings, so csv stays in charge of them and quoted newlines survive.
    if fmt == "tsv":
        # QUOTE_NONE: SST sentences contain bare quotes that must stay verbatim.
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines)
    header: list[str] | None = None
    prev_end = 0
    try:
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if has_header and header is None:
                header = [h.strip() for h in row]
                missing = [c for c in needed if c not in header]
                if missing:
                    hint = ""
                    if all(c.isdigit() for c in missing):
                        hint = "; for a file without a header, pass has_header=False"
                    raise DataError(
                        f"{_where(where, start, missing[0])} no such column in the header "
                        f"(columns: {', '.join(header)}){hint}",
                        path=where,
                        line=start,
                        field=missing[0],
                    )
                continue
            names = header if header is not None else [str(j) for j in range(len(row))]
            record: Record = dict(zip(names, row, strict=False))
            if header is not None and len(row) > len(header):
                record["__extra__"] = len(row)
            yield start, record
    except csv.Error as exc:
        raise DataError(
            f"{_where(where, reader.line_num, None)} cannot parse {fmt.upper()}: {exc}",
            path=where,
            line=reader.line_num,
        ) from None


def _get_text(record: Record, name: str) -> str:
    if name not in record or record[name] is None:
        got = "missing" if name not in record else "null"
        raise _FieldError(name, "missing", f"{got}: every row needs this field")
    value = record[name]
    if not isinstance(value, str):
        raise _FieldError(name, "type", f"expected a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise _FieldError(name, "empty", "empty text")
    return value


class _LabelIndex:
    """Maps raw label values (strings, integers, booleans) to label indices.

    A value is matched first as a label name (exactly, then ignoring case), then as
    an integer index; so labels "0".."4" named "very negative".."very positive" and
    JSON `true`/`false` against ["false", "true"] both work without configuration.
    """

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.exact = {name: i for i, name in enumerate(labels)}
        self.folded = {name.casefold(): i for i, name in enumerate(labels)}

    def __call__(self, raw: object, field: str) -> int:
        if raw is None:
            raise _FieldError(field, "missing", "null: every row needs a label")
        if isinstance(raw, bool):
            key = "true" if raw else "false"
        elif isinstance(raw, int | str):
            key = str(raw).strip()
        else:
            raise _FieldError(
                field, "type", f"expected a string, integer or boolean, got {type(raw).__name__}"
            )
        if key in self.exact:
            return self.exact[key]
        if key.casefold() in self.folded:
            return self.folded[key.casefold()]
        as_int = int(raw) if isinstance(raw, bool) else _parse_int(key)
        if as_int is not None and 0 <= as_int < len(self.labels):
            return as_int
        if key == "":
            raise _FieldError(field, "empty", "empty label")
        known = ", ".join(self.labels)
        raise _FieldError(
            field,
            "unknown",
            f"unknown label {key!r} (known: {known}; or an index 0..{len(self.labels) - 1})",
        )


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _infer_labels(records: list[tuple[int, Record]], field: str) -> list[str]:
    """Sorted label names; numeric order when every value is an integer, so that a file
    labelled 0..9 gets "10" after "9" rather than after "1"."""
    values: set[str] = set()
    all_bool = True
    for _, record in records:
        raw = record.get(field)
        if raw is None or isinstance(raw, dict | list | float):
            continue  # reported later, row by row, with its line number
        all_bool = all_bool and isinstance(raw, bool)
        key = ("true" if raw else "false") if isinstance(raw, bool) else str(raw).strip()
        if key:
            values.add(key)
    if all_bool and values:
        return ["false", "true"]
    if values and all(_parse_int(v) is not None for v in values):
        return sorted(values, key=lambda v: int(v))
    return sorted(values)


def _check_classes(data: LabelledData, path: str, label_field: str, min_classes: int) -> None:
    if not data.examples:
        raise DataError(f"{path}: no examples in the file", path=path)
    counts = {name: n for name, n in data.label_counts().items() if n}
    if len(counts) < min_classes:
        only = ", ".join(f"{name!r}" for name in counts)
        raise DataError(
            f"{_where(path, None, label_field)} all {len(data)} examples have class {only}; "
            f"a split needs at least {min_classes} classes to train or evaluate a classifier",
            path=path,
            field=label_field,
        )


TextFn = Callable[[Record], str]
PairFn = Callable[[Record], str | None]


def _build(
    *,
    name: str,
    path: Path,
    records: list[tuple[int, Record]],
    text_fn: TextFn,
    pair_fn: PairFn,
    label_field: str,
    labels: list[str] | None,
    min_classes: int,
    source: str | None = None,
    unit: str = "line",
) -> LabelledData:
    """Turn records into examples, collecting every row's problems before raising."""
    where = str(path)
    label_names = labels if labels is not None else _infer_labels(records, label_field)
    if not label_names:
        label_names = ["?"]  # no usable label at all: the row errors below say why
    index = _LabelIndex(label_names)
    examples: list[Example] = []
    problems: list[_Problem] = []
    for line, record in records:
        try:
            if "__extra__" in record:
                raise _FieldError(
                    None,
                    "columns",
                    f"row has {record['__extra__']} fields, the header has "
                    f"{len(record) - 1} (a stray delimiter in the text?)",
                )
            text = text_fn(record)
            pair = pair_fn(record)
            label = index(record.get(label_field), label_field)
        except _FieldError as err:
            if label_field not in record and err.field == label_field:
                err.message = "missing: every row needs a label"
                err.kind = "missing"
            problems.append(_Problem(line, err.field, err.kind, err.message))
            continue
        examples.append(Example(text, pair, label))
    _raise_problems(where, problems, unit)
    data = LabelledData(name=name, labels=label_names, examples=examples, source=source or where)
    _check_classes(data, where, label_field, min_classes)
    return data


def read_file(
    path: str | os.PathLike[str],
    mapping: ColumnMapping,
    fmt: str | None = None,
    has_header: bool = True,
    *,
    name: str | None = None,
    min_classes: int = 2,
) -> LabelledData:
    """Read a TSV, CSV or JSONL file of labelled examples.

    `fmt` ("tsv", "csv", "jsonl") overrides the suffix. `has_header` applies to TSV and
    CSV; without a header, columns are named "0", "1", ... . Texts are stripped of
    surrounding whitespace. `min_classes` (default 2) refuses a file whose examples
    all share a class; pass 1 for data that is only ever predicted on.

    Raises `DataError` naming the file, line and field on any bad row.
    """
    p = Path(path)
    kind = _detect_format(p, fmt)
    needed = [mapping.text, mapping.label] + ([mapping.text_pair] if mapping.text_pair else [])
    records = list(_iter_records(p, kind, has_header, needed))
    pair_field = mapping.text_pair

    def pair_fn(record: Record) -> str | None:
        return _get_text(record, pair_field) if pair_field is not None else None

    return _build(
        name=name or p.stem,
        path=p,
        records=records,
        text_fn=lambda r: _get_text(r, mapping.text),
        pair_fn=pair_fn,
        label_field=mapping.label,
        labels=list(mapping.labels) if mapping.labels is not None else None,
        min_classes=min_classes,
    )


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """How a file holds its inputs: format (None: from the file's suffix), header row,
    and the fields of the text, the pair text and the label; or the preset whose files
    it is laid out like (a preset may build its text from several fields, as WiC's
    "word: sentence1"). A checkpoint stores the layout of its training data, so that
    `eval --file` and `predict` read data like it with no flags."""

    text_field: str = "text"
    pair_field: str | None = None
    label_field: str = "label"
    format: str | None = None
    has_header: bool = True
    preset: str | None = None

    def replace(self, **changes: Any) -> Layout:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of_preset(cls, name: str) -> Layout:
        p = _preset(name)
        return cls(p.text, p.pair, p.label, p.fmt, p.has_header, name)

    @classmethod
    def from_input_spec(cls, spec: Any) -> Layout:
        """From a checkpoint's `input` section; checkpoints written before the layout was
        stored lack all but the text and pair fields, and get the defaults."""
        return cls(
            text_field=spec.text_field,
            pair_field=spec.pair_field,
            label_field=getattr(spec, "label_field", None) or "label",
            format=getattr(spec, "format", None),
            has_header=getattr(spec, "has_header", True),
            preset=getattr(spec, "preset", None),
        )

    def readers(self) -> tuple[TextFn, PairFn, list[str]]:
        """(text of a record, pair text of a record, the columns a header must have)."""
        text_fn: TextFn | None = None
        if self.preset is not None:
            text_fn = _preset(self.preset).text_fn
        text_field, pair_field = self.text_field, self.pair_field

        def pair_fn(record: Record) -> str | None:
            return _get_text(record, pair_field) if pair_field is not None else None

        needed = [text_field] + ([pair_field] if pair_field is not None else [])
        return text_fn or (lambda r: _get_text(r, text_field)), pair_fn, needed

    def resolve_format(self, source: Path | str, explicit: str | None = None) -> str:
        """`explicit`, else the file's suffix, else the stored format."""
        if explicit is not None or str(source) == STDIN:
            fmt = explicit or self.format
            if fmt is None:
                raise DataError(
                    f"{'<stdin>' if str(source) == STDIN else source}: say which format it "
                    f"is in ({', '.join(_FORMATS)}); the checkpoint does not record one",
                    path=str(source),
                )
            return _detect_format(Path(str(source)), fmt)
        path = Path(source)
        if path.suffix.lower() in _SUFFIX_FORMATS or self.format is None:
            return _detect_format(path, None)
        return _detect_format(path, self.format)


@dataclass(frozen=True)
class InputRow:
    """One unlabelled input and the line it starts on."""

    line: int
    text: str
    text_pair: str | None


def read_inputs(source: Path | str, layout: Layout, fmt: str | None = None) -> Iterator[InputRow]:
    """Stream the inputs of a file (or "-": stdin) laid out as `layout`, one row at a
    time, never holding the file. The first bad row raises a `DataError` naming the
    file, its line and the field; other columns and a label, if any, are ignored."""
    kind = layout.resolve_format(source, fmt)
    where = "<stdin>" if str(source) == STDIN else str(source)
    text_fn, pair_fn, needed = layout.readers()
    records = _iter_records(source, kind, layout.has_header, needed)
    for line, record in records:
        try:
            if "__extra__" in record:
                raise _FieldError(
                    None,
                    "columns",
                    f"row has {record['__extra__']} fields, the header has "
                    f"{len(record) - 1} (a stray delimiter in the text?)",
                )
            yield InputRow(line, text_fn(record), pair_fn(record))
        except _FieldError as err:
            raise DataError(
                f"{_where(where, line, err.field)} {err.message}",
                path=where,
                line=line,
                field=err.field,
            ) from None


def read_labelled(
    path: str | os.PathLike[str],
    layout: Layout,
    labels: list[str] | None = None,
    fmt: str | None = None,
    *,
    name: str | None = None,
    min_classes: int = 2,
) -> LabelledData:
    """A labelled file laid out as `layout` (a checkpoint's stored layout, for `eval`)."""
    p = Path(path)
    kind = layout.resolve_format(p, fmt)
    text_fn, pair_fn, needed = layout.readers()
    records = list(_iter_records(p, kind, layout.has_header, [*needed, layout.label_field]))
    return _build(
        name=name or p.stem,
        path=p,
        records=records,
        text_fn=text_fn,
        pair_fn=pair_fn,
        label_field=layout.label_field,
        labels=labels,
        min_classes=min_classes,
    )


# --------------------------------------------------------------------------- few-shot


def few_shot(data: LabelledData, k: int, seed: int) -> LabelledData:
    """Exactly `k` examples of every class, drawn with `random.Random(seed)`.

    The same data and seed always give the same examples (kept in their file order,
    so the trainer's own shuffling decides batch order); different seeds give
    different draws. A class with fewer than `k` examples is an error rather than a
    silently unbalanced set, since few-shot results are compared across classes.
    """
    if k < 1:
        raise ValueError(f"few_shot: k must be at least 1, got {k}")
    by_class: dict[int, list[int]] = {i: [] for i in range(len(data.labels))}
    for i, ex in enumerate(data.examples):
        by_class[ex.label].append(i)
    short = [(data.labels[c], len(idx)) for c, idx in by_class.items() if len(idx) < k]
    if short:
        detail = ", ".join(f"{name!r} has {n}" for name, n in short)
        raise DataError(
            f"{data.source}: few-shot k={k} needs {k} examples of every class, but {detail}",
            path=data.source,
        )
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in range(len(data.labels)):
        chosen.extend(rng.sample(by_class[c], k))
    return LabelledData(
        name=data.name,
        labels=list(data.labels),
        examples=[data.examples[i] for i in sorted(chosen)],
        source=f"{data.source} (few-shot k={k} per class, seed={seed})",
    )


def _stratified_split(
    examples: list[Example], n_labels: int, seed: int, dev_fraction: float
) -> tuple[list[Example], list[Example]]:
    """Seeded split keeping each class's share in both halves; file order is kept."""
    rng = random.Random(seed)
    dev_idx: set[int] = set()
    for c in range(n_labels):
        idx = [i for i, ex in enumerate(examples) if ex.label == c]
        rng.shuffle(idx)
        dev_idx.update(idx[: round(len(idx) * dev_fraction)])
    train = [ex for i, ex in enumerate(examples) if i not in dev_idx]
    dev = [ex for i, ex in enumerate(examples) if i in dev_idx]
    return train, dev


# --------------------------------------------------------------------------- presets


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: `override`, else $DYNPROMPT_DATA_DIR, else
    `../shared/data` next to the repository root (never copied into the repo)."""
    if override is not None:
        return Path(override)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


@dataclass(frozen=True)
class _Preset:
    description: str
    labels: list[str]
    files: dict[str, str]  # split -> path under the data dir ("" = carved out of `whole`)
    fmt: str
    has_header: bool
    text: str
    label: str
    pair: str | None = None
    whole: str | None = None  # the only file, split seeded into train/dev
    text_fn: Callable[[Record], str] | None = None
    aliases: dict[str, str] = field(default_factory=dict)


def _wic_text(record: Record) -> str:
    return f"{_get_text(record, 'word')}: {_get_text(record, 'sentence1')}"


def _wsc_text(record: Record) -> str:
    """The passage with `*span1*` (the candidate referent) and `[span2]` (the pronoun)
    marked, so that a sentence classifier can see which pair is being asked about."""
    text = _get_text(record, "text")
    target = record.get("target")
    if not isinstance(target, dict):
        raise _FieldError("target", "missing", "missing or not an object")
    spans: list[tuple[int, int, str, str]] = []
    for k, (open_, close) in (("1", ("*", "*")), ("2", ("[", "]"))):
        span_text = target.get(f"span{k}_text")
        span_index = target.get(f"span{k}_index")
        if not isinstance(span_text, str) or not span_text.strip():
            raise _FieldError(f"target.span{k}_text", "missing", "missing or empty")
        if not isinstance(span_index, int) or isinstance(span_index, bool):
            raise _FieldError(f"target.span{k}_index", "missing", "missing or not an integer")
        start, end = _locate_span(text, span_text, span_index, f"target.span{k}_index")
        spans.append((start, end, open_, close))
    # Insert markers right to left; at one position, closers go before openers and
    # the longer span opens first, so nested spans ("*[their] mothers*") stay nested.
    inserts: list[tuple[int, int, int, str]] = []
    for start, end, open_, close in spans:
        inserts.append((start, 1, -(end - start), open_))
        inserts.append((end, 0, end - start, close))
    out = text
    for pos, _, _, mark in sorted(inserts, reverse=True):
        out = out[:pos] + mark + out[pos:]
    return out


def _locate_span(text: str, span_text: str, word_index: int, field_name: str) -> tuple[int, int]:
    """Character range of a span given by a word index into `text.split(" ")`.

    A few SuperGLUE WSC rows are off by a word or two, so nearby words are tried
    before falling back to the indexed word itself.
    """
    words = text.split(" ")
    wanted = " ".join(span_text.split())
    n_words = len(wanted.split(" "))
    starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
    for delta in (0, 1, -1, 2, -2):
        i = word_index + delta
        if 0 <= i < len(words):
            got = " ".join(" ".join(words[i : i + n_words]).split())
            if got.casefold().startswith(wanted.casefold()):
                start = starts[i]
                # Cover the span's own characters, not trailing punctuation.
                end = start + len(" ".join(words[i : i + n_words]))
                if text[start : start + len(wanted)].casefold() == wanted.casefold():
                    end = start + len(wanted)
                return start, end
    if not 0 <= word_index < len(words):
        raise _FieldError(
            field_name, "range", f"word index {word_index} outside the text ({len(words)} words)"
        )
    start = starts[word_index]
    end = start + len(" ".join(words[word_index : word_index + n_words]))
    return start, end


_SUPERGLUE_SPLITS = {"train": "train.jsonl", "dev": "val.jsonl"}

_PRESETS: dict[str, _Preset] = {
    "sst2": _Preset(
        description="SST-2 binary sentiment (train 67,349 / dev 872)",
        labels=["negative", "positive"],
        files={"train": "sst2/train.tsv", "dev": "sst2/dev.tsv"},
        fmt="tsv",
        has_header=True,
        text="sentence",
        label="label",
    ),
    "sst5": _Preset(
        description="SST-5 five-way sentiment (train 8,544 / dev 1,101 / test 2,210)",
        labels=["very negative", "negative", "neutral", "positive", "very positive"],
        files={"train": "sst5/train.tsv", "dev": "sst5/dev.tsv", "test": "sst5/test.tsv"},
        fmt="tsv",
        has_header=False,
        text="1",
        label="0",
    ),
    # The file's 0..5 follow the LM-BFF/DPT order, not the Hugging Face `trec` order:
    # counts per index (1162, 1250, 86, 1223, 835, 896) match DESC, ENTY, ABBR, HUM, LOC, NUM.
    "trec": _Preset(
        description="TREC-6 question type (train 5,452 / test 500; dev = test)",
        labels=["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"],
        files={"train": "trec/train.csv", "test": "trec/test.csv"},
        fmt="csv",
        has_header=False,
        text="1",
        label="0",
        aliases={"dev": "test"},
    ),
    "rte": _Preset(
        description="SuperGLUE RTE entailment, premise/hypothesis pairs (train 2,490 / dev 277)",
        labels=["entailment", "not_entailment"],
        files={s: f"superglue/rte/{f}" for s, f in _SUPERGLUE_SPLITS.items()},
        fmt="jsonl",
        has_header=False,
        text="premise",
        pair="hypothesis",
        label="label",
        aliases={"val": "dev"},
    ),
    "cb": _Preset(
        description="SuperGLUE CommitmentBank, 3-way premise/hypothesis (train 250 / dev 56)",
        labels=["entailment", "contradiction", "neutral"],
        files={s: f"superglue/cb/{f}" for s, f in _SUPERGLUE_SPLITS.items()},
        fmt="jsonl",
        has_header=False,
        text="premise",
        pair="hypothesis",
        label="label",
        aliases={"val": "dev"},
    ),
    "boolq": _Preset(
        description="SuperGLUE BoolQ, question/passage (its 3,270-row val file split 80/20 by seed)",
        labels=["false", "true"],
        files={"train": "", "dev": ""},
        whole="superglue/boolq/val.jsonl",
        fmt="jsonl",
        has_header=False,
        text="question",
        pair="passage",
        label="label",
        aliases={"val": "dev"},
    ),
    "wic": _Preset(
        description="SuperGLUE WiC, 'word: sentence1' / sentence2 (its 638-row val file split 80/20 by seed)",
        labels=["false", "true"],
        files={"train": "", "dev": ""},
        whole="superglue/wic/val.jsonl",
        fmt="jsonl",
        has_header=False,
        text="sentence1",
        pair="sentence2",
        label="label",
        text_fn=_wic_text,
        aliases={"val": "dev"},
    ),
    "wsc": _Preset(
        description="SuperGLUE WSC, text with *referent* and [pronoun] marked (train 554 / dev 104)",
        labels=["false", "true"],
        files={s: f"superglue/wsc/{f}" for s, f in _SUPERGLUE_SPLITS.items()},
        fmt="jsonl",
        has_header=False,
        text="text",
        label="label",
        text_fn=_wsc_text,
        aliases={"val": "dev"},
    ),
}

PRESETS: dict[str, str] = {name: p.description for name, p in _PRESETS.items()}
"""Preset name -> one-line description, for `--help`."""

FEWSHOT32_TASKS: tuple[str, ...] = ("boolq", "cb", "rte", "wic", "wsc")
"""Presets with FewGLUE 32-example splits under `superglue/fewshot32/<task>/`.
(The folder also holds copa and multirc, which have no preset.)"""

_SPLIT_DEV_FRACTION = 0.2


def _preset(name: str) -> _Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise DataError(
            f"unknown preset {name!r} (known: {', '.join(_PRESETS)})", field="preset"
        ) from None


def preset_splits(name: str) -> list[str]:
    """Split names `load_preset` accepts for `name`, aliases included."""
    p = _preset(name)
    return list(p.files) + [a for a in p.aliases if a not in p.files]


def _resolve_dir(data_dir_: str | os.PathLike[str] | None) -> Path:
    root = data_dir(data_dir_)
    if not root.is_dir():
        raise DataError(
            f"{root}: data folder not found; put the shared data there or set {DATA_DIR_ENV}",
            path=str(root),
        )
    return root


def _read_preset_file(
    name: str, p: _Preset, path: Path, min_classes: int, source: str | None = None
) -> LabelledData:
    needed = [p.text, p.label] + ([p.pair] if p.pair else [])
    records = list(_iter_records(path, p.fmt, p.has_header, needed))
    pair_field = p.pair

    def pair_fn(record: Record) -> str | None:
        return _get_text(record, pair_field) if pair_field is not None else None

    text_field = p.text
    return _build(
        name=name,
        path=path,
        records=records,
        text_fn=p.text_fn or (lambda r: _get_text(r, text_field)),
        pair_fn=pair_fn,
        label_field=p.label,
        labels=list(p.labels),
        min_classes=min_classes,
        source=source,
    )


def load_preset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    regime: str = "full",
    min_classes: int = 2,
) -> LabelledData:
    """Load a named task from the shared data folder.

    `split` is "train", "dev" or, where the task has one, "test"; "dev" is whatever
    the task evaluates on (SST dev, SuperGLUE val, TREC test), and "val" is accepted
    for SuperGLUE tasks. BoolQ and WiC ship one labelled file, split here 80/20 per
    class with `seed` (train and dev of one seed never overlap); `seed` does nothing
    for the other tasks. `regime="fewshot32"` reads the FewGLUE 32-example splits
    instead (see `load_fewshot32`).
    """
    if regime == "fewshot32":
        return load_fewshot32(name, split, data_dir, min_classes=min_classes)
    if regime != "full":
        raise DataError(f"unknown regime {regime!r} (known: full, fewshot32)", field="regime")
    p = _preset(name)
    key = p.aliases.get(split, split)
    if key not in p.files:
        raise DataError(
            f"preset {name!r} has no split {split!r} (known: {', '.join(preset_splits(name))})",
            field="split",
        )
    root = _resolve_dir(data_dir)
    if p.whole is None:
        return _read_preset_file(name, p, root / p.files[key], min_classes)
    whole_path = root / p.whole
    whole = _read_preset_file(name, p, whole_path, min_classes)
    train, dev = _stratified_split(whole.examples, len(whole.labels), seed, _SPLIT_DEV_FRACTION)
    data = LabelledData(
        name=name,
        labels=whole.labels,
        examples=train if key == "train" else dev,
        source=f"{whole_path} (seeded {key} part, seed={seed})",
    )
    _check_classes(data, data.source, p.label, min_classes)
    return data


def load_fewshot32(
    task: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    min_classes: int = 2,
) -> LabelledData:
    """FewGLUE 32-example split of a SuperGLUE task: "train" (train.jsonl) or "dev"
    (dev32.jsonl; "dev32" is accepted too). Labels and text layout are the preset's.

    Note: FewGLUE's WSC train file holds only positive examples, so it is refused as
    a one-class split unless `min_classes=1`.
    """
    if task not in FEWSHOT32_TASKS:
        raise DataError(
            f"no fewshot32 split for {task!r} (known: {', '.join(FEWSHOT32_TASKS)})",
            field="task",
        )
    files = {"train": "train.jsonl", "dev": "dev32.jsonl", "dev32": "dev32.jsonl"}
    if split not in files:
        raise DataError(
            f"fewshot32 has no split {split!r} (known: {', '.join(files)})", field="split"
        )
    root = _resolve_dir(data_dir)
    return _read_preset_file(
        task, _preset(task), root / "superglue" / "fewshot32" / task / files[split], min_classes
    )


# --------------------------------------------------------------------------- Hugging Face


def load_hf(
    name: str,
    split: str,
    mapping: ColumnMapping,
    config: str | None = None,
    *,
    min_classes: int = 2,
) -> LabelledData:
    """Load a Hugging Face `datasets` dataset (needs the optional `datasets` package and,
    unless cached, the network). Without `mapping.labels`, a `ClassLabel` column's
    names are used. Nothing in dynprompt's defaults or tests calls this."""
    where = f"hf:{name}" + (f"/{config}" if config else "") + f"[{split}]"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{where}: Hugging Face datasets need the optional package `datasets` "
            "(pip install datasets) and network access; offline, use a file or a preset",
            path=where,
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad split: all reported the same way
        raise DataError(f"{where}: cannot load: {exc}", path=where) from exc
    labels = list(mapping.labels) if mapping.labels is not None else None
    if labels is None:
        feature = getattr(ds, "features", {}).get(mapping.label)
        names = getattr(feature, "names", None)
        if names:
            labels = [str(n) for n in names]
    records = [(i, dict(row)) for i, row in enumerate(ds, start=1)]
    pair_field = mapping.text_pair

    def pair_fn(record: Record) -> str | None:
        return _get_text(record, pair_field) if pair_field is not None else None

    return _build(
        name=name,
        path=Path(where),
        records=records,
        text_fn=lambda r: _get_text(r, mapping.text),
        pair_fn=pair_fn,
        label_field=mapping.label,
        labels=labels,
        min_classes=min_classes,
        source=where,
        unit="row",
    )
