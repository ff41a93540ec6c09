"""`dynprompt experiment`: every variant and baseline on the same data and budget.

Trains and evaluates each method on each task with several seeds, caches each
finished run as a JSON file (so a stopped experiment resumes where it stopped),
and writes `docs/results.md` with mean ± std per cell, the average column, the
device and budget, and a plot. Within one seed every method sees the same
training subset and the same dev subset; seeds change the subset, the
initialisation, the batch order and the Gumbel noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dynprompt.training.config import ConfigError, TrainConfig, read_config_file

# Method name -> config fields that differ from the budget's common settings.
METHODS: dict[str, dict[str, Any]] = {
    "linear_probe": {"variant": "linear_probe"},
    "prefix": {"variant": "prefix"},
    "task_position": {"variant": "task_position"},
    "instance_position": {"variant": "instance_position", "feature": "backbone"},
    "instance_position_emb": {"variant": "instance_position", "feature": "embeddings"},
    "instance_length": {"variant": "instance_length"},
    "instance_prompt": {"variant": "instance_prompt"},
    "dynamic": {"variant": "dynamic"},
    "finetune": {"variant": "finetune"},
}
METHOD_LABELS: dict[str, str] = {
    "linear_probe": "linear probe (head only)",
    "prefix": "prefix (vanilla prompt tuning)",
    "task_position": "task_position",
    "instance_position": "instance_position (backbone features)",
    "instance_position_emb": "instance_position (embedding features)",
    "instance_length": "instance_length",
    "instance_prompt": "instance_prompt (pool of 4)",
    "dynamic": "dynamic (position + length + pool)",
    "finetune": "finetune (all backbone weights)",
}
TASKS: tuple[str, ...] = ("sst2", "rte", "cb", "trec", "boolq")


class Budget(BaseModel):
    """What every run gets: the same for every method, so the comparison is fair."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "minilm"
    train_examples: int = Field(default=400, description="seeded training subset per task")
    dev_examples: int = Field(default=200, description="seeded dev subset per task")
    steps: int = Field(default=60, description="optimizer steps")
    batch_size: int = 8
    prompt_length: int = 10
    pool_size: int = 4
    max_length: dict[str, int] = Field(
        default_factory=lambda: {"sst2": 64, "trec": 64, "rte": 80, "cb": 80, "boolq": 80}
    )
    lr_prompt: float = 1e-2
    lr_router: float = 3e-2
    lr_head: float = 5e-3
    lr_backbone: float = 5e-5
    warmup_steps: int = 6
    num_threads: int | None = None

    def config_for(self, task: str, method: str, seed: int, device: str) -> TrainConfig:
        fields: dict[str, Any] = {
            "name": task,
            "preset": task,
            "backbone": self.backbone,
            "prompt_length": self.prompt_length,
            "max_length": self.max_length.get(task, 128),
            "max_train_examples": self.train_examples,
            "final_eval_limit": self.dev_examples,
            "eval_limit": self.dev_examples,
            "batch_size": self.batch_size,
            "max_steps": self.steps,
            "eval_every": self.steps,  # one evaluation, at the end: no selection on dev
            "keep_best": False,
            "lr_prompt": self.lr_prompt,
            "lr_router": self.lr_router,
            "lr_head": self.lr_head,
            "lr_backbone": self.lr_backbone,
            "warmup_steps": self.warmup_steps,
            "seed": seed,
            "split_seed": 0,
            "device": device,
            "quiet": True,
            "plots": False,
            "resume": False,
            "num_threads": self.num_threads,
        }
        fields.update(METHODS[method])
        if fields["variant"] in ("instance_prompt", "dynamic"):
            fields["pool_size"] = self.pool_size
        return TrainConfig.model_validate(fields)

    def key(self, method: str | None = None) -> str:
        """Identifies what a cached run depends on: the common budget plus, for `method`,
        only the settings that method uses (so a changed router learning rate re-runs the
        router variants and keeps the prefix, probe and finetune runs). The thread count
        changes no result and is left out."""
        common = {
            "backbone",
            "train_examples",
            "dev_examples",
            "steps",
            "batch_size",
            "max_length",
            "lr_head",
            "warmup_steps",
        }
        fields = set(type(self).model_fields) - {"num_threads"}
        if method is not None:
            variant = METHODS[method]["variant"]
            used = set(common)
            if variant not in ("linear_probe", "finetune"):
                used |= {"prompt_length", "lr_prompt"}
            if variant not in ("linear_probe", "finetune", "prefix"):
                used.add("lr_router")
            if variant in ("instance_prompt", "dynamic"):
                used.add("pool_size")
            if variant == "finetune":
                used.add("lr_backbone")
            fields = used
        values = self.model_dump(mode="json", include=fields)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def run_path(run_dir: Path, task: str, method: str, seed: int) -> Path:
    return run_dir / task / method / f"seed{seed}.json"


def load_cached(path: Path, budget_key: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("budget") == budget_key else None


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    import os

    cores = os.cpu_count() or 0
    return f"CPU: {platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"


def run_experiment(
    budget: Budget,
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    run_dir: Path,
    results_path: Path | None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    data_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run (or read from the cache) every (seed, task, method); rewrite the report after each."""
    from dynprompt.models.backbone import load_backbone
    from dynprompt.training.prepare import load_task
    from dynprompt.training.trainer import FrozenFeatures, train

    if budget.num_threads:
        torch.set_num_threads(budget.num_threads)
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else device
    resolved = "cpu" if resolved == "auto" else resolved
    todo = [(s, t, m) for s in seeds for t in tasks for m in methods]
    records: list[dict[str, Any]] = []
    backbone = None
    total = len(todo)
    for done, (seed, task, method) in enumerate(todo, start=1):
        path = run_path(run_dir, task, method, seed)
        key = budget.key(method)
        cached = load_cached(path, key)
        if cached is not None:
            records.append(cached)
            continue
        if backbone is None:
            backbone = load_backbone(
                budget.backbone, device="cuda" if resolved == "cuda" else "cpu"
            )
        config = budget.config_for(task, method, seed, resolved)
        if data_dir is not None:
            config = config.model_copy(update={"data_dir": data_dir})
        if (task, seed) not in _splits:
            _splits.clear()
            _splits[(task, seed)] = load_task(
                config.task_list()[0],
                seed=seed,
                eval_limit=config.eval_limit,
                final_limit=config.final_eval_limit,
            )
        splits = _splits[(task, seed)]
        store: dict[str, FrozenFeatures] = _stores.setdefault((task, seed), {})
        _stores_keep_only((task, seed))
        tick = time.time()
        result = train(
            config,
            backbone=backbone,
            splits=[splits],
            save=False,
            log=lambda _m: None,
            feature_store=store,
        )
        seconds = time.time() - tick
        res = result.results[task]
        record = {
            "task": task,
            "method": method,
            "seed": seed,
            "accuracy": res.accuracy,
            "macro_f1": res.macro_f1,
            "dev_examples": res.n,
            "train_examples": len(splits.train),
            "steps": result.steps,
            "seconds": round(seconds, 2),
            "device": device_name(resolved),
            "tokens_before": {str(k): v for k, v in sorted(res.tokens_before.items())},
            "prompt_length": {str(k): v for k, v in sorted(res.prompt_length.items())},
            "budget": key,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        records.append(record)
        log(
            f"[{done}/{total}] seed {seed} {task:<6} {method:<22} acc {res.accuracy:.4f} "
            f"f1 {res.macro_f1:.4f} ({seconds:.0f}s)"
        )
        if results_path is not None:
            write_report(records, budget, tasks, methods, seeds, results_path)
    if results_path is not None:
        write_report(records, budget, tasks, methods, seeds, results_path)
    return records


# Data and frozen-feature caches shared by the methods of one (task, seed); only the
# current (task, seed) is kept.
_stores: dict[tuple[str, int], dict[str, Any]] = {}
_splits: dict[tuple[str, int], Any] = {}


def _stores_keep_only(key: tuple[str, int]) -> None:
    for other in [k for k in _stores if k != key]:
        del _stores[other]


# ----------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(
    records: list[dict[str, Any]], tasks: list[str], methods: list[str], seeds: list[int]
) -> dict[str, dict[str, list[float]]]:
    """method -> task -> accuracies (one per finished seed), plus task "average": the
    per-seed mean over tasks, for seeds where every task finished."""
    table: dict[str, dict[str, list[float]]] = {
        m: {t: [] for t in [*tasks, "average"]} for m in methods
    }
    by_key = {(r["method"], r["task"], r["seed"]): r["accuracy"] for r in records}
    for m in methods:
        for t in tasks:
            table[m][t] = [by_key[(m, t, s)] for s in seeds if (m, t, s) in by_key]
        for s in seeds:
            if all((m, t, s) in by_key for t in tasks):
                table[m]["average"].append(statistics.fmean(by_key[(m, t, s)] for t in tasks))
    return table


def write_report(
    records: list[dict[str, Any]],
    budget: Budget,
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    path: Path,
) -> None:
    table = summarise(records, tasks, methods, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [*tasks, "average"]
    expected = len(tasks) * len(methods) * len(seeds)
    finished = sum(1 for r in records if r["task"] in tasks and r["method"] in methods)
    devices = sorted({r["device"] for r in records})
    seconds = sum(r["seconds"] for r in records)
    lines = [
        "# Variant comparison",
        "",
        "Generated by `dynprompt experiment` (see `dynprompt experiment --help`); "
        "each cell is dev accuracy, mean ± sample std over seeds "
        f"({', '.join(str(s) for s in seeds)}). "
        + (
            f"**Incomplete: {finished} of {expected} runs finished.**"
            if finished < expected
            else ""
        )
        + "",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    best = {
        c: max((statistics.fmean(table[m][c]) for m in methods if table[m][c]), default=None)
        for c in cols
    }
    for m in methods:
        cells = []
        for c in cols:
            vals = table[m][c]
            if not vals:
                cells.append("–")
                continue
            mean, std = _mean_std(vals)
            cell = f"{100 * mean:.1f} ± {100 * std:.1f}"
            if len(vals) < len(seeds):
                cell += f" (n={len(vals)})"
            top = best[c]
            if top is not None and abs(mean - top) < 1e-12:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", *_observations(table, tasks, methods), ""]
    # Hand-written reading of the numbers, kept beside the report so a rerun keeps it.
    discussion = path.with_name(path.stem + "_discussion.md")
    if discussion.is_file():
        lines += [discussion.read_text().strip(), ""]
    plot = path.with_suffix(".png")
    if _plot(table, tasks, methods, plot):
        lines += [f"![dev accuracy per task and method]({plot.name})", ""]
    lines += [
        "## Setup",
        "",
        f"- Device: {'; '.join(devices) or 'n/a'}. Compute: {seconds / 60:.1f} min of training and "
        "evaluation in total (sum of run times).",
        f"- Backbone: `{budget.backbone}` (frozen except for `finetune`); linear head on the mean "
        "of the final hidden states.",
        f"- Budget per run (every method the same): a seeded subset of {budget.train_examples} "
        f"training examples (CB has 250 in all), {budget.steps} steps of batch "
        f"{budget.batch_size} (about {budget.steps * budget.batch_size / budget.train_examples:.1f} "
        "epochs), AdamW, "
        f"learning rates prompt {budget.lr_prompt:g}, routers {budget.lr_router:g}, head "
        f"{budget.lr_head:g}, backbone {budget.lr_backbone:g} (finetune), {budget.warmup_steps} "
        "warmup steps then linear decay, gradient clipping at 1.0.",
        f"- Prompt length L = {budget.prompt_length}; pool size K = {budget.pool_size} for "
        "instance_prompt and dynamic; temperature annealed exponentially from 1.0 to 0.5; "
        "router features from the frozen backbone unless marked 'embedding features'.",
        "- max_length: "
        + ", ".join(f"{t} {budget.max_length.get(t, 128)}" for t in tasks)
        + " (longer inputs truncated on the right, longest segment first).",
        f"- Evaluation: accuracy on a seeded subset of at most {budget.dev_examples} dev examples "
        "(SST-2 dev, RTE/CB val, TREC test, and for BoolQ a seeded 20% of its val file, disjoint "
        "from its training part); the last step's weights, no model selection on dev.",
        "- The CPU budget is far below the paper's (T5 with full data and thousands of steps): "
        "these numbers compare methods under one small, equal budget, not their ceilings.",
        "",
        "Remake: `dynprompt experiment` (cached runs under `runs/experiment/` are reused; "
        "delete them to start over).",
        "",
        f"Budget key `{budget.key()}`; generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _observations(
    table: dict[str, dict[str, list[float]]], tasks: list[str], methods: list[str]
) -> list[str]:
    out = ["## What this backbone shows", ""]

    def mean(m: str, c: str) -> float | None:
        return statistics.fmean(table[m][c]) if m in table and table[m][c] else None

    for variant in ("instance_position", "instance_position_emb", "task_position", "dynamic"):
        if variant not in methods or "prefix" not in methods:
            continue
        deltas = []
        for t in tasks:
            a, b = mean(variant, t), mean("prefix", t)
            if a is not None and b is not None:
                deltas.append((t, 100 * (a - b)))
        if not deltas:
            continue
        avg = mean(variant, "average")
        base = mean("prefix", "average")
        parts = ", ".join(f"{t} {d:+.1f}" for t, d in deltas)
        head = f"- {METHOD_LABELS.get(variant, variant)} vs prefix: {parts} points"
        if avg is not None and base is not None:
            head += f"; average {100 * (avg - base):+.1f} (the paper reports up to +6 on T5)"
        head += "."
        losses = [t for t, d in deltas if d < 0]
        if losses:
            head += f" It loses on {', '.join(losses)}."
        out.append(head)
    ranked = [(mean(m, "average"), m) for m in methods if mean(m, "average") is not None]
    if ranked:
        ranked.sort(reverse=True)
        out.append(
            "- Ranking by average: "
            + " > ".join(f"{m} {100 * v:.1f}" for v, m in ranked if v is not None)
            + "."
        )
    return out


def _plot(
    table: dict[str, dict[str, list[float]]], tasks: list[str], methods: list[str], path: Path
) -> bool:
    if not any(table[m][t] for m in methods for t in tasks):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*tasks, "average"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(13, 4.8))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, c in enumerate(cols):
            if table[m][c]:
                mean, std = _mean_std(table[m][c])
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(100 * mean)
                es.append(100 * std)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=METHOD_LABELS.get(m, m), color=f"C{i % 10}")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(bottom=30)
    ax.legend(fontsize="x-small", ncol=3, loc="upper left")
    ax.set_title("dynprompt variants on the same budget (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI


def experiment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprompt experiment",
        description=(
            "Train and evaluate every variant and baseline on several tasks and seeds under one "
            "budget; cache each run as JSON (resumable) and write a Markdown report with a plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="presets to run")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--run-dir", default="runs/experiment", help="cache of finished runs")
    parser.add_argument(
        "--results", default="docs/results.md", help="Markdown report (plot beside it)"
    )
    parser.add_argument("--budget", metavar="FILE", help="YAML/TOML file overriding budget fields")
    parser.add_argument("--steps", type=int, help="override the budget's steps")
    parser.add_argument("--train-examples", type=int, help="override the budget's training subset")
    parser.add_argument("--dev-examples", type=int, help="override the budget's dev subset")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    parser.add_argument("--data-dir", help="shared data folder (default: ../shared/data)")
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the report from the cache"
    )
    return parser


def experiment_main(argv: list[str]) -> int:
    args = experiment_parser().parse_args(argv)
    try:
        values = read_config_file(args.budget) if args.budget else {}
    except ConfigError as exc:
        print(f"dynprompt experiment: error: {exc}", file=sys.stderr)
        return 2
    for name in ("steps", "train_examples", "dev_examples", "num_threads"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    budget = Budget.model_validate(values)
    run_dir, results = Path(args.run_dir), Path(args.results)
    if args.report_only:
        records = [
            r
            for t in args.tasks
            for m in args.methods
            for s in args.seeds
            if (r := load_cached(run_path(run_dir, t, m, s), budget.key(m))) is not None
        ]
        write_report(records, budget, args.tasks, args.methods, args.seeds, results)
        print(f"{results}: {len(records)} runs")
        return 0
    from dynprompt.training.data import DataError

    try:
        run_experiment(
            budget,
            args.tasks,
            args.methods,
            args.seeds,
            run_dir,
            results,
            args.device,
            log=lambda m: print(m, flush=True),
            data_dir=args.data_dir,
        )
    except DataError as exc:
        print(f"dynprompt experiment: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {results}")
    return 0
