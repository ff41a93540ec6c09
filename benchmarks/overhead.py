"""Request overhead: the server's own CPU cost per single-sentence request, compute aside.

    dynprompt bench overhead [--rounds 3] [--duration 8] [--concurrency 64] [--workers 1 2]

The model is a tiny random BERT (2 layers, hidden 32) that keeps MiniLM's real
tokenizer, under a `prefix` checkpoint (20 prompt tokens): the request path does all
its real work (HTTP, JSON, validation, admission, tokenisation, batching, routing,
metrics, the access log) while the model's arithmetic is small. `--concurrency`
closed-loop clients send one SST-2 dev sentence per request. For each server layout
(`--workers`), rounds interleaved, medians reported:

- requests/s;
- the server's CPU milliseconds per request, all its processes and threads;
- of which compute: the CPU time of the threads running the tiny model's batches
  (`dynprompt_compute_cpu_seconds_total`); on these CPUs even a model this small
  costs about 0.1 ms a row, which a GPU would take off the CPU;
- the request path's own cost: the difference. Goal: at most 0.25 CPU-ms a request;
- the engine core's share of it: the CPU of the process the core runs in
  (`process_cpu_seconds_total` from its /metrics) less compute. With `--workers N` the
  HTTP processes scale out with the cores, but there is one engine core per device, and
  its threads share one interpreter lock: 1000 / this figure is the most single-sentence
  requests per second one core can take in, batch and answer, whatever the device.

The server runs with one torch thread (`--threads 1`): on 2 shared cores a second
intra-op thread makes small matrix products slower, not faster.
Writes the `overhead` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import floor
from benchmarks.loadgen import run_load, sst2_sentences, tree_cpu_seconds, tree_thread_cpu_seconds
from benchmarks.report import write_section
from dynprompt.models import make_config, save_checkpoint
from dynprompt.models.backbone import resolve_backbone_path
from dynprompt.models.model import DynPromptModel
from dynprompt.service import threadnames
from tests.server_util import HOST, ServerProcess, free_port, sample, scrape, start_server

PROMPT_LENGTH = 20
GOAL_MS = 0.25
TOKENIZER_BATCH = 32  # the server's default --max-batch-size
# The server's threads by their kernel names (`dynprompt/service/threadnames.py`).
THREAD_GROUPS = {
    threadnames.LOOP: "event loop",
    threadnames.CORE: "core socket",
    threadnames.PREPARE: "prepare",
    threadnames.TOKENIZE: "tokenizer pool",
    threadnames.COMPUTE: "compute",
}
ZMQ = "ZeroMQ I/O"
OTHER = "other"
GROUPS = [*THREAD_GROUPS.values(), ZMQ, OTHER]


def thread_group(name: str) -> str:
    if name in THREAD_GROUPS:
        return THREAD_GROUPS[name]
    return ZMQ if name.startswith("ZMQbg") else OTHER


# The same prefix checkpoint, written by whichever source tree runs this (see --baseline).
MAKE_REPOSITORY = f"""
import sys, torch
from pathlib import Path
from dynprompt.models import DynPromptModel, load_backbone, make_config, save_checkpoint
backbone = load_backbone(sys.argv[2])
torch.manual_seed(0)
config = make_config(name="tiny", variant="prefix", backbone=backbone.spec(),
                     labels=["negative", "positive"], prompt_length={PROMPT_LENGTH})
save_checkpoint(DynPromptModel(config, backbone).eval(), Path(sys.argv[1]) / "tiny")
"""


def tiny_backbone_folder(folder: Path) -> Path:
    """A 2-layer, hidden-32 random BERT saved with MiniLM's tokenizer (loads offline)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    model = BertModel(config)  # with its pooler: a missing weight would load at random
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prefix_repository(folder: Path, backbone_path: Path) -> Path:
    from dynprompt.models import load_backbone

    backbone = load_backbone(str(backbone_path))
    torch.manual_seed(0)
    config = make_config(
        name="tiny",
        variant="prefix",
        backbone=backbone.spec(),
        labels=["negative", "positive"],
        prompt_length=PROMPT_LENGTH,
    )
    save_checkpoint(DynPromptModel(config, backbone).eval(), folder / "tiny")
    return folder


def tree_server(tree: Path, repo: Path, log_dir: Path, workers: int = 1) -> ServerProcess:
    """`dynprompt serve` of another source tree (its own package, this interpreter)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / f"baseline-{port}.log"
    command = [sys.executable, "-m", "dynprompt.cli", "serve", "--model-repository", str(repo)]
    command += ["--threads", "1", "--host", HOST, "--port", str(port)]
    if workers != 1:  # a tree from before `--workers` knows no such flag
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=log_file, stderr=log_file)
    server = ServerProcess(process, port, log_path, command)
    server.wait_ready()
    return server


def shown(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """A metric summed over all its label sets."""
    return sum(value for (key, _), value in metrics.items() if key == name)


@dataclass
class Point:
    layout: str
    requests_per_s: float
    cpu_ms: float
    compute_ms: float
    core_ms: float  # the engine core's process, compute aside
    p50_ms: float
    threads: dict[str, float]  # CPU-ms a request by thread group (GROUPS)

    @property
    def path_ms(self) -> float:
        return self.cpu_ms - self.compute_ms


def measure(
    server: ServerProcess,
    layout: str,
    sentences: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
) -> Point:
    run = run_load(server.url, "tiny", sentences, concurrency, duration_s=1.0, warmup_s=0.0)
    asyncio.run(run)  # warm connections and caches
    before_metrics, before_cpu = scrape(server.url), tree_cpu_seconds(server.pid)
    before_threads = tree_thread_cpu_seconds(server.pid)
    result = asyncio.run(
        run_load(server.url, "tiny", sentences, concurrency, duration_s=duration, warmup_s=warmup)
    )
    after_threads = tree_thread_cpu_seconds(server.pid)
    after_cpu, after_metrics = tree_cpu_seconds(server.pid), scrape(server.url)
    answered = sample(after_metrics, "dynprompt_requests_total", model="tiny", status="200") - (
        sample(before_metrics, "dynprompt_requests_total", model="tiny", status="200")
    )
    name = "dynprompt_compute_cpu_seconds_total"
    compute = total(after_metrics, name) - total(before_metrics, name)
    if not any(key == name for key, _ in after_metrics):  # a server that does not export it
        compute = float("nan")
    name = "process_cpu_seconds_total"  # the process the engine core runs in
    core = total(after_metrics, name) - total(before_metrics, name) - compute
    if not any(key == name for key, _ in after_metrics):
        core = float("nan")
    bad = {s: n for s, n in result.statuses.items() if s != 200}
    if bad:
        raise SystemExit(f"{layout}: non-200 answers {bad}")
    threads = dict.fromkeys(GROUPS, 0.0)
    for name, seconds in after_threads.items():
        threads[thread_group(name)] += (seconds - before_threads.get(name, 0.0)) * 1000 / answered
    point = Point(
        layout,
        result.requests_per_s,
        (after_cpu - before_cpu) * 1000 / answered,
        compute * 1000 / answered,
        core * 1000 / answered,
        result.percentile(50),
        threads,
    )
    print(
        f"  {layout}: {point.requests_per_s:.0f} requests/s, {point.cpu_ms:.3f} CPU-ms/request "
        f"(compute {point.compute_ms:.3f}, path {point.path_ms:.3f}, engine core "
        f"{point.core_ms:.3f}), p50 {point.p50_ms:.1f} ms; by thread: "
        + ", ".join(f"{group} {ms:.3f}" for group, ms in threads.items()),
        flush=True,
    )
    return point


def measure_floor(
    server: ServerProcess, sentences: list[str], concurrency: int, duration: float, warmup: float
) -> tuple[float, float]:
    """(requests/s, CPU-ms a request) of `floor.app` under the same load."""
    asyncio.run(run_load(server.url, "tiny", sentences, concurrency, 1.0, warmup_s=0.0))
    before = tree_cpu_seconds(server.pid)
    result = asyncio.run(
        run_load(server.url, "tiny", sentences, concurrency, duration_s=duration, warmup_s=warmup)
    )
    cpu_ms = (tree_cpu_seconds(server.pid) - before) * 1000 / result.answered
    print(
        f"  floor: {result.requests_per_s:.0f} requests/s, {cpu_ms:.3f} CPU-ms/request", flush=True
    )
    return result.requests_per_s, cpu_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per point")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="server layouts to compare"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also measure the server of another source tree, side by side (e.g. `git worktree "
        "add /tmp/base <commit>`): its row is labelled with the tree's commit",
    )
    parser.add_argument(
        "--baseline-workers",
        type=int,
        default=1,
        help="the baseline server's --workers (a tree older than the flag takes only 1)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dynprompt-overhead-"))
    backbone_path = tiny_backbone_folder(workdir / "tiny-bert")
    repo = prefix_repository(workdir / "repo", backbone_path)
    sentences = sst2_sentences(512)
    tokenizer_ms = floor.tokenizer_ms(backbone_path, sentences, TOKENIZER_BATCH)
    print(f"the tokenizer alone: {tokenizer_ms:.3f} CPU-ms a sentence", flush=True)
    layouts: dict[str, str] = {str(w): f"--workers {w}" for w in args.workers}
    servers = {
        str(w): start_server(
            ["--model-repository", str(repo), "--threads", "1", "--workers", str(w)],
            log_dir=workdir / "logs",
        )
        for w in args.workers
    }
    if args.baseline:
        tree = Path(args.baseline).resolve()
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip() or tree.name  # fmt: skip
        shown_workers = f", --workers {args.baseline_workers}" if args.baseline_workers != 1 else ""
        layouts["base"] = f"baseline `{commit}`{shown_workers}"
        base_repo = workdir / "base-repo"
        subprocess.run(  # its checkpoint written by its own code: formats may differ
            [sys.executable, "-c", MAKE_REPOSITORY, str(base_repo), str(backbone_path)],
            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
        )  # fmt: skip
        servers["base"] = tree_server(tree, base_repo, workdir / "logs", args.baseline_workers)
    floor_server = floor.start(workdir / "logs")
    floor_points: list[tuple[float, float]] = []
    points: dict[str, list[Point]] = {key: [] for key in servers}
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            floor_points.append(
                measure_floor(floor_server, sentences, args.concurrency, args.duration, args.warmup)
            )
            for key, server in servers.items():
                points[key].append(
                    measure(
                        server,
                        layouts[key],
                        sentences,
                        args.concurrency,
                        args.duration,
                        args.warmup,
                    )
                )
    finally:
        for server in [*servers.values(), floor_server]:
            server.stop()

    def med(key: str, field: str) -> float:
        return statistics.median(getattr(p, field) for p in points[key])

    lines = [
        "## Request overhead (`dynprompt bench overhead`)",
        "",
        f"`python -m benchmarks.overhead --rounds {args.rounds} --duration {args.duration:g} "
        f"--concurrency {args.concurrency} --workers {' '.join(map(str, args.workers))}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + (f" --baseline-workers {args.baseline_workers}" if args.baseline_workers != 1 else "")
        + "`",
        "",
        f"A tiny random BERT (2 layers, hidden 32) with MiniLM's tokenizer, a `prefix` "
        f"checkpoint ({PROMPT_LENGTH} prompt tokens), one SST-2 dev sentence per request, "
        f"{args.concurrency} closed-loop clients on the same machine, server with one torch "
        f"thread; medians of {args.rounds} interleaved rounds on a shared "
        f"{len(os.sched_getaffinity(0))}-core CPU machine. CPU time is the server's, every "
        "process and thread; *compute* is the CPU of the threads running the model's "
        "batches (`dynprompt_compute_cpu_seconds_total`); the *request path* is the rest. "
        f"Goal: request path ≤ {GOAL_MS} CPU-ms a request. The *engine core* column is the "
        "part of the request path spent in the process the engine core runs in "
        "(`process_cpu_seconds_total` less compute; with `--workers 1` that process is the "
        "whole server); one core per device, so 1000 / it bounds the single-sentence "
        "requests per second a device can be fed.",
        "",
        "| server | requests/s | CPU-ms / request | of which compute | request path "
        "| engine core | one core feeds at most (req/s) | p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in servers:
        core = med(key, "core_ms")
        bound = "—" if math.isnan(core) or core <= 0 else f"{1000 / core:,.0f}"
        lines.append(
            f"| {layouts[key]} | {med(key, 'requests_per_s'):.0f} | {med(key, 'cpu_ms'):.3f} | "
            f"{shown(med(key, 'compute_ms'))} | **{shown(med(key, 'path_ms'))}** | "
            f"{shown(core)} | {bound} | {med(key, 'p50_ms'):.1f} |"
        )
    lines += [
        "",
        "Where the CPU goes, by the server's threads (CPU-ms a request; each thread is "
        "counted under the name the server gives it in the kernel, "
        "`dynprompt/service/threadnames.py`; a tree that names none shows all under "
        f"*{OTHER}*). The *event loop* is HTTP, JSON, validation, admission and, with "
        "`--workers 1`, the engine core's side of each request; *core socket* is that side "
        "in the engine process of `--workers N`; *prepare* batches, collates and calls the "
        "tokenizer, whose own threads are the *tokenizer pool*.",
        "",
        "| server | " + " | ".join(GROUPS) + " |",
        "|---|" + "---:|" * len(GROUPS),
    ]
    for key in servers:
        cells = [statistics.median(p.threads[g] for p in points[key]) for g in GROUPS]
        lines.append(f"| {layouts[key]} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    floor_rps = statistics.median(p[0] for p in floor_points)
    floor_http = statistics.median(p[1] for p in floor_points)
    floor_sum = floor_http + tokenizer_ms
    lines += [
        "",
        "The floor: what the two parts of the request path that are not dynprompt's code cost "
        "on their own, in the same run (`benchmarks/floor.py`; medians of the same rounds):",
        "",
        "| part | requests/s | CPU-ms / request |",
        "|---|---:|---:|",
        "| uvicorn (uvloop, httptools), a fixed answer to each POST after parsing its body, "
        f"the same load | {floor_rps:.0f} | {floor_http:.3f} |",
        f"| the fast tokenizer alone, batches of {TOKENIZER_BATCH} "
        f"(`RowTokenizer.tokenize_rows`, best of 3 passes) | | {tokenizer_ms:.3f} |",
        f"| together | | **{floor_sum:.3f}** |",
        "",
        f"Of the goal's {GOAL_MS} CPU-ms, they leave {GOAL_MS - floor_sum:.3f} for all that "
        "dynprompt itself does per request (validation, admission, batching, collating, "
        "routing, answers, metrics, the access log); "
        + "; ".join(
            f"the request path of `--workers {w}` spends "
            f"{med(str(w), 'path_ms') - floor_sum:.3f} on it"
            for w in args.workers
        )
        + ".",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        print(f"wrote {write_section('overhead', table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
