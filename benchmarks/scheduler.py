"""Scheduler benchmark: what choosing a batch costs the prepare thread, by queue depth.

    python -m benchmarks.scheduler [--rounds 5] [--no-write]

On a GPU the engine must spend well under 50 us a request in all (the 20,000 requests/s
goal of issue 11), and its queue holds thousands of rows at that rate. This times
`Scheduler.take` (one batch) and `Scheduler.wait_s` (asked at every wake-up) on queues
of SST-2 dev sentences, tokenised by MiniLM, with a 20-token prompt each, side by side
with the rule as first written (sort every row, visit every row;
`tests/test_service_scheduler.reference_take`), which picks the same rows. Medians of
`--rounds`. Then the expiry checks the prepare thread makes at every wake-up (two
`_next_expiry`, one `_expire`) with that many single-sentence requests queued. Writes
the `scheduler` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import timeit
from collections.abc import Callable

from benchmarks.loadgen import sst2_sentences
from benchmarks.report import write_section
from dynprompt.models import Backbone, load_backbone
from dynprompt.service.scheduler import BatchLimits, Scheduler
from tests.server_util import build_model
from tests.test_service_scheduler import Collect, job, reference_take, worker_with

PROMPT = 20
POINTS = ((64, 32), (256, 32), (1024, 256), (4096, 256), (16384, 256))  # (queued, batch cap)
TAKES = 20
WAKEUPS = (256, 1024, 4096)  # queued requests


def time_takes(
    costs: list[int], queued: int, cap: int, take: Callable[[Scheduler[int]], list[int]]
) -> tuple[float, float]:
    """(us a row taken, us a `wait_s` call) over TAKES batches, the queue refilled to
    `queued` rows after each from the same seeded stream of costs."""
    stream = iter(costs * (1 + (queued + TAKES * cap) // len(costs)))
    scheduler: Scheduler[int] = Scheduler(BatchLimits(max_batch_size=cap))
    for i in range(queued):
        scheduler.add(i, next(stream), 0.0)
    take_s = wait_s = 0.0
    rows = 0
    for _ in range(TAKES):
        start = time.perf_counter()
        scheduler.wait_s(0.0)
        wait_s += time.perf_counter() - start
        start = time.perf_counter()
        batch = take(scheduler)
        take_s += time.perf_counter() - start
        rows += len(batch)
        for i in range(len(batch)):
            scheduler.add(i, next(stream), 0.0)
    return take_s * 1e6 / rows, wait_s * 1e6 / TAKES


def time_wakeups(backbone: Backbone, sentences: list[str], queued: int) -> float:
    """us of the expiry checks at one wake-up of the prepare thread (its threads are not
    started: the requests stay queued)."""
    model = build_model("m", backbone, variant="prefix", feature="embeddings", labels=["n", "p"])
    worker, entry = worker_with(model, BatchLimits(max_batch_size=256), [])
    target = Collect()
    requests = [
        job(entry, target, [sentences[i % len(sentences)]], str(i), 600) for i in range(queued)
    ]
    worker._intake(requests, [])

    def wake() -> None:
        worker._next_expiry()
        worker._next_expiry()
        worker._expire([])

    return min(timeit.repeat(wake, number=20, repeat=5)) / 20 * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="repeats per point (medians)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    backbone = load_backbone("minilm")
    sentences = sst2_sentences()
    rows = backbone.tokenize_rows(sentences, None, 128)
    costs = [len(r.input_ids) + PROMPT for r in rows]
    random.Random(0).shuffle(costs)
    lines = [
        "| queued rows | batch cap | `take`, us a row | first rule, us a row | ratio |"
        " `wait_s`, us a call |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for queued, cap in POINTS:
        new = [time_takes(costs, queued, cap, Scheduler.take) for _ in range(args.rounds)]
        old = [time_takes(costs, queued, cap, reference_take) for _ in range(args.rounds)]
        take_us = statistics.median(t for t, _ in new)
        first_us = statistics.median(t for t, _ in old)
        wait_us = statistics.median(w for _, w in new)
        lines.append(
            f"| {queued:,} | {cap} | {take_us:.2f} | {first_us:.2f} | {first_us / take_us:.1f}x"
            f" | {wait_us:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    wakeups = ["| queued requests | expiry checks at one wake-up, us |", "|---:|---:|"]
    for queued in WAKEUPS:
        wakeups.append(f"| {queued:,} | {time_wakeups(backbone, sentences, queued):.0f} |")
        print(wakeups[-1], flush=True)
    command = f"python -m benchmarks.scheduler --rounds {args.rounds}"
    markdown = (
        "## Choosing a batch (`Scheduler`)\n\n"
        f"`{command}`: one thread, {TAKES} batches per point, medians of {args.rounds}"
        f" rounds; SST-2 dev sentences ({len(costs)}, MiniLM tokens + a {PROMPT}-token"
        " prompt) queued in a seeded random order, `padding_tolerance` 0.25, no padding"
        " budget. The first rule picks the same rows (checked by"
        " `tests/test_service_scheduler.py`).\n\n"
        + table
        + "\n\nThe prepare thread's expiry checks at each wake-up (best of 5 x 20):\n\n"
        + "\n".join(wakeups)
    )
    if not args.no_write:
        print(f"wrote {write_section('scheduler', markdown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
