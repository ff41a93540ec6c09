"""The worker, scheduler and registry in-process: grouping by length, limits, cancellation,
failure isolation, shared backbones, and half precision. (The HTTP-level behaviour is in the
other test_service files.)"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dynprompt.service.worker as worker_module
from dynprompt.models import Backbone, DynPromptModel, RowResult, load_backbone, save_checkpoint
from dynprompt.service import protocol
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.protocol import Answer, Submission
from dynprompt.service.registry import ModelEntry, Registry, RepositoryError
from dynprompt.service.scheduler import BatchLimits, CostModel, Scheduler
from dynprompt.service.worker import BackboneWorker, Job
from tests.server_util import (
    Collect,
    build_model,
    build_repository,
    offline_predictions,
)

SHORT, LONG = "fine", "a long and winding sentence that goes on about the film " * 3
_TICKETS = itertools.count(1)


def answers_of(target: Collect, jobs: list[Job], timeout: float = 60) -> list[Answer]:
    return [target.wait(j.sub.ticket, timeout) for j in jobs]


@pytest.fixture(scope="module")
def model(minilm: Backbone) -> DynPromptModel:
    return build_model("m", minilm, variant="prefix", feature="embeddings", labels=["neg", "pos"])


def entry_of(model: DynPromptModel, worker: BackboneWorker) -> ModelEntry:
    return ModelEntry(model.name, Path("."), "v", model, worker)


def job(
    entry: ModelEntry, target: Collect, texts: list[str], rid: str = "r", timeout: float = 60
) -> Job:
    now = time.monotonic()
    inputs: list[tuple[str, str | None]] = [(t, None) for t in texts]
    sub = Submission(next(_TICKETS), rid, entry.name, inputs, True, now, now + timeout)
    return Job(sub, entry, target)


def worker_with(
    model: DynPromptModel, limits: BatchLimits, batches: list[tuple[Any, ...]]
) -> tuple[BackboneWorker, ModelEntry]:
    def record(*args: Any) -> None:
        batches.append(args)

    worker = BackboneWorker(model.backbone, "minilm", limits, on_batch=record)
    return worker, entry_of(model, worker)


@pytest.mark.parametrize(
    ("max_batch_size", "tolerance", "budget", "sizes"),
    [
        (4, 0.5, None, [4, 4]),
        (16, 0.5, None, [4, 4]),  # too few batches to learn a padding budget from
        (16, 1e9, None, [8]),
        (16, 0.5, 10**6, [8]),  # padding paid for by the batch it saves
    ],
)
def test_rows_are_grouped_by_length(
    model: DynPromptModel,
    max_batch_size: int,
    tolerance: float,
    budget: int | None,
    sizes: list[int],
) -> None:
    batches: list[tuple[Any, ...]] = []
    limits = BatchLimits(max_batch_size, 10**6, 0.0, tolerance, budget)
    worker, entry = worker_with(model, limits, batches)
    target = Collect()
    texts = [SHORT if i % 2 == 0 else LONG for i in range(8)]  # arrivals alternate short/long
    jobs = [job(entry, target, [t], str(i)) for i, t in enumerate(texts)]
    for j in jobs:
        worker.submit(j)  # all queued before the threads start
    worker.start()
    answers = answers_of(target, jobs)
    worker.stop(10)
    assert [b[3] for b in batches] == sizes
    no_padding = all(padded == real for *_, padded, real, _ in batches)
    assert no_padding == (len(sizes) == 2)  # grouped by length, or (padding allowed) mixed
    want = offline_predictions(model, texts)
    for got, ref in zip(answers, want, strict=True):
        assert got.rows[0].probs == pytest.approx(ref.probs, abs=1e-5)


def test_padding_budget_counts_the_whole_batch() -> None:
    """Rows of 10 and 40 tokens: apart under the tolerance alone; together once the batch
    may carry their 60 padded tokens, and not one token less."""

    def batch(budget: int) -> list[int]:
        scheduler: Scheduler[int] = Scheduler(BatchLimits(16, 10**6, 0.0, 0.25, budget))
        for cost in (10, 40, 10, 40):
            scheduler.add(cost, cost, 0.0)
        return scheduler.take()

    assert batch(0) == [10, 10]
    assert batch(59) == [10, 10]
    assert batch(60) == [10, 40, 10, 40]


def reference_take(scheduler: Scheduler[int]) -> list[int]:
    """The batching rule as first written: sort every queued row by distance from the
    oldest, visit them all. `Scheduler.take` must pick exactly these rows."""
    queue, limits = scheduler.rows, scheduler.limits
    anchor = queue[0].cost
    order = sorted(range(len(queue)), key=lambda i: (abs(queue[i].cost - anchor), i))
    chosen, width, real = [order[0]], anchor, anchor
    for i in order[1:]:
        if len(chosen) >= scheduler.row_cap:
            break
        cost = queue[i].cost
        wider = max(width, cost)
        padded = (len(chosen) + 1) * wider
        added = padded - len(chosen) * width - cost
        affordable = (
            added <= limits.padding_tolerance * cost
            or padded - real - cost <= scheduler.padding_budget
        )
        if padded <= limits.max_batch_tokens and affordable:
            chosen.append(i)
            width, real = wider, real + cost
    chosen.sort()
    picked = set(chosen)
    scheduler.rows = [r for i, r in enumerate(queue) if i not in picked]
    return [queue[i].item for i in chosen]


def test_take_stops_early_yet_picks_what_visiting_every_row_picks() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        limits = BatchLimits(
            max_batch_size=rng.randint(1, 40),
            max_batch_tokens=rng.choice([10**6, rng.randint(20, 2000)]),
            max_wait_s=0.0,
            padding_tolerance=rng.choice([0.0, 0.1, 0.25, 1.0, 1.5, 3.0]),
        )
        budget = rng.choice([0, 5, 50, 500])
        top = rng.choice([5, 30, 100])
        costs = [rng.randint(1, top) for _ in range(rng.randint(1, 60))]
        fast: Scheduler[int] = Scheduler(limits)
        slow: Scheduler[int] = Scheduler(limits)
        for scheduler in (fast, slow):
            scheduler.padding_budget = budget
            scheduler.row_cap = (
                rng.randint(1, limits.max_batch_size)
                if rng.random() < 0.3
                else limits.max_batch_size
            )
            for i, cost in enumerate(costs):
                scheduler.add(i, cost, 0.0)
        slow.row_cap = fast.row_cap
        while len(slow):
            assert fast.take() == reference_take(slow), (limits, budget, costs)
        assert len(fast) == 0


@pytest.mark.parametrize(
    ("fixed_s", "per_token_s", "want"),
    [
        (2e-3, 1e-6, 2000),  # a small model: padding is cheap next to another batch
        (1e-3, 2e-4, 5),  # a real model on a CPU: a few tokens
        (0.0, 2e-4, 0),  # no fixed cost: padding never pays
        (4e-3, 0.0, 8192),  # flat cost (an unsaturated GPU): padding is free up to the cap
    ],
)
def test_cost_model_finds_the_break_even(fixed_s: float, per_token_s: float, want: int) -> None:
    costs = CostModel()
    sizes = [64 * (1 + i % 16) for i in range(40)]
    for i, tokens in enumerate(sizes):
        assert costs.break_even_tokens(8192) is None or i >= costs.min_batches
        costs.observe(tokens, fixed_s + per_token_s * tokens)
    assert costs.break_even_tokens(8192) == pytest.approx(want, abs=1)


def test_cost_model_needs_batches_of_different_sizes() -> None:
    costs = CostModel()
    for _ in range(100):
        costs.observe(512, 0.01)
    assert costs.break_even_tokens(8192) is None


def test_batch_closes_at_the_token_budget(model: DynPromptModel) -> None:
    batches: list[tuple[Any, ...]] = []
    cost = len(model.backbone.tokenize_row(LONG, None, 128).input_ids) + model.config.prompt.length
    worker, entry = worker_with(
        model, BatchLimits(max_batch_size=64, max_batch_tokens=3 * cost, max_wait_s=0.0), batches
    )
    target = Collect()
    jobs = [job(entry, target, [LONG] * 7)]
    worker.submit(jobs[0])
    worker.start()
    (answer,) = answers_of(target, jobs)
    worker.stop(10)
    assert [b[3] for b in batches] == [3, 3, 1]
    assert all(padded <= 3 * cost for *_, padded, _, _ in batches)
    assert len(answer.rows) == 7 and answer.compute_s > 0


def test_cancelled_jobs_are_skipped(model: DynPromptModel) -> None:
    batches: list[tuple[Any, ...]] = []
    worker, entry = worker_with(model, BatchLimits(max_batch_size=8, max_wait_s=0.0), batches)
    target = Collect()
    gone, kept = job(entry, target, [SHORT, LONG], "gone"), job(entry, target, [SHORT], "kept")
    worker.submit(gone)
    worker.submit(kept)
    assert worker.cancel(gone) and worker.cancel(gone)  # idempotent while queued
    worker.start()
    answers_of(target, [kept])
    worker.stop(10)
    assert [b[3] for b in batches] == [1] and gone.sub.ticket not in target.answers
    assert not worker.cancel(kept)  # finished jobs cannot be cancelled


def test_a_failing_batch_fails_only_its_own_jobs(
    model: DynPromptModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worker_module.classify_rows

    def flaky(backbone: Any, models: Any, encoded: Any) -> tuple[list[RowResult], Any]:
        if any("xyzzy" in backbone.tokenizer.decode(ids) for ids in encoded.input_ids.tolist()):
            raise RuntimeError("injected")
        return real(backbone, models, encoded)

    monkeypatch.setattr(worker_module, "classify_rows", flaky)
    worker, entry = worker_with(model, BatchLimits(max_batch_size=1, max_wait_s=0.0), [])
    target = Collect()
    jobs = [
        job(entry, target, [SHORT], "a"),
        job(entry, target, ["xyzzy", SHORT], "b"),
        job(entry, target, [LONG], "c"),
    ]
    for j in jobs:
        worker.submit(j)
    worker.start()
    a, b, c = answers_of(target, jobs)
    worker.stop(10)
    assert b.error == protocol.INTERNAL and "request id b" in b.message
    assert a.error is None and c.error is None and len(a.rows) == len(c.rows) == 1
    assert jobs[1].state == worker_module.CANCELLED  # its second row never ran


def test_a_request_not_started_by_its_deadline_is_answered_503(model: DynPromptModel) -> None:
    worker, entry = worker_with(model, BatchLimits(max_batch_size=4, max_wait_s=30.0), [])
    target = Collect()
    late = job(entry, target, [SHORT], "late", timeout=0.3)
    worker.submit(late)
    worker.start()
    (answer,) = answers_of(target, [late], timeout=20)
    worker.stop(10)
    assert answer.error == protocol.QUEUE_TIMEOUT and answer.queue_s is None


def test_a_batch_that_fell_due_is_not_slept_past(model: DynPromptModel) -> None:
    """The prepare thread checks whether a batch is due, then computes how long to sleep,
    reading the clock twice. A batch that fell due in between once counted as no wait at
    all, so the thread slept until the queue timeout (seen in CI: one request, 503 after
    30 s). Here the batch is already due: the sleep must be 0, whatever the deadline."""
    worker, entry = worker_with(model, BatchLimits(max_batch_size=4, max_wait_s=0.005), [])
    late = job(entry, Collect(), [SHORT], "due", timeout=30)
    late.sub = late.sub._replace(admitted=late.sub.admitted - 1.0)  # well past max_wait
    worker.submit(late)  # not started: nothing takes it
    assert worker._sleep_s() == 0.0
    fresh, entry2 = worker_with(model, BatchLimits(max_batch_size=4, max_wait_s=0.5), [])
    fresh.submit(job(entry2, Collect(), [SHORT], "fresh", timeout=30))
    assert 0.0 < (fresh._sleep_s() or 0.0) <= 0.5  # not due yet: sleep until it is


def test_registry_shares_backbones_and_runs_half_precision(
    tmp_path: Path, minilm: Backbone
) -> None:
    models = build_repository(tmp_path, minilm, {
        "a": {"variant": "dynamic", "feature": "backbone", "labels": ["neg", "pos"]},
        "b": {"variant": "instance_position", "feature": "embeddings", "labels": ["neg", "pos"]},
    })  # fmt: skip
    loads: list[tuple[str, str, torch.dtype]] = []

    def loader(name: str, device: str, dtype: torch.dtype) -> Any:
        loads.append((name, device, dtype))
        return load_backbone(name, device, dtype)

    metrics = ServiceMetrics()
    registry = Registry(loader, "cpu", torch.float16, BatchLimits(max_wait_s=0.0), metrics)
    served = registry.load(tmp_path)
    assert loads == [("minilm", "cpu", torch.float16)]  # one backbone for both checkpoints
    assert len(served.workers) == 1 and served.models["a"].worker is served.models["b"].worker
    backbone = served.workers[0].backbone
    assert backbone.dtype == torch.float16
    for entry in served.models.values():
        assert all(p.dtype == torch.float32 for p in entry.model.parameters())  # prompts stay fp32
    registry.warm(served)
    registry.activate(served)
    texts = ["a warm and witty film", "a cold, clumsy mess"]
    target = Collect()
    jobs = [job(served.models[name], target, texts, name) for name in ("a", "b")]
    for j in jobs:
        served.workers[0].submit(j)
    answers = answers_of(target, jobs)
    registry.stop(10)
    for name, answer in zip(("a", "b"), answers, strict=True):
        for g, want in zip(answer.rows, offline_predictions(models[name], texts), strict=True):
            assert sum(g.probs) == pytest.approx(1.0, abs=1e-3)
            assert g.probs == pytest.approx(want.probs, abs=2e-2)  # fp16 vs the fp32 reference
    assert 'model="a",variant="dynamic"' in metrics.render().decode()


def test_repository_errors_name_the_path(tmp_path: Path, minilm: Backbone) -> None:
    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    with pytest.raises(RepositoryError, match="not found"):
        registry.load(tmp_path / "missing")
    # Checkpoints one level too deep are not a version folder; `same/` and `same/1/` are both
    # version 1 of `same`. Each is refused with its path and reason, and as nothing loads,
    # loading fails naming every one of them.
    build_repository(tmp_path / "x", minilm, {"same": {"variant": "prefix", "labels": ["a", "b"]}})
    model = build_model("same", minilm, variant="prefix", labels=["a", "b"])
    save_checkpoint(model, tmp_path / "same")
    save_checkpoint(model, tmp_path / "same" / "1")
    with pytest.raises(RepositoryError, match="no checkpoint could be loaded") as refused:
        registry.load(tmp_path)
    message = str(refused.value)
    assert f"{tmp_path / 'x' / 'same'}: 'same' is not a version" in message
    assert (
        f"{tmp_path / 'same'}: model 'same' version 1 is also the folder {tmp_path / 'same' / '1'}"
        in message
    )
    # A checkpoint folder given directly is a repository of one.
    assert list(registry.load(tmp_path / "x" / "same").models) == ["same"]


def test_out_of_memory_splits_lowers_the_cap_and_recovers(
    model: DynPromptModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worker_module.classify_rows
    sizes: list[int] = []

    def small_memory(backbone: Any, models: Any, encoded: Any) -> tuple[list[RowResult], Any]:
        texts = [backbone.tokenizer.decode(ids) for ids in encoded.input_ids.tolist()]
        sizes.append(len(texts))
        if len(texts) > 3 or any("gigantic" in t for t in texts):
            raise torch.OutOfMemoryError("injected out of memory")
        return real(backbone, models, encoded)

    monkeypatch.setattr(worker_module, "classify_rows", small_memory)
    monkeypatch.setattr(worker_module, "CAP_RECOVERY_BATCHES", 2)
    worker, entry = worker_with(model, BatchLimits(max_batch_size=16, max_wait_s=0.05), [])
    target = Collect()
    texts = [f"film number {i}" for i in range(10)]
    jobs = [job(entry, target, texts, "big"), job(entry, target, [SHORT, "gigantic"], "huge")]
    for j in jobs:
        worker.submit(j)
    worker.start()
    big, huge = answers_of(target, jobs)
    assert huge.error == protocol.OUT_OF_MEMORY and big.error is None
    want = offline_predictions(model, texts)
    for got, ref in zip(big.rows, want, strict=True):
        assert got.probs == pytest.approx(ref.probs, abs=1e-4)
    assert sizes[0] == 12 and max(sizes[1:]) < 12  # split, retried
    assert worker.row_cap < 16
    low = worker.row_cap
    for i in range(4):
        more = job(entry, target, [SHORT], f"r{i}")
        worker.submit(more)
        answers_of(target, [more])
    worker.stop(10)
    assert worker.row_cap > low  # clean batches let the cap grow back


def test_deadlines_leave_with_their_jobs_and_expiry_still_answers(model: DynPromptModel) -> None:
    """The prepare thread keeps queued jobs in a heap by deadline instead of scanning every
    queued row at each wake-up: a job that expires is still answered 503 and its rows
    leave the queue, the others are computed, and no finished job stays in the heap."""
    worker, entry = worker_with(model, BatchLimits(max_batch_size=4, max_wait_s=0.0), [])
    target = Collect()
    jobs = [job(entry, target, [SHORT, LONG], str(i)) for i in range(12)]
    late = job(entry, target, [SHORT], "late", timeout=-1.0)  # past its deadline on arrival
    stale = job(entry, target, [LONG], "stale", timeout=0.3)
    for j in [*jobs, late]:
        worker.submit(j)
    worker._intake([stale], [])  # queued, then nothing wakes the worker before its deadline
    time.sleep(0.4)
    worker.start()
    answers = answers_of(target, [*jobs, late, stale])
    assert all(a.error is None and len(a.rows) == 2 for a in answers[:12])
    assert answers[12].error == answers[13].error == protocol.QUEUE_TIMEOUT
    deadline = time.monotonic() + 5
    while (worker._deadlines or len(worker.scheduler)) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(10)
    assert worker._deadlines == [] and len(worker.scheduler) == 0
