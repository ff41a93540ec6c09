"""`dynprompt experiment`: every variant and baseline on the same data and budget.

Trains and evaluates each method on each task with several seeds, caches each
finished run as a JSON file (so a stopped experiment resumes where it stopped, and
a rerun trains nothing that is already there), and writes `docs/results.md`: one
section per backbone and budget with mean ± std per cell, each method's paired
difference from `prefix` with a 95% interval, the device, budget and wall time, and
a plot. Within one seed every method sees the same training subset and the same dev
subset; seeds change the subset, the initialisation, the batch order and the Gumbel
noise.

`--parallel N` runs N worker processes, each with its own copy of the frozen backbone
on the same device (one GPU holds a dozen SmolLM2 copies easily); runs are handed out
one at a time, and each worker writes its finished runs to the cache itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dynprompt.training.config import ConfigError, TrainConfig, read_config_file
from dynprompt.training.intervals import Interval, paired_interval, welch_interval

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
BASELINE = "prefix"
BACKBONE_LABELS: dict[str, str] = {
    "minilm": "MiniLM (all-MiniLM-L6-v2, 22.7M, encoder)",
    "smollm2": "SmolLM2-135M-Instruct (134.5M, decoder LM)",
}
# Words a verbalizer reads for each preset's labels, in the preset's label order (a
# decoder backbone's prompt variants use them; linear heads ignore them). Each is one
# SmolLM2 token after a space, so first-token scoring reads whole words.
LABEL_WORDS: dict[str, list[str]] = {
    "sst2": ["negative", "positive"],
    "rte": ["yes", "no"],  # entailment, not_entailment
    "cb": ["yes", "no", "maybe"],  # entailment, contradiction, neutral
    "trec": ["description", "entity", "abbreviation", "human", "location", "number"],
    "boolq": ["no", "yes"],  # false, true
}


class Budget(BaseModel):
    """What every run gets: the same for every method, so the comparison is fair."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "minilm"
    train_examples: int | None = Field(
        default=400, description="seeded training subset per task (null: all training data)"
    )
    dev_examples: int | None = Field(
        default=200, description="seeded dev subset per task (null: the whole dev set)"
    )
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
    label_words: dict[str, list[str]] = Field(
        default_factory=lambda: {t: list(w) for t, w in LABEL_WORDS.items()},
        description="verbalizer words per task (decoder backbones' prompt variants)",
    )
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
            # The in-training evaluation selects nothing (keep_best off): a small one will do.
            "eval_limit": self.dev_examples or 64,
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
        if task in self.label_words:
            fields["label_words"] = self.label_words[task]
        fields.update(METHODS[method])
        if fields["variant"] in ("instance_prompt", "dynamic"):
            fields["pool_size"] = self.pool_size
        return TrainConfig.model_validate(fields)

    def key(self, method: str | None = None) -> str:
        """Identifies what a cached run depends on: the common budget plus, for `method`,
        only the settings that method uses (so a changed router learning rate re-runs the
        router variants and keeps the prefix, probe and finetune runs). The thread count
        changes no result and is left out; the label words enter only when they differ
        from the defaults (they were fixed before they were a field)."""
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
                used |= {"prompt_length", "lr_prompt", "label_words"}
            if variant not in ("linear_probe", "finetune", "prefix"):
                used.add("lr_router")
            if variant in ("instance_prompt", "dynamic"):
                used.add("pool_size")
            if variant == "finetune":
                used.add("lr_backbone")
            fields = used
        values = self.model_dump(mode="json", include=fields)
        if values.get("label_words") == LABEL_WORDS:
            del values["label_words"]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


# The named budgets of `--budget`. `gpu`: the realistic one (all training data, whole dev
# sets, 1,000 steps of batch 32, 20 prompt tokens), meant for one GPU with `--parallel`.
BUDGETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {
        "train_examples": None,
        "dev_examples": None,
        "steps": 1000,
        "batch_size": 32,
        "prompt_length": 20,
        "max_length": {"sst2": 128, "trec": 64, "rte": 256, "cb": 256, "boolq": 256},
        "warmup_steps": 50,
    },
}
DEFAULT_SEEDS: dict[str, list[int]] = {"cpu": [0, 1, 2], "gpu": [0, 1, 2, 3, 4]}


def budget_from(spec: str, overrides: dict[str, Any] | None = None) -> tuple[str, Budget]:
    """`cpu`, `gpu` or a YAML/TOML file of budget fields (over the CPU defaults); returns
    the budget's name (the preset, or the file's stem) and the budget."""
    if spec in BUDGETS:
        name, values = spec, dict(BUDGETS[spec])
    else:
        name, values = Path(spec).stem, read_config_file(spec)
    values.update(overrides or {})
    return name, Budget.model_validate(values)


def backbone_slug(backbone: str) -> str:
    """A folder-safe short name: `minilm`, `smollm2`, or a path's last part."""
    name = Path(backbone).name if ("/" in backbone or "\\" in backbone) else backbone
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "backbone"


def budget_title(budget_name: str) -> str:
    return budget_name.upper() if budget_name in BUDGETS else budget_name


def section_name(backbone: str, budget_name: str) -> str:
    return f"{backbone_slug(backbone)}_{budget_name}"


def run_path(run_dir: Path, task: str, method: str, seed: int) -> Path:
    return run_dir / task / method / f"seed{seed}.json"


def load_cached(path: Path, budget_key: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("budget") == budget_key else None


def _write_json_atomic(path: Path, value: Any) -> None:
    """Write then rename: a reader (or a killed run) never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(value, indent=2) + "\n")
    Path(tmp).replace(path)


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    cores = os.cpu_count() or 0
    return f"CPU: {platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------- running


class RunFailed(RuntimeError):
    """A run that raised in a worker process, with the run and the original error named
    (the original exception may not survive the trip between processes)."""


class Runner:
    """Trains runs one after another in this process over one loaded backbone, keeping
    the data and frozen features of the last few (task, seed) pairs, which every method
    of that pair shares."""

    KEEP = 2

    def __init__(
        self, budget: Budget, device: str, data_dir: str | None, run_dir: Path, threads: int | None
    ) -> None:
        self.budget = budget
        self.device = device
        self.data_dir = data_dir
        self.run_dir = run_dir
        if threads:
            torch.set_num_threads(threads)
        self.backbone: Any = None
        self.splits: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.stores: dict[tuple[str, int], dict[str, Any]] = {}

    def run(self, seed: int, task: str, method: str) -> dict[str, Any]:
        from dynprompt.models.backbone import load_backbone
        from dynprompt.training.prepare import load_task
        from dynprompt.training.trainer import train

        if self.backbone is None:
            self.backbone = load_backbone(self.budget.backbone, device=self.device)
        config = self.budget.config_for(task, method, seed, self.device)
        if self.data_dir is not None:
            config = config.model_copy(update={"data_dir": self.data_dir})
        pair = (task, seed)
        if pair not in self.splits:
            self.splits[pair] = load_task(
                config.task_list()[0],
                seed=seed,
                eval_limit=config.eval_limit,
                final_limit=config.final_eval_limit,
            )
            self.stores[pair] = {}
            while len(self.splits) > self.KEEP:
                old, _ = self.splits.popitem(last=False)
                self.stores.pop(old, None)
        self.splits.move_to_end(pair)
        splits = self.splits[pair]
        tick = time.time()
        result = train(
            config,
            backbone=self.backbone,
            splits=[splits],
            save=False,
            log=lambda _m: None,
            feature_store=self.stores[pair],
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
            "device": device_name(self.device),
            "tokens_before": {str(k): v for k, v in sorted(res.tokens_before.items())},
            "prompt_length": {str(k): v for k, v in sorted(res.prompt_length.items())},
            "budget": self.budget.key(method),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        _write_json_atomic(run_path(self.run_dir, task, method, seed), record)
        return record


_worker: Runner | None = None


def _worker_init(
    budget_json: str, device: str, data_dir: str | None, run_dir: str, threads: int | None
) -> None:
    global _worker
    _worker = Runner(
        Budget.model_validate_json(budget_json), device, data_dir, Path(run_dir), threads
    )


def _worker_run(seed: int, task: str, method: str) -> dict[str, Any]:
    assert _worker is not None, "worker not initialised"
    try:
        return _worker.run(seed, task, method)
    except Exception as exc:
        raise RunFailed(f"{task} {method} seed {seed}: {type(exc).__name__}: {exc}") from None


@dataclass
class Outcome:
    records: list[dict[str, Any]]
    trained: int  # runs trained by this call (the rest came from the cache)
    wall_seconds: float


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
    parallel: int = 1,
    report: Callable[[list[dict[str, Any]]], None] | None = None,
) -> Outcome:
    """Run (or read from the cache in `run_dir`) every (seed, task, method), in `parallel`
    worker processes when above 1; after each finished run, `report(records)` (default:
    a one-section report at `results_path`)."""
    resolved = resolve_device(device)
    on_record = report
    if on_record is None and results_path is not None:
        target = results_path

        def one_section(records: list[dict[str, Any]]) -> None:
            write_report(records, budget, tasks, methods, seeds, target)

        on_record = one_section

    todo = [(s, t, m) for s in seeds for t in tasks for m in methods]
    records: list[dict[str, Any]] = []
    pending = []
    for seed, task, method in todo:
        cached = load_cached(run_path(run_dir, task, method, seed), budget.key(method))
        if cached is not None:
            records.append(cached)
        else:
            pending.append((seed, task, method))
    log(f"{len(todo)} runs: {len(records)} cached, {len(pending)} to train")
    started = time.time()
    total = len(pending)

    def finished(done: int, record: dict[str, Any]) -> None:
        records.append(record)
        log(
            f"[{done}/{total}] seed {record['seed']} {record['task']:<6} "
            f"{record['method']:<22} acc {record['accuracy']:.4f} "
            f"f1 {record['macro_f1']:.4f} ({record['seconds']:.0f}s)"
        )
        if on_record is not None:
            on_record(records)

    if pending and parallel <= 1:
        runner = Runner(budget, resolved, data_dir, run_dir, budget.num_threads)
        for done, job in enumerate(pending, start=1):
            finished(done, runner.run(*job))
    elif pending:
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        workers = min(parallel, len(pending))
        # Each worker gets its share of the cores (the GPU does the heavy work on CUDA;
        # there, too, N processes with every core each would only contend).
        threads = budget.num_threads or max(1, (os.cpu_count() or 1) // workers)
        log(f"{workers} worker processes on {resolved}, {threads} torch threads each")
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),  # CUDA cannot be forked
            initializer=_worker_init,
            initargs=(budget.model_dump_json(), resolved, data_dir, str(run_dir), threads),
        ) as pool:
            futures = {pool.submit(_worker_run, *job) for job in pending}
            done = 0
            while futures:
                finished_now, futures = wait(futures, return_when=FIRST_EXCEPTION)
                for future in finished_now:
                    error = future.exception()
                    if error is not None:
                        for other in futures:
                            other.cancel()
                        raise error
                    done += 1
                    finished(done, future.result())
    elif on_record is not None:
        on_record(records)
    return Outcome(records, total, time.time() - started if total else 0.0)


# ----------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One backbone under one budget: the runs (per seed) or, for runs whose per-seed
    records were not kept, the published means and standard deviations."""

    name: str
    backbone: str
    budget_name: str
    budget: Budget
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    records: list[dict[str, Any]] = field(default_factory=list)
    # method -> column (task or "average") -> [mean, std, n]; only when records are absent
    summary: dict[str, dict[str, list[float]]] | None = None
    devices: list[str] = field(default_factory=list)
    wall_seconds: float | None = None
    compute_seconds: float | None = None
    parallel: int | None = None
    note: str = ""

    @property
    def title(self) -> str:
        if not self.budget_name:
            return self.label
        return f"{self.label}, {budget_title(self.budget_name)} budget"

    @property
    def label(self) -> str:
        return BACKBONE_LABELS.get(self.backbone, f"`{backbone_slug(self.backbone)}`")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "backbone": self.backbone,
            "budget_name": self.budget_name,
            "budget": self.budget.model_dump(mode="json"),
            "tasks": self.tasks,
            "methods": self.methods,
            "seeds": self.seeds,
            "devices": self.devices,
            "wall_seconds": self.wall_seconds,
            "compute_seconds": self.compute_seconds,
            "parallel": self.parallel,
            "note": self.note,
        }
        if self.summary is not None:
            out["summary"] = self.summary
        else:
            accuracies: dict[str, dict[str, dict[str, float]]] = {}
            for r in self.records:
                accuracies.setdefault(r["method"], {}).setdefault(r["task"], {})[str(r["seed"])] = (
                    r["accuracy"]
                )
            out["accuracies"] = accuracies
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Section:
        records = [
            {"method": m, "task": t, "seed": int(s), "accuracy": acc}
            for m, by_task in data.get("accuracies", {}).items()
            for t, by_seed in by_task.items()
            for s, acc in by_seed.items()
        ]
        return cls(
            name=data["name"],
            backbone=data["backbone"],
            budget_name=data["budget_name"],
            budget=Budget.model_validate(data["budget"]),
            tasks=list(data["tasks"]),
            methods=list(data["methods"]),
            seeds=[int(s) for s in data["seeds"]],
            records=records,
            summary=data.get("summary"),
            devices=list(data.get("devices", [])),
            wall_seconds=data.get("wall_seconds"),
            compute_seconds=data.get("compute_seconds"),
            parallel=data.get("parallel"),
            note=data.get("note", ""),
        )


SECTION_FILE = "section.json"


def _ordered(values: list[str], order: tuple[str, ...]) -> list[str]:
    """`values` without repeats, those in `order` first and in its order."""
    rank = {v: i for i, v in enumerate(order)}
    return sorted(dict.fromkeys(values), key=lambda v: rank.get(v, len(rank)))


def record_session(section_dir: Path, section: dict[str, Any], session: dict[str, Any]) -> None:
    """Add one invocation (its wall time, workers, device) to the section's file, under a
    lock: two invocations may share a section's cache."""
    from filelock import FileLock

    section_dir.mkdir(parents=True, exist_ok=True)
    path = section_dir / SECTION_FILE
    with FileLock(str(section_dir / ".section.lock")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        sessions = [*data.get("sessions", []), session] if session else data.get("sessions", [])
        merged = dict(section)
        if data.get("budget") == section.get("budget"):
            # Same budget: a call over fewer tasks, methods or seeds adds to the section.
            for name, order in (("tasks", TASKS), ("methods", tuple(METHODS))):
                merged[name] = _ordered([*data.get(name, []), *section.get(name, [])], order)
            merged["seeds"] = sorted({*data.get("seeds", []), *section.get("seeds", [])})
        _write_json_atomic(path, {**data, **merged, "sessions": sessions})


def section_from_cache(
    section_dir: Path,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> Section | None:
    """The section whose runs are cached in `section_dir` (None without a section file)."""
    try:
        data = json.loads((section_dir / SECTION_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    budget = Budget.model_validate(data["budget"])
    tasks = tasks or list(data.get("tasks", TASKS))
    methods = methods or list(data.get("methods", METHODS))
    seeds = seeds or [int(s) for s in data.get("seeds", [0, 1, 2])]
    records = [
        r
        for t in tasks
        for m in methods
        for s in seeds
        if (r := load_cached(run_path(section_dir, t, m, s), budget.key(m))) is not None
    ]
    if not records:
        return None
    key = budget.key()
    sessions = [s for s in data.get("sessions", []) if s.get("budget") == key]
    return Section(
        name=section_dir.name,
        backbone=budget.backbone,
        budget_name=data.get("budget_name", section_dir.name),
        budget=budget,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        records=records,
        devices=sorted({r["device"] for r in records}),
        wall_seconds=sum(s.get("seconds", 0.0) for s in sessions) or None,
        compute_seconds=sum(r["seconds"] for r in records),
        parallel=max((int(s.get("parallel", 1)) for s in sessions), default=None),
    )


def gather_sections(run_dir: Path, stored: Path | None) -> list[Section]:
    """Every section with cached runs under `run_dir`, then the sections stored beside the
    report (`results.json`) that the cache does not hold: the report keeps what was run
    elsewhere or earlier."""
    sections: dict[str, Section] = {}
    if run_dir.is_dir():
        for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            section = section_from_cache(folder)
            if section is not None:
                sections[section.name] = section
    if stored is not None and stored.is_file():
        for data in json.loads(stored.read_text()).get("sections", []):
            sections.setdefault(data["name"], Section.from_json(data))
    order = {"minilm": 0, "smollm2": 1}
    return sorted(
        sections.values(), key=lambda s: (order.get(s.backbone, 2), s.backbone, s.budget_name)
    )


# ----------------------------------------------------------------------------- statistics


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


def paired_differences(
    records: list[dict[str, Any]],
    tasks: list[str],
    method: str,
    seeds: list[int],
    baseline: str = BASELINE,
) -> dict[str, tuple[float, Interval | None]]:
    """column -> (mean difference, its 95% paired-t interval or None with < 2 seeds), for
    each task and "average" (per seed, the mean over tasks of the difference; seeds where
    both methods finished every task)."""
    by_key = {(r["method"], r["task"], r["seed"]): r["accuracy"] for r in records}
    out: dict[str, tuple[float, Interval | None]] = {}
    columns: dict[str, list[tuple[float, float]]] = {}
    for t in tasks:
        columns[t] = [
            (by_key[(method, t, s)], by_key[(baseline, t, s)])
            for s in seeds
            if (method, t, s) in by_key and (baseline, t, s) in by_key
        ]
    columns["average"] = [
        (
            statistics.fmean(by_key[(method, t, s)] for t in tasks),
            statistics.fmean(by_key[(baseline, t, s)] for t in tasks),
        )
        for s in seeds
        if all((method, t, s) in by_key and (baseline, t, s) in by_key for t in tasks)
    ]
    for column, pairs in columns.items():
        if not pairs:
            continue
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        interval = paired_interval(a, b) if len(pairs) > 1 else None
        out[column] = (statistics.fmean(a) - statistics.fmean(b), interval)
    return out


def summary_differences(
    summary: dict[str, dict[str, list[float]]],
    columns: list[str],
    method: str,
    baseline: str = BASELINE,
) -> dict[str, tuple[float, Interval | None]]:
    """As `paired_differences`, from means and standard deviations alone (Welch)."""
    out: dict[str, tuple[float, Interval | None]] = {}
    for column in columns:
        a, b = summary.get(method, {}).get(column), summary.get(baseline, {}).get(column)
        if not a or not b:
            continue
        interval = None
        if a[2] > 1 and b[2] > 1:
            interval = welch_interval(a[0], a[1], int(a[2]), b[0], b[1], int(b[2]))
        out[column] = (a[0] - b[0], interval)
    return out


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _interval_text(interval: Interval) -> str:
    return f"[{_points(interval.low)}, {_points(interval.high)}]"


def verdict(method: str, mean: float, interval: Interval | None, baseline: str = BASELINE) -> str:
    """One sentence on whether the average difference from the baseline is established."""
    label = METHOD_LABELS.get(method, method)
    if interval is None:
        return (
            f"{label} vs {baseline}: average {_points(mean)} points from one seed: "
            "no interval, nothing established."
        )
    head = (
        f"{label} vs {baseline}: average {_points(mean)} points, 95% interval "
        f"{_interval_text(interval)} ({interval.method}, {interval.n} seeds)"
    )
    if not interval.excludes_zero:
        return f"{head}; the interval includes zero: no difference from {baseline} is established."
    direction = "better" if interval.mean > 0 else "worse"
    return f"{head}; the interval excludes zero: {direction} than {baseline} at this budget."


# ----------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _cells(section: Section) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> column -> (mean, std, n) for the accuracy table and the plot."""
    cols = [*section.tasks, "average"]
    if section.summary is not None:
        return {
            m: {c: (v[0], v[1], int(v[2])) for c, v in section.summary.get(m, {}).items()}
            for m in section.methods
        }
    table = summarise(section.records, section.tasks, section.methods, section.seeds)
    return {
        m: {c: (*_mean_std(table[m][c]), len(table[m][c])) for c in cols if table[m][c]}
        for m in section.methods
    }


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def _budget_text(budget: Budget, tasks: list[str]) -> list[str]:
    train = (
        f"a seeded subset of {budget.train_examples} training examples"
        + (" (CB has 250 in all)" if "cb" in tasks and budget.train_examples > 250 else "")
        if budget.train_examples
        else "all training data"
    )
    dev = (
        f"a seeded subset of at most {budget.dev_examples} dev examples"
        if budget.dev_examples
        else "the whole dev set"
    )
    heads = (
        "- Heads: a linear head on the mean of the final hidden states (MiniLM has no LM head)."
        if budget.backbone == "minilm"
        else "- Heads: the prompt variants read the label words' logits at the last position "
        "(a verbalizer over the LM head: "
        + "; ".join(f"{t}: {', '.join(budget.label_words.get(t, []))}" for t in tasks)
        + "); the baselines a linear head on the mean of the final hidden states."
    )
    epochs = (
        f" (about {budget.steps * budget.batch_size / budget.train_examples:.1f} epochs)"
        if budget.train_examples
        else ""
    )
    return [
        f"- Budget per run (every method the same): {train}, {budget.steps} steps of batch "
        f"{budget.batch_size}{epochs}, AdamW, learning rates prompt {budget.lr_prompt:g}, "
        f"routers {budget.lr_router:g}, head {budget.lr_head:g}, backbone "
        f"{budget.lr_backbone:g} (finetune), {budget.warmup_steps} warmup steps then linear "
        "decay, gradient clipping at 1.0.",
        f"- Prompt length L = {budget.prompt_length}; pool size K = {budget.pool_size} for "
        "instance_prompt and dynamic; temperature annealed exponentially from 1.0 to 0.5; "
        "router features from the frozen backbone unless marked 'embedding features'.",
        "- max_length: "
        + ", ".join(f"{t} {budget.max_length.get(t, 128)}" for t in tasks)
        + " (longer inputs truncated on the right, longest segment first).",
        f"- Evaluation: accuracy on {dev} (SST-2 dev, RTE/CB val, TREC test, and for BoolQ a "
        "seeded 20% of its val file, disjoint from its training part); the last step's "
        "weights, no model selection on dev.",
        heads,
    ]


def _section_lines(section: Section) -> list[str]:
    cols = [*section.tasks, "average"]
    cells = _cells(section)
    seeds = ", ".join(str(s) for s in section.seeds)
    expected = len(section.tasks) * len(section.methods) * len(section.seeds)
    finished = (
        sum(
            1
            for r in section.records
            if r["task"] in section.tasks and r["method"] in section.methods
        )
        if section.summary is None
        else expected
    )
    lines = [
        f"## {section.title}",
        "",
        f"- Device: {'; '.join(section.devices) or 'not recorded'}"
        + (f", {section.parallel} worker processes" if (section.parallel or 1) > 1 else "")
        + f". Wall time: {_minutes(section.wall_seconds)}; compute: "
        f"{_minutes(section.compute_seconds)} of training and evaluation (sum of run times).",
        *_budget_text(section.budget, section.tasks),
        f"- Backbone `{section.backbone}`; budget key `{section.budget.key()}`.",
    ]
    if section.note:
        lines.append(f"- {section.note}")
    if finished < expected:
        lines.append(f"- **Incomplete: {finished} of {expected} runs finished.**")
    lines += [
        "",
        f"Dev accuracy, mean ± sample std over seeds ({seeds}):",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    best = {
        c: max((cells[m][c][0] for m in section.methods if c in cells[m]), default=None)
        for c in cols
    }
    for m in section.methods:
        row = []
        for c in cols:
            if c not in cells[m]:
                row.append("–")
                continue
            mean, std, n = cells[m][c]
            cell = f"{100 * mean:.1f} ± {100 * std:.1f}"
            if n < len(section.seeds):
                cell += f" (n={n})"
            top = best[c]
            if top is not None and abs(mean - top) < 1e-12:
                cell = f"**{cell}**"
            row.append(cell)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(row) + " |")
    others = [m for m in section.methods if m != BASELINE]
    if BASELINE not in section.methods or not others:
        return [*lines, ""]
    diffs = {
        m: (
            summary_differences(section.summary, cols, m)
            if section.summary is not None
            else paired_differences(section.records, section.tasks, m, section.seeds)
        )
        for m in others
    }
    kind = (
        "Welch t on the means and standard deviations above, unpaired"
        if section.summary is not None
        else "paired t over seeds"
    )
    lines += [
        "",
        f"Difference from {BASELINE}, points, with its 95% interval ({kind}); the average "
        "column is the difference of the per-seed averages over the tasks:",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in others:
        row = []
        for c in cols:
            if c not in diffs[m]:
                row.append("–")
                continue
            mean, interval = diffs[m][c]
            cell = _points(mean) + (f" {_interval_text(interval)}" if interval else "")
            if interval is not None and interval.excludes_zero:
                cell = f"**{cell}**"
            row.append(cell)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(row) + " |")
    lines += ["", "What the intervals say (bold cells exclude zero):", ""]
    for m in others:
        per_task = ", ".join(
            f"{t} {_points(diffs[m][t][0])}" for t in section.tasks if t in diffs[m]
        )
        if "average" in diffs[m]:
            mean, interval = diffs[m]["average"]
            lines.append(f"- {verdict(m, mean, interval)} Per task: {per_task}.")
        elif per_task:
            lines.append(f"- {METHOD_LABELS.get(m, m)} vs {BASELINE}: {per_task} points.")
    ranked = sorted(
        ((cells[m]["average"][0], m) for m in section.methods if "average" in cells[m]),
        reverse=True,
    )
    if ranked:
        lines.append(
            "- Ranking by average: " + " > ".join(f"{m} {100 * v:.1f}" for v, m in ranked) + "."
        )
    return [*lines, ""]


STATISTICS_TEXT = (
    "How to read the intervals: within a seed every method sees the same training subset, "
    "dev subset and data order, so each method is compared with `prefix` seed by seed, and "
    "the interval is Student's t on those per-seed differences (paired t). A paired "
    "bootstrap was not used: with 3 to 5 seeds it has only a few dozen distinct resamples "
    "and its percentile interval is too narrow at that size, while the t interval keeps "
    "the right width for small samples. The average column pairs the per-seed means over "
    "the five tasks. An interval that excludes zero is a difference this budget and these "
    "seeds establish; one that includes zero is not, whatever the sign of the mean. (The "
    "paper reports instance-level position up to +6 points over prefix on T5-large.)"
)


def write_sections_report(
    sections: list[Section],
    path: Path,
    pending: list[tuple[str, str]] | None = None,
    stored: Path | None = None,
) -> None:
    """The Markdown report of every section, its plot (`<report>.png`) and, at `stored`,
    the numbers behind it (per-seed accuracies), so a later report keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Variant comparison",
        "",
        "Generated by `dynprompt experiment` (see `dynprompt experiment --help`): every "
        "prompt variant and both baselines on SST-2, RTE, CB, TREC and BoolQ under one "
        "budget per backbone; one section per backbone and budget.",
        "",
        STATISTICS_TEXT,
        "",
    ]
    for section in sections:
        lines += _section_lines(section)
    # The hand-written reading of the numbers, kept beside the report so a rerun keeps it.
    discussion = path.with_name(path.stem + "_discussion.md")
    if discussion.is_file():
        lines += [discussion.read_text().strip(), ""]
    plot = path.with_suffix(".png")
    if _plot(sections, plot):
        lines += [f"![dev accuracy per task and method]({plot.name})", ""]
    for backbone, budget_name in pending or []:
        label = BACKBONE_LABELS.get(backbone, f"`{backbone_slug(backbone)}`")
        lines += [
            f"## {label}, {budget_title(budget_name)} budget: not run yet",
            "",
            "This budget is meant for a GPU: all training data and 1,000 steps of batch 32 "
            "per run, 225 runs for five tasks, nine methods and five seeds (the default "
            "seeds of `--budget gpu`). On one:",
            "",
            "```bash",
            f"dynprompt experiment --budget {budget_name} --parallel 12 --backbone {backbone}",
            "```",
            "",
        ]
    lines += [
        "## Remake",
        "",
        "```bash",
        "dynprompt experiment                                              # MiniLM, CPU budget",
        "dynprompt experiment --budget gpu --parallel 12 --backbone minilm   # on one GPU",
        "dynprompt experiment --budget gpu --parallel 12 --backbone smollm2  # on one GPU",
        "dynprompt experiment --report-only                                # this page again",
        "```",
        "",
        "Finished runs are cached under `runs/experiment/<backbone>_<budget>/` (a rerun "
        "trains only what is missing; delete a folder to start it over); the numbers behind "
        f"this page, per seed where the runs were kept, are in `{(stored or path.with_suffix('.json')).name}`, "
        "so `--report-only` rebuilds it without the cache.",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
    ]
    path.write_text("\n".join(lines))
    if stored is not None:
        _write_json_atomic(stored, {"sections": [s.to_json() for s in sections]})


def write_report(
    records: list[dict[str, Any]],
    budget: Budget,
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    path: Path,
) -> None:
    """A one-section report of `records` (what a single experiment call writes)."""
    section = Section(
        name=section_name(budget.backbone, "custom"),
        backbone=budget.backbone,
        budget_name="",
        budget=budget,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        records=records,
        devices=sorted({r["device"] for r in records}),
        compute_seconds=sum(r["seconds"] for r in records),
    )
    write_sections_report([section], path)


def _plot(sections: list[Section], path: Path) -> bool:
    shown = [(s, _cells(s)) for s in sections]
    shown = [(s, c) for s, c in shown if any(c[m] for m in s.methods)]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(13, 4.8 * len(shown)), squeeze=False)
    for ax, (section, cells) in zip(axes[:, 0], shown, strict=True):
        cols = [*section.tasks, "average"]
        methods = section.methods
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs, ys, es = [], [], []
            for j, c in enumerate(cols):
                if c in cells[m]:
                    mean, std, _ = cells[m][c]
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(100 * mean)
                    es.append(100 * std)
            ax.bar(
                xs, ys, width, yerr=es, capsize=2, label=METHOD_LABELS.get(m, m), color=f"C{i % 10}"
            )
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols)
        ax.set_ylabel("dev accuracy (%)")
        ax.set_ylim(bottom=30)
        ax.legend(fontsize="x-small", ncol=3, loc="upper left")
        ax.set_title(f"{section.title} (mean ± std over seeds)", fontsize=10)
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
            "budget; cache each run as JSON (resumable) and write a Markdown report with paired "
            "95% intervals against prefix and a plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="presets to run")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="seeds; when not given, 0 1 2, or 0 1 2 3 4 with --budget gpu",
    )
    parser.add_argument(
        "--budget",
        default="cpu",
        metavar="cpu|gpu|FILE",
        help="cpu: 400 examples, 60 steps of batch 8; gpu: all data, whole dev sets, 1,000 "
        "steps of batch 32, L = 20; or a YAML/TOML file of budget fields over the cpu ones",
    )
    parser.add_argument(
        "--backbone",
        help="minilm, smollm2, a .gguf file or a model folder; when not given, the budget's",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="N worker processes on the one device (with CUDA they share the GPU)",
    )
    parser.add_argument(
        "--run-dir",
        default="runs/experiment",
        help="cache of finished runs, one folder per backbone and budget",
    )
    parser.add_argument(
        "--results", default="docs/results.md", help="Markdown report (plot and numbers beside it)"
    )
    parser.add_argument("--steps", type=int, help="override the budget's steps")
    parser.add_argument("--train-examples", type=int, help="override the budget's training subset")
    parser.add_argument("--dev-examples", type=int, help="override the budget's dev subset")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads (per worker)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    parser.add_argument("--data-dir", help="shared data folder (default: ../shared/data)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the report from the cache and the stored numbers",
    )
    return parser


def experiment_main(argv: list[str]) -> int:
    args = experiment_parser().parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in ("steps", "train_examples", "dev_examples", "num_threads", "backbone")
        if getattr(args, name) is not None
    }
    try:
        budget_name, budget = budget_from(args.budget, overrides)
    except ConfigError as exc:
        print(f"dynprompt experiment: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"dynprompt experiment: error: budget {args.budget}: {exc}", file=sys.stderr)
        return 2
    if args.parallel < 1:
        print("dynprompt experiment: error: --parallel must be at least 1", file=sys.stderr)
        return 2
    seeds = args.seeds or DEFAULT_SEEDS.get(budget_name, DEFAULT_SEEDS["cpu"])
    run_root, results = Path(args.run_dir), Path(args.results)
    stored = results.with_suffix(".json")
    section = section_name(budget.backbone, budget_name)
    section_dir = run_root / section

    def report(_records: list[dict[str, Any]] | None = None) -> None:
        sections = gather_sections(run_root, stored)
        have = {(s.backbone, s.budget_name) for s in sections}
        pending = [(b, "gpu") for b in ("minilm", "smollm2") if (b, "gpu") not in have]
        write_sections_report(sections, results, pending, stored)

    if args.report_only:
        report()
        print(f"{results}: {len(gather_sections(run_root, stored))} sections")
        return 0
    from dynprompt.training.data import DataError

    resolved = resolve_device(args.device)
    description = {
        "backbone": budget.backbone,
        "budget_name": budget_name,
        "budget": budget.model_dump(mode="json"),
        "tasks": args.tasks,
        "methods": args.methods,
        "seeds": seeds,
    }
    record_session(section_dir, description, {})
    try:
        outcome = run_experiment(
            budget,
            args.tasks,
            args.methods,
            seeds,
            section_dir,
            None,
            resolved,
            log=lambda m: print(m, flush=True),
            data_dir=args.data_dir,
            parallel=args.parallel,
            report=report,
        )
    except (DataError, RunFailed) as exc:
        print(f"dynprompt experiment: error: {exc}", file=sys.stderr)
        return 2
    if outcome.trained:
        record_session(
            section_dir,
            description,
            {
                "budget": budget.key(),
                "seconds": round(outcome.wall_seconds, 1),
                "parallel": min(args.parallel, outcome.trained),
                "trained": outcome.trained,
                "device": device_name(resolved),
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
        report()
    print(f"{outcome.trained} runs trained; report: {results}")
    return 0
