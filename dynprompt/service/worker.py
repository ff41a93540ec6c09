"""One backbone instance's batch pipeline: a prepare thread and a compute thread.

The prepare thread takes new jobs from the inbox, drops the cancelled and the
expired, tokenises every new row in one call of the fast tokenizer, queues the
rows (`Scheduler`), and when a batch is due and the compute slot is free, collates
it (into pinned memory and onto the device without waiting, on a GPU) and hands it
over. The compute thread runs it through the batch pipeline (`classify_rows`),
copies the results to the host once, and delivers each finished job's answer to
whoever waits for it, once per batch and reply target. So while the device
computes batch N, the CPU tokenises and prepares batch N+1.

A batch that runs out of memory is split in halves and each half retried
(recursively); the row cap drops to the size that last failed and creeps back up
after `CAP_RECOVERY_BATCHES` clean batches. Only a row that runs out of memory alone
fails, and only its own request (503). A batch that raises anything else fails
its own requests (500) and nothing else.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dynprompt.models.backbone import Backbone, Encoded, TokenizedRow
from dynprompt.models.config import DynPromptConfig
from dynprompt.models.inference import RowResult, batch_order, classify_rows
from dynprompt.models.model import DynPromptModel
from dynprompt.service import protocol
from dynprompt.service.memory import Trimmer
from dynprompt.service.protocol import Answer, RowAnswer, Submission
from dynprompt.service.scheduler import BatchLimits, CostModel, Scheduler
from dynprompt.service.threadnames import COMPUTE, PREPARE, name_this_thread


class Served(Protocol):
    """What a worker needs of a served model (`registry.ModelEntry` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> DynPromptModel: ...

    @property
    def config(self) -> DynPromptConfig: ...

    @property
    def labels(self) -> list[str]: ...


log = logging.getLogger("dynprompt.service.worker")

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"
# A batch that raises one of these is split in halves and retried (not failed).
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
# After this many batches without running out of memory, the adaptive row cap grows by one.
CAP_RECOVERY_BATCHES = 50

BatchObserver = Callable[[str, float, float, int, int, int, int], None]


class ReplyTarget(Protocol):
    """Where a job's answer goes: an event loop in this process, or a socket to another."""

    def deliver(self, answers: list[Answer]) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One submission inside the core, from intake to answer."""

    sub: Submission
    entry: Served
    target: ReplyTarget
    state: str = QUEUED  # guarded by the worker's lock
    rows: list[TokenizedRow] = field(default_factory=list)
    results: list[RowResult | None] = field(default_factory=list)
    remaining: int = 0
    queue_s: float | None = None
    compute_s: float = 0.0


@dataclass(eq=False, slots=True)
class Row:
    job: Job
    index: int
    tokens: TokenizedRow


def answer_error(job: Job, kind: str, message: str) -> Answer:
    entry = job.entry
    return Answer(
        job.sub.ticket, entry.name, entry.labels, [], kind, message, job.queue_s, job.compute_s
    )


def deliver_all(answers: list[tuple[ReplyTarget, Answer]]) -> None:
    """One `deliver` call per target (each crosses a thread or a process)."""
    by_target: dict[int, tuple[ReplyTarget, list[Answer]]] = {}
    for target, answer in answers:
        by_target.setdefault(id(target), (target, []))[1].append(answer)
    for target, batch in by_target.values():
        target.deliver(batch)


class BackboneWorker:
    """The scheduler, prepare thread and compute thread of one backbone instance."""

    def __init__(
        self,
        backbone: Backbone,
        label: str,
        limits: BatchLimits,
        on_batch: BatchObserver | None = None,
        on_tokenized: Callable[[int, int], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.label = label
        self.limits = limits
        self.scheduler: Scheduler[Row] = Scheduler(limits)
        self._costs = CostModel() if limits.padding_budget is None else None
        self._logged_budget: int | None = None
        self._logged_at = 0.0
        self._on_batch = on_batch
        self._on_tokenized = on_tokenized  # (rows the front ends tokenised, rows done here)
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._inbox_rows = 0
        self._wake_at_rows: int | None = 1  # submit wakes the prepare thread at this many rows
        self._slot: tuple[list[Row], Encoded] | None = None  # the prepared batch
        self._busy = False  # the compute thread is running a batch
        self._stopping = False
        self._prepared_all = False  # stopping, and the prepare thread has handed over its last
        self._clean_batches = 0
        # Queued jobs by deadline (prepare thread only; jobs no longer queued are popped when
        # they reach the top), and how many jobs were ever cancelled: the prepare thread
        # then neither scans every queued row for expiry at each wake-up nor drops
        # cancelled rows when none were cancelled. Both scans grew with the queue.
        self._deadlines: list[tuple[float, int, Job]] = []
        self._pushed = itertools.count()
        self._cancels = 0  # guarded by the lock
        self._cancels_dropped = 0  # prepare thread only
        self._trimmer = Trimmer()
        self._cuda = backbone.device.type == "cuda"
        self._threads = [
            threading.Thread(
                target=self._prepare_loop, name=f"dynprompt-prepare[{label}]", daemon=True
            ),
            threading.Thread(
                target=self._compute_loop, name=f"dynprompt-compute[{label}]", daemon=True
            ),
        ]

    @property
    def row_cap(self) -> int:
        return self.scheduler.row_cap

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads (once; later calls do nothing)."""
        with self._cond:
            for thread in self._threads:
                if thread.ident is None:
                    thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; the prepare thread is woken only when it waits for this much work
        (its first row, or a full batch), not once per request."""
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"backbone worker {self.label} is stopped")
            self._inbox.append(job)
            self._inbox_rows += len(job.sub.inputs)
            wake = self._wake_at_rows
            if wake is not None and self._inbox_rows + len(self.scheduler) >= wake:
                self._wake_at_rows = None
                self._cond.notify_all()

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started; False if some of its rows are already computing."""
        with self._cond:
            if job.state == QUEUED:
                job.state = CANCELLED
                self._cancels += 1
                self._cond.notify_all()
                return True
            return job.state == CANCELLED

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end both threads (joined: no native thread outlives
        the interpreter)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)

    # -- prepare thread --------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        """Sleep until a batch can be made (the compute slot is free, and its rows are a full
        batch or the oldest has waited `max_wait`), or a queued request expires; then
        tokenise everything that arrived in one call, and hand over the next batch."""
        name_this_thread(PREPARE)
        self.backbone.tokenize_rows(["warm up"])  # builds the tokenizer copy before requests
        while True:
            with self._cond:
                while not self._work_due():
                    if self._stopping and not self._pending() and self._slot is None:
                        self._prepared_all = True
                        self._cond.notify_all()
                        return
                    self._cond.wait(self._sleep_s())
                new, self._inbox, self._inbox_rows = self._inbox, [], 0
            answers: list[tuple[ReplyTarget, Answer]] = []
            self._intake(new, answers)
            self._expire(answers)
            deliver_all(answers)
            with self._cond:
                ready = (
                    self._slot is None
                    and (self._cuda or not self._busy)
                    and self.scheduler.wait_s(time.monotonic(), self._stopping) == 0.0
                )
            if ready:
                self._prepare_batch()

    def _pending(self) -> bool:
        return bool(self._inbox) or bool(self.scheduler.rows)

    def _oldest(self) -> float | None:
        arrivals = [job.sub.admitted for job in self._inbox[:1]]
        arrivals += [row.item.job.sub.admitted for row in self.scheduler.rows[:1]]
        return min(arrivals, default=None)

    def _work_due(self) -> bool:
        """Called with the lock held; sets what should wake the thread if there is none."""
        now = time.monotonic()
        if self._next_expiry() <= now:
            return True
        if self._slot is not None or (self._busy and not self._cuda):
            # Wait for the compute thread to take the prepared batch. On a CPU the next batch
            # is only made once the current one is done: the cores that would prepare it
            # are the ones computing, and a batch made later takes more rows.
            self._wake_at_rows = None
            return False
        oldest = self._oldest()
        if oldest is None:
            self._wake_at_rows = 1
            return False
        rows = self._inbox_rows + len(self.scheduler)
        if rows >= self.scheduler.row_cap or self._stopping:
            return True
        if oldest + self.limits.max_wait_s <= now:
            return True
        self._wake_at_rows = self.scheduler.row_cap
        return False

    def _sleep_s(self) -> float | None:
        """How long to wait for a notify. A time already past counts as 0, not as no time:
        `_work_due` looked at the clock a moment earlier, and a batch that fell due in
        between must not wait for the next request or the queue timeout."""
        now = time.monotonic()
        waits = [self._next_expiry() - now]
        oldest = self._oldest()
        if oldest is not None and self._slot is None and (self._cuda or not self._busy):
            waits.append(oldest + self.limits.max_wait_s - now)
        waits = [max(0.0, w) for w in waits if w < 3600]
        return min(waits) if waits else None

    def _next_expiry(self) -> float:
        """When the first job that has not started passes its deadline."""
        deadlines = [job.sub.deadline for job in self._inbox if job.state == QUEUED]
        heap = self._deadlines
        while heap and heap[0][2].state != QUEUED:
            heapq.heappop(heap)
        if heap:
            deadlines.append(heap[0][0])
        return min(deadlines, default=float("inf"))

    def _intake(self, jobs: list[Job], answers: list[tuple[ReplyTarget, Answer]]) -> None:
        """Tokenise every new job's rows in one call per input format, and queue them."""
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.state == CANCELLED:
                continue
            if now > job.sub.deadline:
                answers.append((job.target, self._timeout(job)))
                continue
            live.append(job)
        groups: dict[tuple[int, str], list[Job]] = defaultdict(list)
        for job in live:
            spec = job.entry.config.input
            side = job.sub.truncation_side or spec.truncation_side  # a request may choose
            groups[(spec.max_length, side)].append(job)
        tokenizer = self.backbone.row_tokenizer()
        for (max_length, side), members in groups.items():
            key = tokenizer.key(max_length, side) if tokenizer is not None else None
            ours = []  # the jobs this thread tokenises; the front ends did the others
            for job in members:
                given = job.sub.tokens
                # Made under another key (or, a front end's bug, not one row per input).
                mismatch = job.sub.tokens_key != key or len(given or ()) != len(job.sub.inputs)
                if key is None or given is None or mismatch:
                    ours.append(job)
                else:  # made under this key: exactly the rows made here
                    job.rows = [TokenizedRow(ids, types, cut) for ids, types, cut in given]
            if ours:
                texts = [text for job in ours for text, _ in job.sub.inputs]
                pairs = [pair for job in ours for _, pair in job.sub.inputs]
                rows = self.backbone.tokenize_rows(
                    texts, pairs if any(p is not None for p in pairs) else None, max_length, side
                )
                at = 0
                for job in ours:
                    n = len(job.sub.inputs)
                    job.rows, at = rows[at : at + n], at + n
            if self._on_tokenized is not None:
                mine = sum(len(job.sub.inputs) for job in ours)
                self._on_tokenized(sum(len(job.sub.inputs) for job in members) - mine, mine)
            for job in members:
                n = len(job.sub.inputs)
                long = next((i for i, r in enumerate(job.rows) if r.truncated), None)
                if long is not None and not job.sub.truncate:
                    message = (
                        f"inputs.{long}: longer than model {job.entry.name!r}'s max_length of "
                        f"{max_length} tokens (special tokens included) and truncate is false"
                    )
                    answers.append((job.target, answer_error(job, protocol.TOO_LONG, message)))
                    continue
                job.results = [None] * n
                job.remaining = n
                heapq.heappush(self._deadlines, (job.sub.deadline, next(self._pushed), job))
                prompt = job.entry.config.prompt.length
                for i, tokens in enumerate(job.rows):
                    self.scheduler.add(
                        Row(job, i, tokens), len(tokens.input_ids) + prompt, job.sub.admitted
                    )

    def _expire(self, answers: list[tuple[ReplyTarget, Answer]]) -> None:
        """Drop rows of cancelled jobs; answer 503 to queued jobs past their deadline."""
        now = time.monotonic()
        expired: list[Job] = []
        heap = self._deadlines
        with self._cond:
            while heap and (heap[0][2].state != QUEUED or heap[0][0] < now):
                job = heapq.heappop(heap)[2]
                if job.state == QUEUED:
                    job.state = CANCELLED
                    self._cancels += 1
                    expired.append(job)
            cancels = self._cancels
        if cancels != self._cancels_dropped:
            self._cancels_dropped = cancels
            self.scheduler.drop(lambda row: row.job.state == CANCELLED)
        for job in expired:
            answers.append((job.target, self._timeout(job)))

    @staticmethod
    def _timeout(job: Job) -> Answer:
        waited = job.sub.deadline - job.sub.admitted
        return answer_error(
            job,
            protocol.QUEUE_TIMEOUT,
            f"the request waited more than {waited:g}s for compute",
        )

    def _prepare_batch(self) -> None:
        batch = self.scheduler.take()
        now = time.monotonic()
        with self._cond:
            for row in batch:
                job = row.job
                if job.state == QUEUED:
                    job.state = RUNNING
                    job.queue_s = now - job.sub.admitted
        batch = [row for row in batch if row.job.state == RUNNING]
        if not batch:
            return
        # Each model's rows in one run, in the pipeline's order: its groups are then
        # slices of the batch, not gathers.
        order = batch_order([row.job.entry.model for row in batch])
        batch = [batch[i] for i in order]
        encoded = self._collate(batch)
        with self._cond:
            self._slot = (batch, encoded)
            self._cond.notify_all()

    def _collate(self, batch: list[Row]) -> Encoded:
        encoded = self.backbone.collate([r.tokens for r in batch], "cpu")
        if self._cuda:
            # Pinned memory lets the copy overlap the batch the device is running now.
            pinned = Encoded(
                encoded.input_ids.pin_memory(),
                encoded.token_type_ids.pin_memory(),
                encoded.lengths.pin_memory(),
                encoded.truncated,
                encoded.host_lengths,
            )
            return pinned.to(self.backbone.device, non_blocking=True)
        return encoded

    # -- compute thread --------------------------------------------------------------------
    def _compute_loop(self) -> None:
        name_this_thread(COMPUTE)
        while True:
            with self._cond:
                while self._slot is None:
                    if self._prepared_all:
                        return
                    self._cond.wait()
                batch, encoded = self._slot
                self._slot = None
                self._busy = True
                self._cond.notify_all()  # the prepare thread may build the next batch now
            try:
                self._execute(batch, encoded)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            self._trimmer.maybe()

    def _execute(self, batch: list[Row], encoded: Encoded) -> None:
        start = time.perf_counter()
        try:
            outcomes = self._compute(batch, encoded)
        except Exception as exc:  # one bad batch fails its own requests, nothing else
            deliver_all(self._fail(batch, exc))
            return
        seconds = time.perf_counter() - start
        self._adapt(outcomes)
        jobs = {id(r.job): r.job for r in batch}
        answers: list[tuple[ReplyTarget, Answer]] = []
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
                job.sub.request_id, self.label, error,
            )  # fmt: skip
            with self._cond:
                job.state = CANCELLED
                self._cancels += 1
            message = (
                "an input does not fit in the server's memory even alone; shorten it "
                f"(request id {job.sub.request_id})"
            )
            answers.append((job.target, answer_error(job, protocol.OUT_OF_MEMORY, message)))
        for job in jobs.values():
            job.compute_s += seconds
            if job.remaining == 0 and job.state != CANCELLED:
                with self._cond:
                    job.state = DONE
                answers.append((job.target, self._answer(job)))
        deliver_all(answers)

    @staticmethod
    def _answer(job: Job) -> Answer:
        rows = [
            RowAnswer(
                r.probs,
                r.prompt_length,
                r.tokens_before,
                r.pool_weights,
                t.truncated,
                len(t.input_ids),
            )
            for r, t in zip(job.results, job.rows, strict=True)
            if r is not None
        ]
        entry = job.entry
        return Answer(
            job.sub.ticket, entry.name, entry.labels, rows, None, "", job.queue_s, job.compute_s
        )

    def _compute(self, batch: list[Row], encoded: Encoded) -> list[RowResult | BaseException]:
        """Results in batch order; a batch out of memory is split in halves and retried.

        A row out of memory alone comes back as its exception; other errors propagate.
        """
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            results, stats = classify_rows(
                self.backbone, [r.job.entry.model for r in batch], encoded
            )
        except OUT_OF_MEMORY as exc:
            exc.with_traceback(None)  # drop the failed forward's frames and tensors
            del encoded
            if self._cuda:
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [exc]
            self._lower_cap(len(batch))
            half = len(batch) // 2
            first, second = batch[:half], batch[half:]
            return self._compute(first, self._collate(first)) + self._compute(
                second, self._collate(second)
            )
        seconds = time.perf_counter() - start
        if self._costs is not None:
            self._costs.observe(stats.padded_tokens, seconds)
            budget = self._costs.break_even_tokens(self.limits.max_batch_tokens)
            if budget is not None:
                self._set_padding_budget(budget)
        if self._on_batch is not None:
            models = len({id(r.job.entry.model) for r in batch})
            self._on_batch(
                self.label,
                seconds,
                time.thread_time() - cpu,
                stats.rows,
                stats.padded_tokens,
                stats.real_tokens,
                models,
            )
        return list(results)

    def _set_padding_budget(self, budget: int) -> None:
        """Logged when it first settles, then at most once a minute when it has halved or
        doubled since."""
        logged, now = self._logged_budget, time.monotonic()
        moved = logged is not None and not logged / 2 <= budget <= logged * 2 + 1
        if logged is None or (moved and now - self._logged_at >= 60.0):
            self._logged_budget, self._logged_at = budget, now
            log.info(
                "backbone %s: a batch may carry %d padded tokens past the padding tolerance "
                "(as much as one more batch costs, measured over the last batches)",
                self.label, budget,
            )  # fmt: skip
        self.scheduler.padding_budget = budget

    def _lower_cap(self, failed_rows: int) -> None:
        cap = max(1, failed_rows // 2)
        if cap < self.scheduler.row_cap:
            log.warning(
                "out of memory with %d rows on backbone %s: batches now hold at most %d rows",
                failed_rows, self.label, cap,
            )  # fmt: skip
            self.scheduler.row_cap = cap
        self._clean_batches = 0

    def _adapt(self, outcomes: list[RowResult | BaseException]) -> None:
        scheduler = self.scheduler
        if any(isinstance(o, BaseException) for o in outcomes) or scheduler.row_cap >= (
            self.limits.max_batch_size
        ):
            return
        self._clean_batches += 1
        if self._clean_batches >= CAP_RECOVERY_BATCHES:
            self._clean_batches = 0
            scheduler.row_cap += 1

    def _fail(self, batch: list[Row], exc: BaseException) -> list[tuple[ReplyTarget, Answer]]:
        jobs = {id(r.job): r.job for r in batch}
        ids = ", ".join(job.sub.request_id for job in jobs.values())
        log.error(
            "batch failed on backbone %s (%d rows; request ids %s): %s",
            self.label, len(batch), ids, exc, exc_info=exc,
        )  # fmt: skip
        answers = []
        for job in jobs.values():
            with self._cond:
                job.state = CANCELLED  # its rows still queued elsewhere are dropped
                self._cancels += 1
            message = f"internal error; quote request id {job.sub.request_id} when reporting it"
            answers.append((job.target, answer_error(job, protocol.INTERNAL, message)))
        return answers
