"""`Engine.classify`: the one way a classify request enters the service.

An `Engine` lives in each HTTP process. It takes the admission permit (429 when
the queue shared by every HTTP process is full, 503 while draining), submits the
request to the engine core (in this process or behind a local socket), waits for
the answer, the queue deadline or the client's departure, and turns the answer into
a domain result or a `ServiceError`. `observe` wraps a request from its first
byte to its last and records it — metrics and the access log line — in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from dynprompt.service import errors, protocol
from dynprompt.service.config import Settings
from dynprompt.service.logs import AccessLog
from dynprompt.service.pretokenize import Pretokenizer
from dynprompt.service.protocol import (
    Answer,
    CoreError,
    Observation,
    Record,
    RowAnswer,
    Submission,
)

log = logging.getLogger("dynprompt.service")


class CoreHandle(Protocol):
    """The engine core as a front end sees it (`transport.LocalCore` or `RemoteCore`)."""

    def submit(self, sub: Submission) -> asyncio.Future[Answer]: ...

    def cancel(self, ticket: int) -> None: ...

    def record(self, record: Record) -> None: ...

    async def call(self, method: str, *args: Any) -> Any: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SharedCounts:
    """Requests admitted now, one slot per HTTP process, in shared memory (`--workers N`).

    Each slot has one writer, its process; only admitting (read every slot, then add to
    one's own) must exclude the other processes, and that takes `flock` on `lock_path`.
    The kernel releases a flock when its holder dies, where a semaphore (a
    `multiprocessing.Lock`) held by a killed process would stay taken and freeze every
    other process's admission for good. A dead process's slot is zeroed by the
    supervisor (`free`), so its permits come back too.
    """

    counts: Any  # multiprocessing.RawArray("i", workers)
    lock_path: str

    @classmethod
    def create(cls, context: Any, workers: int, folder: str) -> SharedCounts:
        path = os.path.join(folder, "admission.lock")
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        return cls(context.RawArray("i", workers), path)

    def total(self) -> int:
        return sum(self.counts)

    def free(self, slot: int) -> None:
        """Slot `slot`'s process has exited: the requests it admitted are not in flight."""
        self.counts[slot] = 0


class Admission:
    """Requests admitted at once, across every HTTP process; beyond `limit`, 429.

    One process counts in a plain integer (only its event loop touches it); several
    share `SharedCounts`, so the limit holds for the server as a whole.
    """

    def __init__(self, limit: int, shared: SharedCounts | None = None, slot: int = 0) -> None:
        self.limit = limit
        self._shared = shared
        self._slot = slot
        self._count = 0
        self._lock_fd = os.open(shared.lock_path, os.O_RDWR) if shared is not None else -1

    def try_acquire(self) -> bool:
        if self._shared is None:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True
        counts = self._shared.counts
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if sum(counts) >= self.limit:
                return False
            counts[self._slot] += 1
            return True
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._shared is None:
            self._count -= 1
        else:  # only this process writes its slot, and a lower count cannot overshoot
            self._shared.counts[self._slot] -= 1

    def value(self) -> float:
        return float(self._count if self._shared is None else self._shared.total())


@dataclass(frozen=True)
class ClassifyCall:
    model: str | None  # None: the only served model
    inputs: list[tuple[str, str | None]]
    truncate: bool = True
    version: int | None = None
    truncation_side: str | None = None  # None: the model's own


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    labels: list[str]
    rows: list[RowAnswer]


class _Unconnected:
    """The core before the app's lifespan has connected to it."""

    def __getattr__(self, name: str) -> Any:
        raise errors.unavailable("not_ready", "the server is starting", retry_after_s=1)


def error_for(answer: Answer) -> errors.ServiceError:
    kind = answer.error or protocol.INTERNAL
    retry = 1 if kind in (protocol.QUEUE_TIMEOUT, protocol.NOT_READY) else None
    status = protocol.STATUS.get(kind, 500)
    if status == 503:
        return errors.unavailable(kind, answer.message, retry_after_s=retry)
    return errors.ServiceError(status, kind, answer.message)


class Engine:
    def __init__(
        self, settings: Settings, admission: Admission, core: CoreHandle | None = None
    ) -> None:
        self.settings = settings
        self.core: CoreHandle = core if core is not None else _Unconnected()
        self.admission = admission
        # Set in the HTTP processes of `--workers N`: they tokenise, not the engine core.
        self.pretokenizer: Pretokenizer | None = None
        self.access_log = AccessLog()
        self.draining = False
        self.inflight = 0  # admitted in this process
        self._tickets = itertools.count(1)

    # -- one request -------------------------------------------------------------------
    @contextmanager
    def observe(self, request_id: str, method: str, path: str) -> Iterator[Observation]:
        """A classify request's record, kept while it is served, recorded once at the end:
        `requests_total`, durations and router decisions (by the core, which owns the
        metrics), and the access log line."""
        obs = Observation(request_id, time.perf_counter())
        try:
            yield obs
        finally:
            seconds = time.perf_counter() - obs.started
            decisions = (
                [(r.input_tokens, r.prompt_length, r.tokens_before) for r in obs.answers]
                if obs.status == 200
                else []
            )
            self.core.record(Record(obs.model, obs.status, seconds, obs.queue_s, decisions))
            self.access_log.request(obs, method, path, seconds)

    @contextmanager
    def permit(self) -> Iterator[None]:
        """Admission: taken once per request, before any work is done for it."""
        if self.draining:
            raise errors.unavailable("draining", "the server is shutting down")
        if not self.admission.try_acquire():
            raise errors.queue_full(retry_after_s=1)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self.admission.release()

    async def classify(
        self,
        call: ClassifyCall,
        obs: Observation,
        on_gone: Callable[[Callable[[], None]], None] | None = None,
    ) -> ClassifyResult:
        """Admit, submit, wait; the answer or its error. Fills `obs` as it goes. `on_gone`
        registers a callback for the client going away (`connections.on_client_gone`)."""
        obs.model, obs.rows = call.model, len(call.inputs)
        with self.permit():
            ticket = next(self._tickets)
            now = time.monotonic()
            made = (
                await self.pretokenizer.tokens(call.model, call.inputs, call.truncation_side)
                if self.pretokenizer is not None
                else None
            )
            tokens, key = made if made is not None else (None, None)
            sub = Submission(
                ticket,
                obs.request_id,
                call.model,
                call.inputs,
                call.truncate,
                now,
                now + self.settings.queue_timeout_s,
                call.version,
                call.truncation_side,
                tokens,
                key,
            )
            answer = await self._wait(self.core.submit(sub), ticket, on_gone)
        obs.model, obs.queue_s, obs.compute_s = answer.model, answer.queue_s, answer.compute_s
        if answer.error is not None:
            raise error_for(answer)
        assert answer.model is not None
        obs.answers = answer.rows
        return ClassifyResult(answer.model, answer.labels, answer.rows)

    async def _wait(
        self,
        future: asyncio.Future[Answer],
        ticket: int,
        on_gone: Callable[[Callable[[], None]], None] | None,
    ) -> Answer:
        """The answer, or 499 once the client has gone away (`on_gone` calls back then:
        its rows are dropped, if they have not started)."""
        if on_gone is not None:

            def gone() -> None:
                if not future.done():
                    self.core.cancel(ticket)
                    future.set_exception(
                        errors.ServiceError(499, "client_closed_request", "the client went away")
                    )

            on_gone(gone)
        return await future

    # -- the rest of the API -------------------------------------------------------------
    async def ready(self) -> int:
        """The number of served models; 503 while loading, failed or draining."""
        if self.draining:
            raise errors.unavailable("draining", "the server is shutting down")
        status = await self.core.call("status")
        if status["state"] == "ready" and status["models"] > 0:
            return int(status["models"])
        if status["state"] == "loading":
            raise errors.unavailable("not_ready", "models are still loading", retry_after_s=1)
        if status["state"] == "ready":
            raise errors.unavailable("not_ready", "no model is being served")
        raise errors.unavailable("not_ready", "the server failed to load its models")

    async def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.core.call("models")
        return result

    async def model(self, name: str) -> dict[str, Any]:
        card = await self.core.call("model", name)
        if card is None:
            raise errors.not_found(name, await self.core.call("model_names"))
        return dict(card)

    async def reload(self) -> dict[str, Any]:
        try:
            report: dict[str, Any] = await self.core.call("reload")
        except CoreError as exc:
            if exc.kind == "not_ready":
                raise errors.unavailable("not_ready", exc.message) from exc
            raise errors.ServiceError(409, "reload_failed", exc.message) from exc
        if self.pretokenizer is not None:  # tokenise for the new models from now on
            with contextlib.suppress(CoreError):  # else the periodic refresh tries again
                await self.pretokenizer.refresh(self.core)
        return report

    async def metrics(self) -> bytes:
        rendered: bytes = await self.core.call("render_metrics")
        return rendered

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, wait for what this process admitted; True if all of it finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.inflight == 0
