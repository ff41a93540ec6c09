"""What happens to a request between HTTP and a backbone worker.

`admit` decides before any tokenisation (429 when `max_queue_requests` requests
are already in flight, 503 while loading or draining); `run` tokenises in a
thread pool, submits one `Job` to the model's worker, and waits for it, for the
queue timeout, or for the client to go away, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynprompt.models.backbone import TokenizedRow
from dynprompt.models.inference import RowResult
from dynprompt.service import errors
from dynprompt.service.batcher import BatchFailed, Job, RowTooLarge
from dynprompt.service.config import DEFAULT_REPOSITORY, Settings
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.registry import ModelEntry, Registry, ReloadReport, find_checkpoints

log = logging.getLogger("dynprompt.service")

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


@dataclass
class Outcome:
    rows: list[TokenizedRow]
    results: list[RowResult]
    queue_s: float
    compute_s: float


def _tokenize(
    entry: ModelEntry, inputs: list[tuple[str, str | None]], truncate: bool
) -> list[TokenizedRow]:
    backbone = entry.model.backbone
    spec = entry.config.input
    rows = []
    for i, (text, pair) in enumerate(inputs):
        row = backbone.tokenize_row(text, pair, spec.max_length, spec.truncation_side)
        if row.truncated and not truncate:
            raise errors.unprocessable(
                f"inputs.{i}: longer than model {entry.name!r}'s max_length of {spec.max_length} "
                "tokens (special tokens included) and truncate is false",
                "input_too_long",
            )
        rows.append(row)
    return rows


def _retrieve(future: asyncio.Future[list[RowResult]]) -> None:
    """Mark a late failure as seen, so an abandoned job logs no 'never retrieved' warning."""
    if not future.cancelled():
        future.exception()


class Engine:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, registry: Registry) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.state = LOADING
        self.inflight = 0
        self.failure: str | None = None
        self.root: Path | None = None  # the repository actually served
        self._reloading: asyncio.Lock | None = None
        self.pool = ThreadPoolExecutor(settings.tokenizer_threads, "dynprompt-tokenize")

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, root: Path, on_fatal: Callable[[str], None] | None = None) -> None:
        """Load, warm and activate the repository off the event loop; READY when done."""
        try:
            await asyncio.to_thread(self._load, root)
        except Exception as exc:
            self.state, self.failure = FAILED, f"{type(exc).__name__}: {exc}"
            hint = (
                ""
                if self.settings.model_repository is not None
                else " (the shipped default model; serve another with --model-repository DIR)"
            )
            log.error("cannot serve the model repository %s%s: %s", root, hint, exc)
            if on_fatal is not None:
                on_fatal(self.failure)
            return
        if self.state == LOADING:
            self.state = READY
            names = ", ".join(self.registry.current.names)
            log.info("ready: serving %d models (%s)", len(self.registry.current.models), names)

    def _load(self, root: Path) -> None:
        start = time.perf_counter()
        if root.is_dir() and not find_checkpoints(root) and root != DEFAULT_REPOSITORY:
            # An empty mounted volume (docker compose's default ./models) should still give a
            # working server: serve the shipped model, and say so loudly.
            log.warning(
                "the model repository %s holds no checkpoints; serving the shipped default "
                "model from %s instead",
                root, DEFAULT_REPOSITORY,
            )  # fmt: skip
            root = DEFAULT_REPOSITORY
        self.root = root
        models = self.registry.load(root)
        self.registry.warm(models)
        self.registry.activate(models)
        device = self.registry.device
        if device.startswith("cuda"):
            self.metrics.track_gpu_memory(lambda: float(torch.cuda.memory_allocated(device)))
        log.info("loaded the model repository %s in %.1fs", root, time.perf_counter() - start)

    async def reload(self) -> ReloadReport:
        """Rescan the repository (admin endpoint, SIGHUP); one reload at a time."""
        if self.state != READY or self.root is None:
            raise errors.unavailable("not_ready", "models are not being served; cannot reload")
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            root = self.root
            try:
                return await asyncio.to_thread(self.registry.reload, root)
            except Exception as exc:  # the repository itself is unreadable: keep serving
                log.error("reload of %s failed; still serving the previous set: %s", root, exc)
                raise errors.ServiceError(
                    409, "reload_failed", f"cannot rescan the model repository: {exc}"
                ) from exc

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, wait for what is in flight; True if everything finished."""
        if self.state != FAILED:
            self.state = DRAINING
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.inflight == 0

    async def close(self) -> None:
        await asyncio.to_thread(self.registry.stop, 10.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- admission ---------------------------------------------------------------------
    def check_serving(self) -> None:
        if self.state == READY:
            return
        if self.state == DRAINING:
            raise errors.unavailable("draining", "the server is shutting down")
        if self.state == FAILED:
            raise errors.unavailable("not_ready", "the server failed to load its models")
        raise errors.unavailable("not_ready", "models are still loading", retry_after_s=1)

    def admit(self) -> None:
        self.check_serving()
        if self.inflight >= self.settings.max_queue_requests:
            raise errors.queue_full(retry_after_s=1)
        self.inflight += 1
        self.metrics.queue_depth.set(self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self.metrics.queue_depth.set(self.inflight)

    # -- one request -------------------------------------------------------------------
    async def run(
        self,
        entry: ModelEntry,
        inputs: list[tuple[str, str | None]],
        truncate: bool,
        request_id: str,
        client_gone: Callable[[], Awaitable[None]],
    ) -> Outcome:
        """Tokenise, batch, compute. Call between `admit` and `release`."""
        loop = asyncio.get_running_loop()
        admitted = time.monotonic()
        rows = await loop.run_in_executor(self.pool, _tokenize, entry, inputs, truncate)
        future: asyncio.Future[list[RowResult]] = loop.create_future()
        future.add_done_callback(_retrieve)
        job = Job(request_id, entry.model, rows, loop, future, admitted_at=admitted)
        entry.worker.submit(job)
        watcher = asyncio.ensure_future(client_gone())
        waiting: set[asyncio.Future[Any]] = {future, watcher}
        try:
            left = admitted + self.settings.queue_timeout_s - time.monotonic()
            done, _ = await asyncio.wait(
                waiting, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                if entry.worker.cancel(job):
                    raise errors.unavailable(
                        "queue_timeout",
                        f"the request waited more than {self.settings.queue_timeout_s:g}s "
                        "for compute",
                        retry_after_s=1,
                    )
                # Some rows are computing already: the answer is close, wait for it.
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if future not in done:
                entry.worker.cancel(job)
                raise errors.ServiceError(499, "client_closed_request", "the client went away")
        finally:
            watcher.cancel()
        try:
            results = future.result()
        except RowTooLarge as exc:
            raise errors.unavailable(
                "out_of_memory",
                f"an input does not fit in the server's memory even alone; shorten it "
                f"(request id {request_id})",
            ) from exc
        except BatchFailed as exc:
            raise errors.internal(request_id) from exc
        return Outcome(rows, results, job.queue_s, job.compute_s)
