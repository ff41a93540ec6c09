"""`dynprompt predict CHECKPOINT FILE|-`: classify an unlabelled file, or stdin, offline.

Rows stream through and nothing holds the whole input: a reader thread parses rows
into a bounded queue; the main thread takes the rows that are there (at most a
window of `--batch-size` x 8), tokenises them in one call, classifies them in
length-sorted batches through the batch pipeline the server uses
(`Backbone.tokenize_rows`, `collate`, `classify_rows`), and writes the answers in
input order before it takes more. Memory is bounded by the window, so a 1 GB file
works, and on a pipe the answers to rows come out while later rows are still on
their way.

The file is read the way the checkpoint's training data was (its stored column
mapping: fields, header, format, or the preset's layout); flags override each part.
A bad row stops the run with exit code 2 and a message naming the file, the line
and the field; with `--output`, nothing is left behind then (the file is written
under a temporary name and renamed at the end).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dynprompt.training.data import DataError, InputRow, Layout, read_inputs
from dynprompt.training.progress import ProgressDisplay

if TYPE_CHECKING:
    from dynprompt.models.inference import RowResult
    from dynprompt.models.model import DynPromptModel

EXIT_USAGE = 2
WINDOW_BATCHES = 8  # rows sorted by length together, in batches
MAX_WAIT_S = 0.05  # how long a started window waits for more rows from a slow pipe


def predict_parser() -> argparse.ArgumentParser:
    from dynprompt.training.cli import add_layout_args, add_threads_arg

    parser = argparse.ArgumentParser(
        prog="dynprompt predict",
        description=(
            "Classify an unlabelled TSV, CSV or JSONL file (or stdin: -) with a checkpoint, "
            "offline. The file is read with the checkpoint's stored column mapping (the "
            "fields it was trained on); the flags below override it. Writes one result per "
            "input row, in input order: JSONL (default) or CSV (--output-format), to stdout "
            "or --output."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint folder (dynprompt.json + weights)")
    parser.add_argument("input", help="input file (.tsv, .csv, .jsonl), or - for stdin")
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", metavar="PATH", help="write here (default: stdout)")
    out.add_argument(
        "--output-format",
        choices=["jsonl", "csv"],
        default="jsonl",
        help="output format [default: jsonl]",
    )
    out.add_argument("--all-scores", action="store_true", help="add every label's probability")
    out.add_argument(
        "--routing",
        action="store_true",
        help="add the router's decision: prompt_length, tokens_before, tokens_after, "
        "pool_weights (pooled prompts)",
    )
    data = parser.add_argument_group("input layout (default: the checkpoint's)")
    # `--format` is the input's format, as in `train` and `eval`; `--input-format` was
    # its name here once and still works, out of the help.
    data.add_argument(
        "--format",
        choices=["tsv", "csv", "jsonl"],
        help="input format (default: the file's suffix, else the checkpoint's)",
    )
    data.add_argument(
        "--input-format", dest="format", choices=["tsv", "csv", "jsonl"], help=argparse.SUPPRESS
    )
    add_layout_args(data, labels=False)
    run = parser.add_argument_group("compute")
    run.add_argument("--batch-size", type=int, default=64, help="rows per forward [default: 64]")
    run.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ..."
    )
    run.add_argument(
        "--backbone", help="load this backbone instead of the checkpoint's name_or_path"
    )
    add_threads_arg(run)
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _error(message: str) -> int:
    print(f"dynprompt predict: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ----------------------------------------------------------------------------- reading


_END = object()


class _Reader:
    """Parses rows on a thread into a bounded queue, so reading overlaps compute and a
    slow pipe never holds up rows that have already arrived."""

    def __init__(self, rows: Iterator[InputRow], capacity: int) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(rows,), daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, rows: Iterator[InputRow]) -> None:
        try:
            for row in rows:
                if not self._put(row):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the main thread, raised there in order
            self._put(exc)

    def windows(self, size: int) -> Iterator[list[InputRow]]:
        """Lists of at most `size` rows, in input order: whatever has arrived, waiting
        at most `MAX_WAIT_S` for more once a window has its first row."""
        pending: Any = None
        while True:
            item = self.queue.get() if pending is None else pending
            pending = None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            window: list[InputRow] = [item]
            deadline = time.monotonic() + MAX_WAIT_S
            while len(window) < size:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _END or isinstance(item, BaseException):
                    pending = item
                    break
                window.append(item)
            yield window

    def close(self) -> None:
        self.stop.set()


# ----------------------------------------------------------------------------- writing


class _Writer:
    """One result per row, JSONL or CSV, flushed after every window."""

    def __init__(
        self,
        stream: IO[str],
        fmt: str,
        labels: list[str],
        pool_size: int,
        all_scores: bool,
        routing: bool,
    ) -> None:
        self.stream, self.fmt, self.labels = stream, fmt, labels
        self.all_scores, self.routing, self.pool_size = all_scores, routing, pool_size
        self.csv: Any = None
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            header = ["line", "label", "score"]
            if all_scores:
                header += [f"score_{label}" for label in labels]
            if routing:
                header += ["prompt_length", "tokens_before", "tokens_after"]
                header += [f"pool_weight_{k}" for k in range(pool_size)]
            self.csv.writerow(header)

    def write(self, row: InputRow, result: RowResult) -> None:
        probs = result.probs
        best = max(range(len(probs)), key=probs.__getitem__)
        if self.csv is not None:
            cells: list[Any] = [row.line, self.labels[best], probs[best]]
            if self.all_scores:
                cells += probs
            if self.routing:
                cells += [
                    result.prompt_length,
                    result.tokens_before,
                    result.prompt_length - result.tokens_before,
                ]
                if self.pool_size:
                    cells += result.pool_weights or [""] * self.pool_size
            self.csv.writerow(cells)
            return
        record: dict[str, Any] = {
            "line": row.line,
            "label": self.labels[best],
            "score": probs[best],
        }
        if self.all_scores:
            record["scores"] = dict(zip(self.labels, probs, strict=True))
        if self.routing:
            record["routing"] = {
                "prompt_length": result.prompt_length,
                "tokens_before": result.tokens_before,
                "tokens_after": result.prompt_length - result.tokens_before,
            }
            if result.pool_weights is not None:
                record["routing"]["pool_weights"] = result.pool_weights
        self.stream.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.stream.flush()


# ----------------------------------------------------------------------------- the run


def classify_stream(
    model: DynPromptModel,
    rows: Iterator[InputRow],
    writer: _Writer,
    batch_size: int,
    progress: ProgressDisplay | None = None,
) -> int:
    """Classify `rows` with `model` window by window; returns the number of rows."""
    from dynprompt.models.inference import classify_rows

    backbone = model.backbone  # the finetune baseline carries its own copy
    spec = model.config.input
    reader = _Reader(rows, capacity=batch_size * WINDOW_BATCHES)
    done = 0
    try:
        for window in reader.windows(batch_size * WINDOW_BATCHES):
            tokenized = backbone.tokenize_rows(
                [r.text for r in window],
                [r.text_pair for r in window],
                spec.max_length,
                spec.truncation_side,
            )
            order = sorted(range(len(window)), key=lambda i: len(tokenized[i].input_ids))
            answers: list[RowResult | None] = [None] * len(window)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                encoded = backbone.collate([tokenized[i] for i in chunk], device=backbone.device)
                results, _ = classify_rows(backbone, [model] * len(chunk), encoded)
                for i, result in zip(chunk, results, strict=True):
                    answers[i] = result
            for row, answer in zip(window, answers, strict=True):
                assert answer is not None
                writer.write(row, answer)
            writer.flush()
            done += len(window)
            if progress is not None:
                progress.update(len(window))
    finally:
        reader.close()
    return done


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict_main(argv: list[str]) -> int:
    """`dynprompt predict`: exit 0 on success, 2 on a bad checkpoint, input or row."""
    args = predict_parser().parse_args(argv)
    if args.batch_size < 1:
        return _error(f"--batch-size must be at least 1, got {args.batch_size}")
    from dynprompt.training.cli import torch_threads

    with torch_threads(args.num_threads):
        return _predict(args)


def _predict(args: argparse.Namespace) -> int:
    from dynprompt.models.backbone import BackboneError, load_backbone
    from dynprompt.models.checkpoint import CheckpointError, load_checkpoint, read_config
    from dynprompt.training.cli import file_layout

    try:
        config = read_config(args.checkpoint)
    except CheckpointError as exc:
        return _error(str(exc))
    layout = file_layout(args, Layout.from_input_spec(config.input))
    if layout.pair_field is not None and config.input.pair_field is None:
        return _error(
            f"{args.checkpoint} classifies single texts; it was not trained on pairs "
            f"(drop --pair-field)"
        )
    source = "-" if args.input == "-" else Path(args.input)
    try:
        rows = read_inputs(source, layout, args.format)
        first = next(rows, None)  # a missing file or a bad header fails before any loading
    except DataError as exc:
        return _error(str(exc))
    try:
        backbone = load_backbone(
            args.backbone or config.backbone.name_or_path, _resolve_device(args.device)
        )
        model = load_checkpoint(args.checkpoint, backbone)
    except (CheckpointError, BackboneError) as exc:
        return _error(str(exc))
    model.eval()

    def all_rows() -> Iterator[InputRow]:
        if first is not None:
            yield first
            yield from rows

    output: IO[str] = sys.stdout
    tmp: Path | None = None
    if args.output:
        target = Path(args.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        output = tmp.open("w", encoding="utf-8", newline="")
    progress = ProgressDisplay(desc="predict", unit="row", enabled=not args.quiet)
    try:
        writer = _Writer(
            output,
            args.output_format,
            list(config.head.labels),
            config.prompt.pool_size if config.router.pool == "instance" else 0,
            args.all_scores,
            args.routing,
        )
        n = classify_stream(model, all_rows(), writer, args.batch_size, progress)
    except DataError as exc:
        progress.close()
        _discard(output, tmp)
        return _error(str(exc))
    except BrokenPipeError:  # `| head`: the reader went away, which is not an error
        progress.close()
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    progress.close()
    output.flush()
    if tmp is not None:
        output.close()
        tmp.replace(Path(args.output))
    if not args.quiet:
        where = args.output or "stdout"
        print(f"dynprompt predict: {n} rows -> {where}", file=sys.stderr)
    return 0


def _discard(output: IO[str], tmp: Path | None) -> None:
    if tmp is not None:
        output.close()
        tmp.unlink(missing_ok=True)
