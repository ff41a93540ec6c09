"""Serving benchmark: HTTP throughput and latency, side by side with the offline ceilings.

    python -m benchmarks.serving [--rounds 3] [--duration 6] [--concurrency 64]
                                 [--sentences 512] [--threads N]

In one run, on SST-2 dev sentences and the MiniLM backbone:
- the ceilings, in-process: the bare backbone's batched forward over the prompt-free
  sentences, and `classify_rows` for the `linear_probe` and `prefix` checkpoints, in
  batches of length-sorted sentences (the least padding there can be);
- `dynprompt serve` (a real subprocess) at saturation, closed-loop `--concurrency`
  clients, one sentence per request, for four seeded checkpoints (L = 20): `linear_probe`
  (no prompt: the same compute as the bare backbone), `prefix`, and `instance_position`
  with router feature `embeddings` and `backbone`; and `linear_probe` with 8 sentences
  a request;
- each of the above once per round, rounds interleaved, medians reported (the machine's
  background load drifts), with throughput and the CPU time per sentence (server
  process, all threads; or this process for the ceilings); then a latency-vs-load curve
  on `prefix`, and the same server with `--max-batch-size 1`.
Ratios: serving efficiency, batching gain, cost of dynamism. Writes the `serving`
section of docs/benchmarks.md and docs/serving_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.loadgen import (
    LoadResult,
    run_load,
    sst2_sentences,
    tree_cpu_seconds,
    tree_thread_cpu_seconds,
)
from benchmarks.report import DOC, device_description, write_section
from dynprompt.models import (
    Backbone,
    DynPromptModel,
    TokenizedRow,
    classify_rows,
    load_backbone,
    load_checkpoint,
)
from dynprompt.service.config import DEFAULT_REPOSITORY
from dynprompt.service.threadnames import COMPUTE
from tests.server_util import ServerProcess, build_repository, start_server

PROMPT_LENGTH = 20
MODELS = {
    "probe": {"variant": "linear_probe", "labels": ["negative", "positive"]},
    "prefix": {"variant": "prefix", "feature": "embeddings", "labels": ["negative", "positive"]},
    "ipos_emb": {
        "variant": "instance_position",
        "feature": "embeddings",
        "labels": ["negative", "positive"],
    },
    "ipos_bb": {
        "variant": "instance_position",
        "feature": "backbone",
        "labels": ["negative", "positive"],
    },
}
CURVE = (1, 2, 4, 8, 16, 32)


def bench_repository(
    folder: Path, backbone: Backbone, names: list[str]
) -> dict[str, DynPromptModel]:
    """A repository of `MODELS` (seeded, L = `PROMPT_LENGTH`) and, as "default", the shipped
    default model (50-token instance_position prompt, backbone features)."""
    seeded = {n: {**MODELS[n], "prompt_length": PROMPT_LENGTH} for n in names if n != "default"}
    models = build_repository(folder, backbone, seeded) if seeded else {}
    if "default" in names:
        shutil.copytree(DEFAULT_REPOSITORY / "sst2", folder / "default")
        models["default"] = load_checkpoint(folder / "default", backbone=backbone)
    return models


PNG = DOC.parent / "serving_latency.png"


def offline_rate(
    run_batch: Callable[[list[TokenizedRow]], object],
    rows: list[TokenizedRow],
    batch: int,
    seconds: float,
) -> tuple[float, float]:
    """(sentences/s, CPU ms per sentence) of `run_batch` over batches of `batch` consecutive
    `rows`: whole passes over every batch, as many as fit in `seconds` (at least one).

    A ceiling must cost what the server's sentences cost. A row's cost grows with its
    batch's width, and the server cycles through every sentence; a partial pass would
    price some widths only (it once priced 7 of the default model's 16 batches, 12% narrower
    than the whole set).
    """
    batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    run_batch(batches[0])  # warm
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while not done or time.perf_counter() - start < seconds:
        for part in batches:
            run_batch(part)
            done += len(part)
    return done / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / done


def bare_forward(backbone: Backbone) -> Callable[[list[TokenizedRow]], object]:
    def run(rows: list[TokenizedRow]) -> object:
        with torch.inference_mode():
            encoded = backbone.collate(rows)
            embeds = backbone.embed(encoded.input_ids)
            return backbone.hidden_states(embeds, encoded.attention_mask, encoded.token_type_ids)

    return run


def model_forward(
    backbone: Backbone, model: DynPromptModel
) -> Callable[[list[TokenizedRow]], object]:
    def run(rows: list[TokenizedRow]) -> object:
        with torch.inference_mode():
            return classify_rows(backbone, [model] * len(rows), backbone.collate(rows))

    return run


def load(
    server: ServerProcess,
    model: str,
    sentences: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
    inputs_per_request: int = 1,
) -> LoadResult:
    """One closed-loop run; also the server process's CPU time per sentence answered."""
    before = tree_cpu_seconds(server.pid)  # every process of the server (--workers N)
    threads_before = tree_thread_cpu_seconds(server.pid)
    result = asyncio.run(
        run_load(
            server.url,
            model,
            sentences,
            concurrency,
            duration_s=duration,
            warmup_s=warmup,
            inputs_per_request=inputs_per_request,
        )
    )
    cpu_s = tree_cpu_seconds(server.pid) - before
    compute_s = tree_thread_cpu_seconds(server.pid).get(COMPUTE, 0.0) - threads_before.get(
        COMPUTE, 0.0
    )
    result.cpu_ms_per_sentence = cpu_s * 1000 / max(result.answered, 1)
    result.compute_ms_per_sentence = compute_s * 1000 / max(result.answered, 1)
    bad = {s: n for s, n in result.statuses.items() if s != 200}
    if bad:
        raise SystemExit(f"{model} at concurrency {concurrency}: non-200 answers {bad}")
    print(
        f"  {model}: {result.summary()}, {result.cpu_ms_per_sentence:.1f} CPU ms/sentence "
        f"({result.compute_ms_per_sentence:.1f} in the model's threads)",
        flush=True,
    )
    return result


def plot(curve: list[LoadResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r.sentences_per_s for r in curve]
    for q, style in ((50, "o-"), (95, "s--"), (99, "^:")):
        ax.plot(x, [r.percentile(q) for r in curve], style, label=f"p{q}")
    for r in curve:
        ax.annotate(f"c={r.concurrency}", (r.sentences_per_s, r.percentile(50)), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))  # fmt: skip
    ax.set_xlabel("throughput (sentences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("dynprompt serve, prefix L=20, MiniLM: latency vs load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per point")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients at saturation")
    parser.add_argument("--sentences", type=int, default=512, help="SST-2 dev sentences used")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads, in-process and in the server (default: all cores, as the server)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    sentences = sst2_sentences(args.sentences)
    backbone = load_backbone("minilm")
    workdir = Path(tempfile.mkdtemp(prefix="dynprompt-bench-"))
    models = bench_repository(workdir / "repo", backbone, [*MODELS, "default"])
    # The ceiling batches rows of similar length, as the server does at saturation.
    rows = sorted(backbone.tokenize_rows(sentences, None, 128), key=lambda r: len(r.input_ids))
    batch = args.max_batch_size
    point = {"duration": args.duration, "warmup": args.warmup}
    ceilings = {
        "bare": bare_forward(backbone),
        "offline_probe": model_forward(backbone, models["probe"]),
        "offline_prefix": model_forward(backbone, models["prefix"]),
        "offline_default": model_forward(backbone, models["default"]),
    }
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    runs: dict[str, list[LoadResult]] = {}
    cores = len(os.sched_getaffinity(0))
    if args.threads != cores:  # for reference: the same forward with every core
        torch.set_num_threads(cores)
        rate, cpu_ms = offline_rate(ceilings["bare"], rows, batch, args.duration)
        rates["bare_all"], cpu["bare_all"] = [rate], [cpu_ms]
        torch.set_num_threads(args.threads)
    common = [
        "--model-repository", str(workdir / "repo"), "--device", "cpu", "--max-wait-ms", "5",
        "--threads", str(args.threads),
    ]  # fmt: skip
    with start_server([*common, "--max-batch-size", str(batch)], log_dir=workdir) as server:
        # Background load drifts on a shared machine: every measurement is taken once per
        # round, rounds interleave them, and the tables report medians. The in-process
        # ceilings run while the (idle) server waits.
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            for name, run_batch in ceilings.items():
                rate, cpu_ms = offline_rate(run_batch, rows, batch, args.duration)
                rates.setdefault(name, []).append(rate)
                cpu.setdefault(name, []).append(cpu_ms)
                print(f"  {name}: {rate:.1f} sentences/s, {cpu_ms:.1f} CPU ms/sentence", flush=True)
            for name in ("probe", "probe8", "prefix", "ipos_emb", "ipos_bb", "default"):
                if name == "probe8":  # 8 sentences a request: HTTP cost shared by 8
                    clients = max(1, args.concurrency // 8)
                    result = load(
                        server, "probe", sentences, clients, **point, inputs_per_request=8
                    )
                else:
                    result = load(server, name, sentences, args.concurrency, **point)
                runs.setdefault(name, []).append(result)
                rates.setdefault(name, []).append(result.sentences_per_s)
                cpu.setdefault(name, []).append(result.cpu_ms_per_sentence)
        print("latency vs load (prefix)", flush=True)
        curve = [load(server, "prefix", sentences, c, **point) for c in CURVE]
    curve.append(median_run(runs["prefix"]))
    with start_server([*common, "--max-batch-size", "1"], log_dir=workdir) as server:
        print("server with --max-batch-size 1", flush=True)
        unbatched = [load(server, "prefix", sentences, args.concurrency, **point)]
        rates["unbatched"] = [unbatched[0].sentences_per_s]
        cpu["unbatched"] = [unbatched[0].cpu_ms_per_sentence]
        runs["unbatched"] = unbatched

    med = {name: statistics.median(values) for name, values in rates.items()}
    # CPU time per sentence does not depend on the share of the machine a process gets.
    per = {name: statistics.median(values) for name, values in cpu.items()}

    def ratio(num: str, den: str) -> tuple[float, float]:
        return med[num] / med[den], per[den] / per[num]

    ratios = [
        ("serving efficiency: server `linear_probe` / bare backbone (same compute)", ratio("probe", "bare"), "≥ 0.85"),
        ("the same, 8 sentences a request", ratio("probe8", "bare"), "≥ 0.85"),
        (f"server `prefix` / offline `prefix` (`classify_rows`, batch {batch})", ratio("prefix", "offline_prefix"), "≥ 0.85"),
        (f"server `prefix` / bare backbone (the prompt adds {PROMPT_LENGTH} tokens a row)", ratio("prefix", "bare"), "—"),
        (f"the shipped default model: server / offline (`classify_rows`, batch {batch})", ratio("default", "offline_default"), "≥ 0.9"),
        ("batching gain: server `prefix` / same with `--max-batch-size 1`", ratio("prefix", "unbatched"), "> 1"),
        ("cost of dynamism, feature `embeddings`: `instance_position` / `prefix`", ratio("ipos_emb", "prefix"), "≥ 0.95"),
        ("cost of dynamism, feature `backbone`: `instance_position` / `prefix`", ratio("ipos_bb", "prefix"), "— (one extra backbone pass)"),
    ]  # fmt: skip
    lines = [
        "## Serving (HTTP)",
        "",
        f"Command: `python -m benchmarks.serving --rounds {args.rounds} --duration {args.duration:g} "
        f"--concurrency {args.concurrency} --sentences {args.sentences} --threads {args.threads}`  ",
        f"Device: {device_description()} (`--threads {args.threads}` in the server too); backbone MiniLM-L6 (fp32, torch backend); seeded "
        f"checkpoints with L = {PROMPT_LENGTH}; server `--max-batch-size {batch} --max-wait-ms 5`; "
        f"closed-loop clients (`benchmarks/loadgen.py`), one SST-2 dev sentence per request, "
        f"{len(sentences)} sentences cycled, {args.duration:g} s measured after {args.warmup:g} s "
        f"warm-up per point. Medians of {args.rounds} interleaved rounds (range in brackets). "
        "The load generator runs on the same cores as the server; 1-minute load average "
        f"{load_before:.1f} before the run and {os.getloadavg()[0]:.1f} after it (other "
        "processes share the machine, so absolute numbers drift; compare the ratios).",
        "",
        "| measurement | sentences/s | CPU ms / sentence | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "bare": f"bare backbone forward, batches of {batch} by length, in-process",
        "offline_probe": f"offline `linear_probe` (`classify_rows`, batches of {batch} by length)",
        "offline_prefix": f"offline `prefix` (`classify_rows`, batches of {batch} by length)",
        "offline_default": f"offline shipped default model (`classify_rows`, batches of {batch})",
        "probe": f"server, `linear_probe`, {args.concurrency} clients",
        "probe8": f"server, `linear_probe`, {max(1, args.concurrency // 8)} clients x 8 sentences",
        "prefix": f"server, `prefix`, {args.concurrency} clients",
        "ipos_emb": f"server, `instance_position`, feature `embeddings`, {args.concurrency} clients",
        "ipos_bb": f"server, `instance_position`, feature `backbone`, {args.concurrency} clients",
        "default": f"server, the shipped default model (L = 50), {args.concurrency} clients",
        "unbatched": f"server `--max-batch-size 1`, `prefix`, {args.concurrency} clients",
    }
    if "bare_all" in rates:
        labels = {
            "bare_all": f"(reference) bare backbone forward with {cores} torch threads",
            **labels,
        }
    for name, label in labels.items():
        spread = f" [{min(rates[name]):.1f}–{max(rates[name]):.1f}]" if len(rates[name]) > 1 else ""
        latency = "| | |"
        if name in runs:
            typical = median_run(runs[name])
            latency = " | ".join(f"{typical.percentile(q):.0f}" for q in (50, 95, 99)) + " |"
        lines.append(f"| {label} | {med[name]:.1f}{spread} | {per[name]:.1f} | {latency}")
    lines += [
        "",
        "| ratio (of medians) | by throughput | by CPU time per sentence | goal |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {text} | {a:.3f} | {b:.3f} | {goal} |" for text, (a, b), goal in ratios]
    # The server's CPU split: its model threads (`dp-compute`) and the rest (request path).
    model_ms = {
        name: statistics.median(r.compute_ms_per_sentence for r in results)
        for name, results in runs.items()
    }
    splits = [
        (f"`linear_probe`, {args.concurrency} clients", "probe", "bare", "bare backbone"),
        (f"`prefix`, {args.concurrency} clients", "prefix", "offline_prefix", "offline `prefix`"),
        (
            f"the shipped default model, {args.concurrency} clients",
            "default",
            "offline_default",
            "offline default",
        ),
    ]
    lines += [
        "",
        "Where the server's CPU per sentence goes: its model threads (named `dp-compute` in the "
        "kernel, `dynprompt/service/threadnames.py`), against the same model in-process, and "
        "the rest of the server (the request path). Medians over the rounds above, CPU ms a "
        "sentence:",
        "",
        "| server point | whole server | model threads | rest of the server | in-process "
        "ceiling | ceiling / model threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, name, ceiling, ceiling_label in splits:
        lines.append(
            f"| {label} | {per[name]:.1f} | {model_ms[name]:.1f} | "
            f"{per[name] - model_ms[name]:.1f} | {per[ceiling]:.1f} ({ceiling_label}) | "
            f"{per[ceiling] / model_ms[name]:.3f} |"
        )
    lines += [
        "",
        "Throughput ratios compare wall-clock rates on a machine whose other load drifts, and a "
        "process with more runnable threads (the server: torch threads, event loop, tokenisers) "
        "gets a larger share of a contended CPU than the in-process ceiling, so they can "
        "mislead either way. The CPU-time "
        "ratios (CPU seconds of the server process, all threads, per sentence answered, against "
        "the in-process ceiling's) do not depend on that share and are the better estimate "
        "here; torch's spinning worker threads count in both.",
    ]
    if "bare_all" in rates:
        lines += [
            "",
            f"Why `--threads {args.threads}`: with all {cores} cores the same in-process forward "
            f"ran at {med['bare_all']:.1f} sentences/s ({per['bare_all']:.1f} CPU ms a sentence) "
            f"against {med['bare']:.1f} ({per['bare']:.1f}) with {args.threads}; on a machine "
            "whose cores are busy with other jobs, torch's OpenMP threads wait for each other, "
            "and a run with every core would measure that, not the server. On a dedicated "
            "machine keep the server's default (all cores).",
        ]
    lines += [
        "",
        "Latency vs load (`prefix`; the last row is the saturation point above):",
        "",
        "| clients | sentences/s | p50 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.concurrency} | {r.sentences_per_s:.1f} | {r.percentile(50):.0f} | "
        f"{r.percentile(95):.0f} | {r.percentile(99):.0f} |"
        for r in curve
    ]
    lines += ["", f"![latency vs load]({PNG.name})"]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        plot(curve, PNG)
        write_section("serving", markdown)
        print(f"wrote {DOC} and {PNG}")
    return 0


def median_run(results: list[LoadResult]) -> LoadResult:
    """The run with the median throughput (its latencies are reported with it)."""
    ordered = sorted(results, key=lambda r: r.sentences_per_s)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    raise SystemExit(main())
