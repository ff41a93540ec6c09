"""GPU serving: the bare backbone's ceiling, the batch pipeline, and the server, on CUDA.

    dynprompt bench gpu [--duration 10] [--dtypes float16 bfloat16] [--workers N]

Where no CUDA device is present it says so and exits 0 (nothing to measure on a CPU).
`--device cpu` with small `--rows` and `--loads` runs every step on the CPU instead, as
a smoke run of this script (the tests do), not as a measurement.
On a GPU, with the shipped default model (MiniLM, a 50-token `instance_position`
prompt, `backbone` router features) and SST-2 dev sentences, for each dtype:

- the ceiling: the bare backbone's forward over every sentence plus 50 positions (the
  prompt's), batches of 128 and 512 — what the GPU can do;
- `classify_rows` (the batch pipeline, pre-tokenised, shape buckets and CUDA graphs as
  the server runs it) at 32, 128 and 512 rows: goal >= 0.7 of the ceiling at 512;
- `dynprompt serve` at 1, 64 and 256 closed-loop single-sentence clients and 16 clients
  x 32 sentences, with p50/p99, the server's CPU per request (all of it, and the engine
  core's) and its rows per batch (whether batches fill while the device computes); load
  comes from several client processes, so the client is not the bottleneck. Goals:
  >= 20,000 single-sentence requests/s; >= 50% of the ceiling with 32-sentence
  requests; p50 <= 5 ms at one client.

Writes the `gpu` section of docs/benchmarks.md, naming the device. On the offline GPU
machine, pack what it lacks first (see ../shared/gpu/pack.py), e.g.
`--wheel orjson==3.11.3 --wheel pyzmq==27.1.0 --wheel uvloop==0.21.0 --wheel httptools==0.6.4
--wheel pydantic-settings==2.11.0 --wheel python-dotenv==1.1.1 --wheel filelock==3.19.1`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.loadgen import LoadResult, run_load, sst2_sentences, tree_cpu_seconds
from benchmarks.report import write_section
from dynprompt.models import load_backbone, load_checkpoint
from dynprompt.models.backbone import Encoded
from dynprompt.models.inference import classify_rows
from dynprompt.service.config import DEFAULT_REPOSITORY
from tests.server_util import sample, scrape, start_server

PROMPT = 50


def rate(run: Callable[[int], int], seconds: float, device: str) -> float:
    """Rows per second of `run(i)` (which returns the rows it did), synchronised."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run(0)
    sync()
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += run(i)
        i += 1
    sync()
    return done / (time.perf_counter() - start)


def offline(
    device: str, dtype: str, sentences: list[str], seconds: float, sizes: list[int]
) -> dict[str, float]:
    """The bare backbone's rows/s at the two largest `sizes` and the batch pipeline's at
    each of them (as `bare_N` and `pipeline_N`)."""
    checkpoint = DEFAULT_REPOSITORY / "sst2"
    backbone = load_backbone("minilm", device, getattr(torch, dtype))
    model = load_checkpoint(checkpoint, backbone=backbone)
    rows = sorted(
        backbone.tokenize_rows(sentences, None, model.config.input.max_length),
        key=lambda r: len(r.input_ids),
    )
    out: dict[str, float] = {}
    for batch in sizes[-2:]:
        batches = [backbone.collate(rows[i : i + batch]) for i in range(0, len(rows), batch)]

        def bare(i: int, batches: list[Encoded] = batches) -> int:
            encoded = batches[i % len(batches)]
            rows_, width = encoded.input_ids.shape
            with torch.inference_mode():
                embeds = backbone.embed(encoded.input_ids)
                pad = backbone.pad_embedding().expand(rows_, PROMPT, -1)
                x = torch.cat([embeds, pad], dim=1)
                prompt = torch.ones(rows_, PROMPT, dtype=torch.long, device=x.device)
                mask = torch.cat([encoded.attention_mask, prompt], dim=1)
                backbone._hidden_states(x, mask, None)
            return int(rows_)

        out[f"bare_{batch}"] = rate(bare, seconds, device)
    if device.startswith("cuda"):  # as the server runs it there
        backbone.use_buckets(max_rows=max(sizes), capture=True)
    for batch in sizes:
        batches = [backbone.collate(rows[i : i + batch]) for i in range(0, len(rows), batch)]

        def pipeline(i: int, batches: list[Encoded] = batches) -> int:
            encoded = batches[i % len(batches)]
            classify_rows(backbone, [model] * encoded.input_ids.shape[0], encoded)
            return int(encoded.input_ids.shape[0])

        out[f"pipeline_{batch}"] = rate(pipeline, seconds, device)
    return out


def _client(args: tuple[str, list[str], int, float, int]) -> LoadResult:
    url, sentences, clients, seconds, inputs = args
    return asyncio.run(
        run_load(url, "sst2", sentences, clients, duration_s=seconds, inputs_per_request=inputs)
    )


def load(url: str, sentences: list[str], clients: int, seconds: float, inputs: int) -> LoadResult:
    """Closed-loop load from up to 8 client processes; results merged."""
    procs = max(1, min(8, clients // 16, os.cpu_count() or 1))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        parts = list(pool.map(_client, [(url, sentences, n, seconds, inputs) for n in shares]))
    merged = LoadResult(clients, min(p.seconds for p in parts), 0, 0)
    for part in parts:
        refused = {status: n for status, n in part.statuses.items() if status != 200}
        if refused:  # a fast 503 is not throughput
            raise SystemExit(f"{clients} clients x {inputs}: non-200 answers {refused}")
        merged.requests += part.requests
        merged.sentences += part.sentences
        merged.statuses.update(part.statuses)
        merged.latencies_ms += part.latencies_ms
        merged.completions += part.completions
        merged.answered += part.answered
    return merged


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def delta(before: Metrics, after: Metrics, name: str) -> float:
    """How much an unlabelled series grew between two scrapes."""
    return sample(after, name) - sample(before, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--workers", type=int, default=None, help="server HTTP processes")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[32, 128, 512],
        help="batch sizes of the pipeline; the two largest also for the bare ceiling",
    )  # fmt: skip
    parser.add_argument(
        "--loads", nargs="+", default=["1x1", "64x1", "256x1", "16x32"],
        help="server load points, CLIENTSxSENTENCES (sentences per request)",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("dynprompt bench gpu: no CUDA device here; nothing to measure on a CPU.")
        return 0
    sizes = sorted(args.rows)
    loads = [tuple(int(n) for n in load.split("x")) for load in args.loads]
    device = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else "CPU (a smoke run of this script, not a GPU figure)"
    )
    sentences = sst2_sentences()
    lines = [
        f"## GPU serving on {device} (`dynprompt bench gpu`)",
        "",
        f"`python -m benchmarks.gpu {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        "the shipped default model (MiniLM, 50-token "
        "`instance_position` prompt, backbone router features), SST-2 dev sentences; "
        f"{os.cpu_count()} CPU cores.",
        "",
        "| dtype | measure | sentences/s | requests/s | p50 ms | p99 ms | server CPU-ms / "
        "request | of which the engine core | rows / batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in args.dtypes:
        print(f"{dtype}: offline", flush=True)
        figures = offline(args.device, dtype, sentences, args.duration, sizes)
        for name, value in figures.items():
            lines.append(
                f"| {dtype} | {name.replace('_', ' at ')} rows | {value:,.0f} | | | | | | |"
            )
        top = sizes[-1]
        ceiling = figures[f"bare_{top}"]
        ratio = figures[f"pipeline_{top}"] / ceiling
        lines.append(
            f"| {dtype} | pipeline / bare at {top} (goal ≥ 0.7) | **{ratio:.2f}** | | | | | | |"
        )
        serve_args = ["--model-repository", str(DEFAULT_REPOSITORY), "--device", args.device]
        serve_args += ["--dtype", dtype, "--max-batch-size", str(top), "--max-wait-ms", "0"]
        if args.workers:
            serve_args += ["--workers", str(args.workers)]
        with start_server(serve_args, log_dir=Path("/tmp") / "dynprompt-gpu-bench") as server:
            for clients, inputs in loads:
                print(f"{dtype}: server, {clients} clients x {inputs}", flush=True)
                # CPU per request, all processes and the engine core's alone (its
                # `process_*` series): which side of the server a shortfall comes from.
                before, cpu = scrape(server.url), tree_cpu_seconds(server.pid)
                result = load(server.url, sentences, clients, args.duration, inputs)
                cpu, after = tree_cpu_seconds(server.pid) - cpu, scrape(server.url)
                if not result.latencies_ms:
                    raise SystemExit(
                        f"{clients} clients x {inputs}: nothing answered in {args.duration:g} s"
                    )
                core = delta(before, after, "process_cpu_seconds_total")
                # Whether batches fill while the device computes, or one row runs alone
                # between full ones (the prepare thread takes what is queued when due).
                batches = delta(before, after, "dynprompt_batch_size_count")
                rows = delta(before, after, "dynprompt_batch_size_sum")
                rows_per_batch = rows / max(batches, 1)
                done = max(result.answered // inputs, 1)  # the CPU spans the warm-up too
                share = result.sentences_per_s / ceiling
                note = f" ({share:.0%} of the ceiling)" if inputs > 1 else ""
                lines.append(
                    f"| {dtype} | server, {clients} clients × {inputs} sentence(s){note} | "
                    f"{result.sentences_per_s:,.0f} | {result.requests_per_s:,.0f} | "
                    f"{statistics.median(result.latencies_ms):.1f} | {result.percentile(99):.1f} | "
                    f"{cpu * 1000 / done:.3f} | {core * 1000 / done:.3f} | {rows_per_batch:.1f} |"
                )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        print(f"wrote {write_section('gpu', table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
