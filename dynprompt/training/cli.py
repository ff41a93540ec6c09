"""`dynprompt train` and `dynprompt eval`.

`train` builds a `TrainConfig` from a YAML/TOML file (`--config`) and one flag per
config field (generated from the pydantic model, so `--help` lists and explains
every field), plus `--set key=value` for anything, nested task lists included.
Bad configs and bad data fail before any model is built, with a message naming
the file, line and field, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from dynprompt.training.config import (
    ConfigError,
    TrainConfig,
    build_config,
    parse_value,
    read_config_file,
)
from dynprompt.training.data import PRESETS, DataError

EXIT_USAGE = 2


def _error(command: str, message: str) -> int:
    print(f"dynprompt {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    """Literal choices of a field's annotation (through `X | None`)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in args]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in args:
            found = _choices(arg)
            if found:
                return found
    return None


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprompt train",
        description=(
            "Train a dynamic-prompt classifier over a frozen backbone. Settings come from "
            "defaults, then --config FILE, then the flags below (every config field has one). "
            "Data: a --preset over the shared data folder, or --train-file/--dev-file with a "
            "column mapping; multitask: --task PRESET repeated (or `tasks:` in the file)."
        ),
        epilog="presets: " + "; ".join(f"{k} ({v})" for k, v in PRESETS.items()),
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) config file"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field; VALUE is YAML (e.g. --set tasks='[{preset: rte}, {preset: cb}]')",
    )
    parser.add_argument(
        "--task",
        dest="task_presets",
        action="append",
        default=None,
        metavar="PRESET",
        help="multitask: add a preset task (repeat the flag); each task gets its own checkpoint",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    group = parser.add_argument_group("config fields (override the file)")
    for name, info in TrainConfig.model_fields.items():
        if name == "tasks":
            continue
        default = info.default
        help_text = (info.description or "") + (
            f" [default: {default}]" if default is not None else ""
        )
        help_text = help_text.replace("%", "%%")
        if _is_bool(info.annotation):
            group.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        choices = _choices(info.annotation)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        if _is_list(info.annotation):
            metavar = "A,B,..."
        group.add_argument(
            _flag(name), dest=name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
        )
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flag values (only those given), parsed as YAML scalars; lists split on commas."""
    out: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if not hasattr(args, name):
            continue
        raw = getattr(args, name)
        if isinstance(raw, bool):
            out[name] = raw
        elif _is_list(info.annotation):
            value = parse_value(raw)
            out[name] = (
                value
                if isinstance(value, list) or value is None
                else [part.strip() for part in str(raw).split(",") if part.strip()]
            )
        else:
            value = parse_value(raw)
            # Keep text fields text: `--name 2024` or `--text-field 1` are names, not numbers.
            out[name] = (
                str(raw) if info.annotation in (str, str | None) and value is not None else value
            )
    if args.task_presets:
        out["tasks"] = [{"preset": p} for p in args.task_presets]
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def resolve_train_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args = train_parser().parse_args(argv)
    file_values = read_config_file(args.config) if args.config else {}
    overrides = overrides_from_args(args)
    source = args.config or "command line"
    if args.config and overrides:
        source = f"{args.config} (with command-line overrides)"
    return build_config(file_values, overrides, source), args


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
    from dynprompt.models.backbone import BackboneError
    from dynprompt.training.prepare import load_tasks

    try:
        splits = load_tasks(config)  # every file read and checked before anything heavy
    except DataError as exc:
        return _error("train", str(exc))
    from dynprompt.training.trainer import train

    try:
        result = train(config, splits=splits)
    except (DataError, BackboneError) as exc:
        return _error("train", str(exc))
    for name, res in result.results.items():
        where = result.checkpoints.get(name)
        print(
            f"{name}: dev accuracy {res.accuracy:.4f}, macro-F1 {res.macro_f1:.4f} "
            f"({res.n} examples, step {result.best_step})" + (f" -> {where}" if where else "")
        )
    return 0


# ----------------------------------------------------------------------------- eval


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprompt eval",
        description=(
            "Evaluate a checkpoint on a labelled file or a preset split: accuracy, macro-F1, "
            "per-class scores, the confusion matrix and the router's decision histograms."
        ),
        epilog="presets: " + ", ".join(PRESETS),
    )
    parser.add_argument(
        "checkpoint", help="checkpoint folder (dynprompt.json + weights.safetensors)"
    )
    src = parser.add_argument_group("data (a preset split, or a file with a column mapping)")
    src.add_argument("--preset", help="preset name")
    src.add_argument("--split", default="dev", help="preset split (train, dev, test)")
    src.add_argument(
        "--regime", default="full", choices=["full", "fewshot32"], help="preset regime"
    )
    src.add_argument("--data-dir", help="shared data folder (default: ../shared/data)")
    src.add_argument("--split-seed", type=int, default=0, help="split seed for BoolQ/WiC")
    src.add_argument("--file", help="labelled .tsv, .csv or .jsonl file")
    src.add_argument(
        "--format", choices=["tsv", "csv", "jsonl"], help="file format (default: suffix)"
    )
    src.add_argument("--no-header", action="store_true", help="TSV/CSV without a header row")
    src.add_argument("--text-field", default="text", help="text column")
    src.add_argument("--pair-field", help="second-text column (pairs)")
    src.add_argument("--label-field", default="label", help="label column")
    parser.add_argument("--limit", type=int, help="evaluate a seeded subset of at most N examples")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--backbone", help="load this backbone instead of the checkpoint's name_or_path"
    )
    parser.add_argument(
        "--json", dest="json_out", metavar="PATH", help="also write the result as JSON"
    )
    parser.add_argument(
        "--output", choices=["table", "json"], default="table", help="what to print on stdout"
    )
    parser.add_argument("--plot", metavar="PNG", help="also write the routing histogram as a PNG")
    return parser


def eval_main(argv: list[str]) -> int:
    """`dynprompt eval`: exit 0 on success, 2 on a bad checkpoint or bad data."""
    args = eval_parser().parse_args(argv)
    from dynprompt.models.backbone import BackboneError, load_backbone
    from dynprompt.models.checkpoint import CheckpointError, load_checkpoint, read_config
    from dynprompt.training.data import ColumnMapping, load_preset, read_file
    from dynprompt.training.prepare import subsample, tokenize

    if (args.preset is None) == (args.file is None):
        return _error("eval", "give exactly one of --preset NAME or --file PATH")
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
            mapping = ColumnMapping(
                text=args.text_field,
                label=args.label_field,
                text_pair=args.pair_field,
                labels=labels,
            )
            data = read_file(args.file, mapping, args.format, not args.no_header, min_classes=1)
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
    payload = {
        "checkpoint": str(args.checkpoint),
        "model": model.name,
        "variant": model.config.variant,
        "data": data.source,
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
        )
    return 0
