"""One compute thread per backbone instance, batching rows from every model that uses it.

The event loop tokenises a request (in a thread pool), wraps it as a `Job` and
`submit`s it; its rows join the worker's queue. The worker thread closes a batch
when it holds `max_batch_size` rows, or `max_batch_tokens` padded tokens (prompts
included), or `max_wait` after its oldest row arrived. A batch starts with the
oldest row and takes the rows closest to it in length that add little padding
(`padding_tolerance`); the rest wait for the next batch, where rows of their own
length join them: little padding, and nobody starves. Rows of cancelled jobs
(client gone, queue timeout) are dropped before compute. A batch is one
`classify_rows` call; its results go back to the event loop with
`call_soon_threadsafe`. A batch that raises fails its own jobs only.

A batch that runs out of memory is split in halves and each half retried
(recursively); the worker's row cap drops to the size that last failed, and
creeps back up after `CAP_RECOVERY_BATCHES` clean batches. Only a row that runs
out of memory alone fails, and only its own request (`RowTooLarge`, a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dynprompt.models.backbone import Backbone, TokenizedRow
from dynprompt.models.inference import RowResult, classify_rows
from dynprompt.models.model import DynPromptModel

log = logging.getLogger("dynprompt.service.batcher")

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


class BatchFailed(RuntimeError):
    """The batch holding this job's rows raised; the job's request answers 500."""


class RowTooLarge(BatchFailed):
    """One of this job's rows ran out of memory alone; the request answers 503."""


# A batch that raises one of these is split in halves and retried (not failed).
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
# After this many batches without running out of memory, the adaptive row cap grows by one.
CAP_RECOVERY_BATCHES = 50


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait_s: float = 0.005
    # A row joins a batch only if the padding it adds (to itself, or to the rows already
    # there when it is the longest) is at most this fraction of its own length.
    padding_tolerance: float = 0.25


@dataclass(eq=False)
class Job:
    """One request's rows for one model; `future` resolves on `loop` with its results."""

    request_id: str
    model: DynPromptModel
    rows: list[TokenizedRow]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[RowResult]]
    admitted_at: float = field(default_factory=time.monotonic)
    state: str = QUEUED  # guarded by the worker's lock
    queue_s: float = 0.0
    compute_s: float = 0.0
    results: list[RowResult | None] = field(default_factory=list)
    remaining: int = 0


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    tokens: TokenizedRow
    cost: int  # assembled length upper bound: tokens + the model's prompt length
    arrived: float


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BackboneWorker:
    """The scheduler and compute thread of one backbone instance."""

    def __init__(
        self,
        backbone: Backbone,
        label: str,
        limits: BatchLimits,
        on_batch: Callable[[str, float, int, int, int, int], None] | None = None,
        on_start: Callable[[Job], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.label = label
        self.limits = limits
        self._on_batch = on_batch
        self._on_start = on_start
        self._cond = threading.Condition()
        self._queue: list[_Row] = []  # arrival order
        self._stopping = False
        self.row_cap = limits.max_batch_size  # adaptive: lowered when a batch runs out of memory
        self._clean_batches = 0
        self._thread = threading.Thread(
            target=self._run, name=f"dynprompt-compute[{label}]", daemon=True
        )

    # -- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        """Start the compute thread (once; later calls do nothing)."""
        with self._cond:
            if self._thread.ident is None:
                self._thread.start()

    def submit(self, job: Job) -> None:
        prompt = job.model.config.prompt.length
        now = time.monotonic()
        job.results = [None] * len(job.rows)
        job.remaining = len(job.rows)
        rows = [_Row(job, i, t, len(t.input_ids) + prompt, now) for i, t in enumerate(job.rows)]
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"backbone worker {self.label} is stopped")
            self._queue.extend(rows)
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started; False if some of its rows are already computing."""
        with self._cond:
            if job.state == QUEUED:
                job.state = CANCELLED
                return True
            return job.state == CANCELLED

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- compute thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Row] | None:
        limits = self.limits
        with self._cond:
            while True:
                self._queue = [r for r in self._queue if r.job.state != CANCELLED]
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                widest = max(r.cost for r in self._queue)
                full = (
                    len(self._queue) >= self.row_cap
                    or len(self._queue) * widest >= limits.max_batch_tokens
                )
                wait = self._queue[0].arrived + limits.max_wait_s - time.monotonic()
                if full or wait <= 0 or self._stopping:
                    return self._take()
                self._cond.wait(wait)

    def _take(self) -> list[_Row]:
        """Called with the lock held: pick a batch and mark its jobs running.

        The oldest row starts the batch (nobody starves); rows closest to it in length join
        while the batch has room and each adds little padding. Rows left out wait for the
        next batch, where they meet rows of their own length.
        """
        queue, limits = self._queue, self.limits
        anchor = queue[0].cost
        order = sorted(range(len(queue)), key=lambda i: (abs(queue[i].cost - anchor), i))
        chosen, width = [order[0]], anchor
        for i in order[1:]:
            if len(chosen) >= self.row_cap:
                break
            cost = queue[i].cost
            wider = max(width, cost)
            padded = (len(chosen) + 1) * wider
            added = padded - len(chosen) * width - cost
            if padded <= limits.max_batch_tokens and added <= limits.padding_tolerance * cost:
                chosen.append(i)
                width = wider
        chosen.sort()
        picked = set(chosen)
        batch = [queue[i] for i in chosen]
        self._queue = [r for i, r in enumerate(queue) if i not in picked]
        now = time.monotonic()
        for row in batch:
            job = row.job
            if job.state == QUEUED:
                job.state = RUNNING
                job.queue_s = now - job.admitted_at
                if self._on_start is not None:
                    self._on_start(job)
        return batch

    def _execute(self, batch: list[_Row]) -> None:
        start = time.perf_counter()
        try:
            outcomes = self._compute(batch)
        except Exception as exc:  # one bad batch fails its own requests, nothing else
            self._fail(batch, exc)
            return
        seconds = time.perf_counter() - start
        self._adapt(batch, outcomes)
        jobs = {id(r.job): r.job for r in batch}
        too_large: dict[int, BaseException] = {}
        for row, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                too_large.setdefault(id(row.job), outcome)
                continue
            row.job.results[row.index] = outcome
            row.job.remaining -= 1
        for key, error in too_large.items():
            job = jobs.pop(key)
            log.error(
                "a row of request %s runs out of memory alone on backbone %s: %s",
                job.request_id, self.label, error,
            )  # fmt: skip
            with self._cond:
                job.state = CANCELLED
            self._resolve(job, None, RowTooLarge(f"{type(error).__name__}: {error}"))
        for job in jobs.values():
            job.compute_s += seconds
            if job.remaining == 0 and job.state != CANCELLED:
                with self._cond:
                    job.state = DONE
                self._resolve(job, list(job.results), None)

    def _compute(self, batch: list[_Row]) -> list[RowResult | BaseException]:
        """Results in batch order; a batch out of memory is split in halves and retried.

        A row out of memory alone comes back as its exception; other errors propagate.
        """
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                encoded = self.backbone.collate([r.tokens for r in batch], self.backbone.device)
                results, stats = classify_rows(self.backbone, [r.job.model for r in batch], encoded)
        except OUT_OF_MEMORY as exc:
            exc.with_traceback(None)  # drop the failed forward's frames and tensors
            self._free_memory()
            if len(batch) == 1:
                return [exc]
            self._lower_cap(len(batch))
            half = len(batch) // 2
            return self._compute(batch[:half]) + self._compute(batch[half:])
        if self._on_batch is not None:
            models = len({id(r.job.model) for r in batch})
            self._on_batch(
                self.label,
                time.perf_counter() - start,
                stats.rows,
                stats.padded_tokens,
                stats.real_tokens,
                models,
            )
        return list(results)

    def _lower_cap(self, failed_rows: int) -> None:
        cap = max(1, failed_rows // 2)
        if cap < self.row_cap:
            log.warning(
                "out of memory with %d rows on backbone %s: batches now hold at most %d rows",
                failed_rows, self.label, cap,
            )  # fmt: skip
            self.row_cap = cap
        self._clean_batches = 0

    def _adapt(self, batch: list[_Row], outcomes: list[RowResult | BaseException]) -> None:
        if any(isinstance(o, BaseException) for o in outcomes) or self.row_cap >= (
            self.limits.max_batch_size
        ):
            return
        self._clean_batches += 1
        if self._clean_batches >= CAP_RECOVERY_BATCHES:
            self._clean_batches = 0
            self.row_cap += 1

    def _free_memory(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, batch: list[_Row], exc: BaseException) -> None:
        jobs = {id(r.job): r.job for r in batch}
        ids = ", ".join(job.request_id for job in jobs.values())
        log.error(
            "batch failed on backbone %s (%d rows; request ids %s): %s",
            self.label, len(batch), ids, exc, exc_info=exc,
        )  # fmt: skip
        for job in jobs.values():
            with self._cond:
                job.state = CANCELLED  # its rows still queued elsewhere are dropped
            self._resolve(job, None, BatchFailed(f"{type(exc).__name__}: {exc}"))

    @staticmethod
    def _resolve(job: Job, result: Any, error: BaseException | None) -> None:
        # RuntimeError: the event loop is gone (hard shutdown), so nobody is waiting.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
