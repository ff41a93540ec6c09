"""The `dynprompt` console command.

Each subcommand lives with the package that owns it and is imported only when
called, so `dynprompt serve` never imports the trainer and `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). The function takes argv (list[str]) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("dynprompt.training.cli", "train_main", "train a dynamic-prompt checkpoint"),
    "eval": ("dynprompt.training.cli", "eval_main", "evaluate a checkpoint on labelled data"),
    "predict": (
        "dynprompt.training.predict",
        "predict_main",
        "classify an unlabelled file or stdin with a checkpoint",
    ),
    "experiment": (
        "dynprompt.training.experiment",
        "experiment_main",
        "train and compare every variant on several tasks and seeds",
    ),
    "serve": ("dynprompt.service.cli", "serve_main", "serve a model repository over HTTP"),
    "export-onnx": ("dynprompt.models.onnx_export", "export_main", "export a backbone to ONNX"),
    "bench": ("benchmarks.cli", "bench_main", "run a benchmark (from a source checkout)"),
}


def _usage() -> str:
    lines = ["usage: dynprompt [-h] [-V] <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this help and exit",
        "  -V, --version  print the version and exit",
        "",
        "Run `dynprompt <command> --help` for the options of one command.",
    ]
    return "\n".join(lines)


def _add_source_checkout() -> None:
    """Benchmarks ship with the repository, not the wheel: find them beside the package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "cli.py").exists():
        raise SystemExit("dynprompt bench runs from a source checkout (benchmarks/ not found)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a command is required: say which exist, and fail like a usage error
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from dynprompt import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"dynprompt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    if module_name.startswith("benchmarks."):
        _add_source_checkout()
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
