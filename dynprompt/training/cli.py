"""`dynprompt train` and `dynprompt eval`.

`train` reads its settings through pydantic-settings (`dynprompt.training.settings`:
defaults, a YAML/TOML file, `DYNPROMPT_TRAIN_*` variables, one generated flag per
config field, `--set key=value`). Bad configs, bad data and a run folder that holds
another run fail before any model is built, with a message naming the file, line
and field (or what changed), and exit code 2. Nothing here imports torch before the
arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dynprompt.training.config import ConfigError
from dynprompt.training.data import PRESETS, DataError

EXIT_USAGE = 2


def _error(command: str, message: str) -> int:
    print(f"dynprompt {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def train_parser() -> argparse.ArgumentParser:
    from dynprompt.training.settings import train_parser as build

    return build()[0]


def resolve_train_config(argv: list[str]) -> tuple[Any, argparse.Namespace]:
    from dynprompt.training.settings import resolve_train_config as resolve

    return resolve(argv)


def train_main(argv: list[str]) -> int:
    """`dynprompt train`: exit 0 on success, 2 on a bad config or bad data."""
    try:
        config, args = resolve_train_config(argv)
    except ConfigError as exc:
        return _error("train", str(exc))
    if args.print_config:
        from dynprompt.training.config import dump_config

        print(dump_config(config), end="")
        return 0
    from dynprompt.training.prepare import load_tasks
    from dynprompt.training.resume import check_run_folder

    try:
        splits = load_tasks(config)  # every file read and checked before anything heavy
        check_run_folder(config, splits)  # a folder holding another run: refused now
    except (DataError, ConfigError) as exc:
        return _error("train", str(exc))
    from dynprompt.models.backbone import BackboneError
    from dynprompt.training.trainer import train

    try:
        result = train(config, splits=splits)
    except (ConfigError, DataError, BackboneError) as exc:  # ConfigError: a run folder's
        return _error("train", str(exc))
    for name, res in result.results.items():
        where = result.checkpoints.get(name)
        print(
            f"{name}: dev accuracy {res.accuracy:.4f}, macro-F1 {res.macro_f1:.4f} "
            f"({res.n} examples, step {result.best_step})" + (f" -> {where}" if where else "")
        )
    return 0


# ----------------------------------------------------------------------------- eval


def add_layout_args(group: Any, labels: bool = True) -> None:
    """The flags that say how a file holds its rows, spelled as `train` spells them.
    Unset, they leave the checkpoint's stored layout in force."""
    group.add_argument(
        "--header",
        dest="has_header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TSV/CSV files have a header row (--no-header: columns are named 0, 1, ...)",
    )
    group.add_argument(
        "--has-header",
        dest="has_header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=argparse.SUPPRESS,
    )
    group.add_argument("--text-field", help="column or JSON key holding the text")
    group.add_argument("--pair-field", help="column holding the second text of a pair")
    if labels:
        group.add_argument("--label-field", help="column or JSON key holding the label")


def thread_count(text: str) -> int | None:
    if text.strip().lower() in ("null", "none"):
        return None
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def add_threads_arg(group: Any) -> None:
    group.add_argument(
        "--num-threads",
        type=thread_count,
        default=1,
        metavar="N",
        help="CPU threads for torch (null: torch's choice, one per core) [default: 1, as for "
        "train: the fastest on a shared 2-core machine]",
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's thread count set to `n` (None: left alone) for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprompt eval",
        description=(
            "Evaluate a checkpoint on a labelled file or a preset split: accuracy, macro-F1, "
            "per-class scores, the confusion matrix and the router's decision histograms. "
            "A file is read the way the checkpoint's training data was (its stored fields, "
            "header and format); the layout flags override that."
        ),
        epilog="presets: " + ", ".join(PRESETS),
    )
    parser.add_argument(
        "checkpoint", help="checkpoint folder (dynprompt.json + weights.safetensors)"
    )
    src = parser.add_argument_group("data (a preset split, or a labelled file)")
    src.add_argument("--preset", help="preset name")
    src.add_argument("--split", default="dev", help="preset split (train, dev, test)")
    src.add_argument(
        "--regime", default="full", choices=["full", "fewshot32"], help="preset regime"
    )
    src.add_argument("--data-dir", help="shared data folder (default: ../shared/data)")
    src.add_argument("--split-seed", type=int, default=0, help="split seed for BoolQ/WiC")
    src.add_argument("--file", help="labelled .tsv, .csv or .jsonl file")
    src.add_argument(
        "--format",
        choices=["tsv", "csv", "jsonl"],
        help="file format (default: the suffix, else the checkpoint's)",
    )
    add_layout_args(src)
    parser.add_argument("--limit", type=int, help="evaluate a seeded subset of at most N examples")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_threads_arg(parser)
    parser.add_argument(
        "--backbone", help="load this backbone instead of the checkpoint's name_or_path"
    )
    parser.add_argument(
        "--json", dest="json_out", metavar="PATH", help="also write the result as JSON"
    )
    parser.add_argument(
        "--output-format",
        dest="output",
        choices=["table", "json"],
        default="table",
        help="what to print on stdout (as predict's --output-format names its output's format)",
    )
    # The old name: `--output` is a file path in `predict`, so it is kept here hidden.
    parser.add_argument(
        "--output", dest="output", choices=["table", "json"], help=argparse.SUPPRESS
    )
    parser.add_argument("--plot", metavar="PNG", help="also write the routing histogram as a PNG")
    return parser


def file_layout(args: argparse.Namespace, stored: Any) -> Any:
    """The checkpoint's stored layout with the layout flags given on top; naming a
    column drops a preset's own way of building its text."""
    changes: dict[str, Any] = {}
    if args.has_header is not None:
        changes["has_header"] = args.has_header
    for flag in ("text_field", "pair_field", "label_field"):
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
            if flag != "label_field":
                changes["preset"] = None
    return stored.replace(**changes)


def eval_main(argv: list[str]) -> int:
    """`dynprompt eval`: exit 0 on success, 2 on a bad checkpoint or bad data."""
    args = eval_parser().parse_args(argv)
    if (args.preset is None) == (args.file is None):
        return _error("eval", "give exactly one of --preset NAME or --file PATH")
    with torch_threads(args.num_threads):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from dynprompt.models.backbone import BackboneError, load_backbone
    from dynprompt.models.checkpoint import CheckpointError, load_checkpoint, read_config
    from dynprompt.training.data import Layout, load_preset, read_labelled
    from dynprompt.training.prepare import subsample, tokenize

    try:
        ckpt_config = read_config(args.checkpoint)
        labels = list(ckpt_config.head.labels)
        if args.preset is not None:
            data = load_preset(
                args.preset, args.split, args.data_dir, seed=args.split_seed, regime=args.regime
            )
            if data.labels != labels:
                return _error(
                    "eval",
                    f"preset {args.preset!r} has labels {data.labels}, the checkpoint "
                    f"{args.checkpoint} has {labels}",
                )
        else:
            layout = file_layout(args, Layout.from_input_spec(ckpt_config.input))
            data = read_labelled(args.file, layout, labels, args.format, min_classes=1)
        data = subsample(data, args.limit, 0, "evaluation subset")
        backbone = load_backbone(
            args.backbone or ckpt_config.backbone.name_or_path, device=args.device
        )
        model = load_checkpoint(args.checkpoint, backbone)
    except (DataError, CheckpointError, BackboneError) as exc:
        return _error("eval", str(exc))

    from dynprompt.training.evaluate import evaluate_model, format_report

    rows = tokenize(
        backbone, data, model.config.input.max_length, model.config.input.truncation_side
    )
    result = evaluate_model(model, rows.rows, rows.labels, args.batch_size)
    where = f"{args.preset} {args.split}" if args.preset is not None else Path(args.file).name
    payload = {
        "checkpoint": str(args.checkpoint),
        "model": model.name,
        "variant": model.config.variant,
        "data": data.source,
        "split": f"{where} ({result.n} examples)",
        **result.to_json(),
    }
    if args.output == "json":
        print(json.dumps(payload, indent=2))
    else:
        title = f"{model.name} ({model.config.variant}) on {data.source}"
        print(format_report(result, title))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        from dynprompt.training.plots import plot_routing

        plot_routing(
            {
                model.name: {
                    "tokens_before": payload["tokens_before"],
                    "prompt_length": payload["prompt_length"],
                }
            },
            Path(args.plot),
            split=str(payload["split"]),
        )
    return 0
