"""Batching under load: the model's CPU per sentence when the server's scheduler picks
the batches, against batches sorted by length, for several padding tolerances.

    dynprompt bench batching [--rounds 3] [--clients 64] [--tolerances 0.25 0.1 0.05]

`bench serving` compares the HTTP server with an in-process ceiling that sorts all 512
sentences by length into batches of 32. The server cannot: it batches the rows that are
queued. This benchmark isolates that difference from the request path and from the
machine's noise in an HTTP run. It replays the server's closed loop in one thread, with
the server's own parts:

- `--clients` clients each have one sentence queued; SST-2 dev sentences in the order the
  load generator sends them (`benchmarks/loadgen.py`);
- the worker's `Scheduler.take` picks each batch from the rows queued, with the worker's
  `CostModel` learning the padding budget from the batches' times, as `dynprompt serve`
  does by default;
- on a CPU the worker makes the next batch as soon as the current one is done, before the
  answered clients' next requests arrive: each batch is taken from the queue less the
  rows the previous batch answered; they rejoin it after the take;
- `classify_rows`, the server's batch pipeline, computes each batch; the thread's CPU
  time is what is counted.

A third kind of point runs the engine itself, as `dynprompt serve --workers 1` wires it
(`Engine`, `LocalCore`, `EngineCore` and its prepare and compute threads), fed by
`--clients` coroutines calling `Engine.classify` on an event loop in the same process, with
no HTTP; its model CPU is the server's own compute metric
(`dynprompt_compute_cpu_seconds_total`, the compute thread's CPU in `classify_rows`).
Between the replay and `bench serving`'s server it says whether a model thread that costs
more than the replayed batches does so because of the engine's threads or of the HTTP
process around them.

Every point runs whole passes over the sentences, rounds interleaved, medians reported.
Writes the `batching` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.loadgen import sst2_sentences
from benchmarks.report import device_description, write_section
from benchmarks.serving import PROMPT_LENGTH, bench_repository
from dynprompt.models import (
    Backbone,
    DynPromptModel,
    TokenizedRow,
    classify_rows,
    load_backbone,
)
from dynprompt.service.scheduler import BatchLimits, CostModel, Scheduler
from tests.server_util import parse_metrics

CHOICES = ("probe", "prefix", "default")
LABELS = {
    "probe": "`linear_probe`",
    "prefix": f"`prefix` (L = {PROMPT_LENGTH})",
    "default": "the shipped default model (L = 50, backbone features)",
}


@dataclass
class Point:
    cpu_ms: float  # model CPU per sentence
    rows: float  # mean rows a batch
    padding: float  # padded positions over all positions, prompts included

    def shown(self) -> str:
        return f"{self.cpu_ms:.2f} CPU-ms/sentence, {self.rows:.1f} rows a batch, padding {self.padding:.3f}"


def run_batch(
    backbone: Backbone, model: DynPromptModel, rows: list[TokenizedRow]
) -> tuple[int, int]:
    """(padded, real) positions of the batch, prompts included."""
    _, stats = classify_rows(backbone, [model] * len(rows), backbone.collate(rows))
    return stats.padded_tokens, stats.real_tokens


def sorted_point(
    backbone: Backbone, model: DynPromptModel, rows: list[TokenizedRow], batch: int
) -> Point:
    """The ceiling of `bench serving`: every sentence, sorted by length, in batches."""
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    parts = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
    run_batch(backbone, model, parts[0])  # warm
    cpu, padded, real = time.thread_time(), 0, 0
    for part in parts:
        p, r = run_batch(backbone, model, part)
        padded, real = padded + p, real + r
    spent = time.thread_time() - cpu
    return Point(spent * 1000 / len(rows), len(rows) / len(parts), 1 - real / padded)


def scheduled_point(
    backbone: Backbone,
    model: DynPromptModel,
    rows: list[TokenizedRow],
    clients: int,
    limits: BatchLimits,
    passes: int,
) -> Point:
    """The server's closed loop at `clients`, replayed: see the module's docstring."""
    prompt = model.config.prompt.length
    scheduler: Scheduler[TokenizedRow] = Scheduler(limits)
    costs = CostModel()
    sent = 0

    def send() -> None:
        nonlocal sent
        row = rows[sent % len(rows)]
        scheduler.add(row, len(row.input_ids) + prompt, float(sent))
        sent += 1

    for _ in range(clients):
        send()
    answered = counted = batches = padded = real = 0
    cpu = 0.0
    returning = 0  # answered clients whose next request is not queued yet
    warm = len(rows) // 2  # the learned budget settles before the count starts
    while counted < passes * len(rows):
        batch = scheduler.take()
        for _ in range(returning):
            send()
        start, wall = time.thread_time(), time.perf_counter()
        padded_now, real_now = run_batch(backbone, model, batch)
        spent = time.thread_time() - start
        costs.observe(padded_now, time.perf_counter() - wall)
        budget = costs.break_even_tokens(limits.max_batch_tokens)
        if budget is not None:
            scheduler.padding_budget = budget
        returning = len(batch)
        answered += len(batch)
        if answered > warm:
            cpu += spent
            counted += len(batch)
            batches += 1
            padded += padded_now
            real += real_now
    return Point(cpu * 1000 / counted, counted / batches, 1 - real / padded)


def engine_point(
    repository: Path,
    name: str,
    texts: list[str],
    clients: int,
    limits: BatchLimits,
    passes: int,
    threads: int,
) -> Point:
    """The engine's own threads under the closed loop: see the module's docstring."""
    from dynprompt.service.config import Settings
    from dynprompt.service.core import EngineCore, backbone_loader
    from dynprompt.service.engine import Admission, ClassifyCall, Engine
    from dynprompt.service.server import settle_heap
    from dynprompt.service.transport import LocalCore

    settings = Settings.model_validate(
        {
            "model_repository": repository,
            "threads": threads,
            "max_batch_size": limits.max_batch_size,
            "padding_tolerance": limits.padding_tolerance,
        }
    )
    ids = itertools.count()

    def totals(rendered: bytes) -> dict[str, float]:
        metrics = parse_metrics(rendered.decode())
        out: dict[str, float] = {}
        for (key, labels), value in metrics.items():
            if key == "dynprompt_prompt_length_sum" and dict(labels).get("model") != name:
                continue
            out[key] = out.get(key, 0.0) + value
        return out

    async def run() -> Point:
        admission = Admission(settings.max_queue_requests)
        engine = Engine(settings, admission)
        core = EngineCore(settings, backbone_loader(settings), admission.value)
        engine.core = LocalCore(core, asyncio.get_running_loop())
        await asyncio.to_thread(core.load, settings.repository)
        settle_heap()  # as the server does once its models are loaded
        answered = 0

        async def client(until: int) -> None:
            nonlocal answered
            while answered < until:
                index = next(ids)
                call = ClassifyCall(name, [(texts[index % len(texts)], None)])
                with engine.observe(f"b{index}", "POST", "/v1/classify") as obs:
                    await engine.classify(call, obs)
                    obs.status = 200
                answered += 1

        try:
            await asyncio.gather(*(client(len(texts) // 2) for _ in range(clients)))  # warm
            before = totals(await engine.metrics())
            await asyncio.gather(*(client(answered + passes * len(texts)) for _ in range(clients)))
            after = totals(await engine.metrics())
        finally:
            await engine.core.close()

        def delta(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        rows = delta("dynprompt_batch_size_sum")
        padded = delta("dynprompt_batch_tokens_sum")
        real = delta("dynprompt_input_tokens_sum") + delta("dynprompt_prompt_length_sum")
        return Point(
            delta("dynprompt_compute_cpu_seconds_total") * 1000 / rows,
            rows / delta("dynprompt_batch_size_count"),
            1 - real / padded,
        )

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients")
    parser.add_argument("--sentences", type=int, default=512, help="SST-2 dev sentences cycled")
    parser.add_argument("--passes", type=int, default=1, help="counted passes per point")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--tolerances", type=float, nargs="+", default=[0.25, 0.1, 0.05],
        help="--padding-tolerance values to compare",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=CHOICES, default=["probe", "default"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see serving)")
    parser.add_argument(
        "--no-engine", action="store_true", help="skip the engine points (threads, no HTTP)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backbone = load_backbone("minilm")
    repository = Path(tempfile.mkdtemp(prefix="dynprompt-"))
    models = bench_repository(repository, backbone, args.models)
    texts = sst2_sentences(args.sentences)
    rows = backbone.tokenize_rows(texts, None, 128)
    points: dict[tuple[str, float | None, str], list[Point]] = {}
    kinds = ["replay"] if args.no_engine else ["replay", "engine"]
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        for name in args.models:
            model = models[name]
            point = sorted_point(backbone, model, rows, args.max_batch_size)
            points.setdefault((name, None, "sorted"), []).append(point)
            print(f"  {name} sorted: {point.shown()}", flush=True)
            for tolerance, kind in itertools.product(args.tolerances, kinds):
                limits = BatchLimits(
                    max_batch_size=args.max_batch_size, padding_tolerance=tolerance
                )
                if kind == "replay":
                    point = scheduled_point(
                        backbone, model, rows, args.clients, limits, args.passes
                    )
                else:
                    point = engine_point(
                        repository, name, texts, args.clients, limits, args.passes, args.threads
                    )
                points.setdefault((name, tolerance, kind), []).append(point)
                print(f"  {name} tolerance {tolerance:g}, {kind}: {point.shown()}", flush=True)

    def med(key: tuple[str, float | None, str]) -> Point:
        runs = points[key]
        return Point(
            *(statistics.median(getattr(p, f) for p in runs) for f in Point.__annotations__)
        )

    lines = [
        "## Batching under load (`dynprompt bench batching`)",
        "",
        f"Command: `python -m benchmarks.batching --rounds {args.rounds} --clients {args.clients} "
        f"--sentences {args.sentences} "
        f"--tolerances {' '.join(f'{t:g}' for t in args.tolerances)} "
        f"--models {' '.join(args.models)}`  ",
        f"Device: {device_description()}; backbone MiniLM-L6 (fp32); {len(rows)} SST-2 dev "
        f"sentences; batches of at most {args.max_batch_size} rows. The server's closed loop "
        f"at {args.clients} clients replayed in one thread with the worker's scheduler, its "
        "learned padding budget and `classify_rows` (see the script's docstring); the model's "
        f"CPU time per sentence over {args.passes} whole pass(es) after a half-pass warm-up. "
        "*The engine* rows run the engine itself instead (its prepare and compute threads, "
        f"{args.clients} coroutine clients calling `Engine.classify` in the same process, no "
        "HTTP) and count its compute metric. "
        f"Medians of {args.rounds} interleaved rounds.",
        "",
        "| model | batches made by | CPU-ms / sentence | sorted ceiling / this | rows a batch | padding |",
        "|---|---|---:|---:|---:|---:|",
    ]
    made_by = {
        "replay": "the scheduler, replayed in one thread",
        "engine": "the engine's own threads, no HTTP",
    }
    for name in args.models:
        ceiling = med((name, None, "sorted"))
        keys = [(name, None, "sorted")]
        keys += [(name, t, kind) for t, kind in itertools.product(args.tolerances, kinds)]
        for key in keys:
            p = med(key)
            _, tolerance, kind = key
            how = (
                f"sorting all {len(rows)} by length"
                if tolerance is None
                else f"{made_by[kind]}, `--padding-tolerance {tolerance:g}`"
            )
            lines.append(
                f"| {LABELS[name]} | {how} | {p.cpu_ms:.2f} | {ceiling.cpu_ms / p.cpu_ms:.3f} "
                f"| {p.rows:.1f} | {p.padding:.3f} |"
            )
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        print(f"wrote {write_section('batching', markdown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
