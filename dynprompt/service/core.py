"""The engine core: the served model set, one batch pipeline per backbone, the metrics.

Front ends (`Engine`, one per HTTP process) hand it `Submission`s; it checks each
against the served set, queues it on its backbone's worker, and sends the
`Answer` to the submission's reply target. It owns the metrics registry, so every
count is kept once however many front ends there are: front ends send it one
`Record` per finished request. It runs in the HTTP process (`--workers 1`) or in
a process of its own behind a local socket (`transport`), with the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynprompt import __version__
from dynprompt.service import protocol, repository
from dynprompt.service.config import DEFAULT_REPOSITORY, Settings
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.protocol import Answer, CoreError, Record, Submission
from dynprompt.service.registry import (
    BackboneLoader,
    ModelEntry,
    Registry,
    ReloadReport,
    RepositoryError,
    nothing_served,
)
from dynprompt.service.scheduler import BatchLimits
from dynprompt.service.threadnames import POLL, name_this_thread
from dynprompt.service.worker import BackboneWorker, Job, ReplyTarget

log = logging.getLogger("dynprompt.service")

LOADING, READY, FAILED = "loading", "ready", "failed"


def backbone_loader(settings: Settings) -> BackboneLoader:
    """`load_backbone`, or the ONNX Runtime backbone for `--backend onnx` (imported lazily)."""
    from dynprompt.models.backbone import Backbone, load_backbone

    if settings.backend == "torch":
        return load_backbone

    def load_onnx(name: str, device: str, dtype: torch.dtype) -> Backbone:
        try:
            from dynprompt.models.onnx_export import load_onnx_backbone
        except ImportError as exc:
            raise RuntimeError(f"--backend onnx is not available here: {exc}") from exc
        cache = str(settings.onnx_cache_dir) if settings.onnx_cache_dir is not None else None
        backbone: Backbone = load_onnx_backbone(
            name, device, dtype, cache_dir=cache, intra_op_threads=settings.threads
        )
        return backbone

    return load_onnx


class _Target:
    """A front end's reply target, forgetting each job once it is answered."""

    def __init__(self, target: ReplyTarget, jobs: dict[tuple[int, int], Any]) -> None:
        self.target = target
        self.jobs = jobs

    def deliver(self, answers: list[Answer]) -> None:
        key = id(self)
        for answer in answers:
            self.jobs.pop((key, answer.ticket), None)
        self.target.deliver(answers)


class EngineCore:
    def __init__(
        self,
        settings: Settings,
        loader: BackboneLoader,
        queue_depth: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        if queue_depth is not None:
            self.metrics.queue_depth.set_function(queue_depth)
        limits = BatchLimits(
            settings.max_batch_size,
            settings.max_batch_tokens,
            settings.max_wait_ms / 1000.0,
            settings.padding_tolerance,
            settings.padding_budget_tokens,
        )
        self.registry = Registry(
            loader, settings.resolved_device(), settings.torch_dtype, limits, self.metrics
        )
        # What every model card says about how it runs.
        self.runtime = {
            "backend": settings.backend,
            "device": self.registry.device,
            "dtype": settings.dtype,
        }
        self.metrics.set_build_info(__version__, **self.runtime)
        self.state = LOADING
        self.failure: str | None = None
        self.root: Path | None = None  # the configured repository: every rescan reads it
        self.fallback = False  # serving the shipped default model while `root` is empty
        self._jobs: dict[tuple[int, int], tuple[Job, BackboneWorker]] = {}
        self._targets: dict[int, _Target] = {}
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._seen: dict[str, repository.Stats] = {}  # the last poll's view of the repository
        self._settled: dict[str, repository.Stats | None] = {}  # ... at the last rescan
        self._poll_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def load(self, root: Path) -> None:
        """Load, warm and serve the repository (blocking); FAILED, and re-raised, if nothing
        can be served.

        It is the same rescan as `reload`: each checkpoint loads on its own and a bad one
        is refused with its reason while the rest serve. A repository with nothing in it
        (docker compose's empty ./models) serves the shipped default model meanwhile, and
        every reload keeps looking at `root`.
        """
        start = time.perf_counter()
        self.root = root
        try:
            target = root
            if repository.scan(root).empty and root != DEFAULT_REPOSITORY:
                log.warning(
                    "the model repository %s holds no checkpoints; serving the shipped default "
                    "model from %s until a reload finds some there",
                    root, DEFAULT_REPOSITORY,
                )  # fmt: skip
                target, self.fallback = DEFAULT_REPOSITORY, True
            with self._reload_lock:
                report = self.registry.reload(target)
                self._settle(repository.survey(root), frozenset())
            if not self.registry.current.models:
                raise RepositoryError(nothing_served(target, report))
        except Exception as exc:
            self.state, self.failure = FAILED, f"{type(exc).__name__}: {exc}"
            raise
        device = self.registry.device
        if device.startswith("cuda"):
            self.metrics.track_gpu_memory(lambda: float(torch.cuda.memory_allocated(device)))
        self.state = READY
        entries = self.registry.current.entries()
        log.info("loaded the model repository %s in %.1fs", target, time.perf_counter() - start)
        log.info(
            "ready: serving %d models (%s)%s",
            len(self.registry.current.models), ", ".join(sorted(e.label for e in entries)),
            f"; {len(report.refused)} checkpoints refused" if report.refused else "",
        )  # fmt: skip
        if self.settings.poll_s is not None and self._poller is None:
            self._poller = threading.Thread(
                target=self._poll_loop, args=(self.settings.poll_s,), name="dynprompt-poll",
                daemon=True,
            )  # fmt: skip
            self._poller.start()

    def reload(self) -> ReloadReport:
        """Rescan the configured repository (admin endpoint, SIGHUP); one rescan at a time."""
        if self.state != READY or self.root is None:
            raise RuntimeError("models are not being served; cannot reload")
        with self._reload_lock:
            return self._rescan(repository.survey(self.root), frozenset())

    def _rescan(self, seen: dict[str, repository.Stats], skip: frozenset[str]) -> ReloadReport:
        """Reload from the configured repository (caller holds the reload lock); while the
        shipped default model stands in for an empty repository, keep it until the
        repository has something that loads."""
        assert self.root is not None
        root = self.root
        if self.fallback and repository.scan(root).empty:
            served = sorted(e.label for e in self.registry.current.entries())
            report = ReloadReport(unchanged=served, kept=True)
            report.refused[str(root)] = (
                "the model repository holds no checkpoints; still serving the shipped default "
                f"model from {DEFAULT_REPOSITORY}"
            )
            log.warning("reload: the model repository %s still holds no checkpoints", root)
        else:
            report = self.registry.reload(root, skip, fresh=self.fallback)
            if self.fallback and not report.kept and self.registry.current.models:
                self.fallback = False
                log.info("the model repository %s now serves its own checkpoints", root)
        self._settle(seen, skip)
        return report

    def _settle(self, seen: dict[str, repository.Stats], skip: frozenset[str]) -> None:
        """Remember what the repository looked like at this rescan; folders skipped as still
        being written are remembered as unsettled, so that a later poll loads them."""
        self._seen = dict(seen)
        self._settled = {path: None if path in skip else stats for path, stats in seen.items()}

    # -- polling (--poll-s) ----------------------------------------------------------------
    def _poll_loop(self, period: float) -> None:
        name_this_thread(POLL)
        while not self._stop.wait(period):
            try:
                self.poll_once()
            except Exception as exc:  # a vanished mount, a bug: say it once, keep serving
                message = f"{type(exc).__name__}: {exc}"
                if message != self._poll_error:
                    log.error("polling the model repository %s failed: %s", self.root, message)
                self._poll_error = message
            else:
                self._poll_error = None

    def poll_once(self) -> ReloadReport | None:
        """One poll: rescan when the repository changed since the last rescan; None if it
        did not, or if everything that changed is still changing.

        Only `stat` is read here (no file is opened). A folder whose files differ from the
        previous poll is still being written: it keeps what it served and waits for a
        poll that sees it unchanged.
        """
        if self.state != READY or self.root is None:
            return None
        with self._reload_lock:
            seen = repository.survey(self.root)
            previous, self._seen = self._seen, seen
            if seen == self._settled:
                return None
            changing = frozenset(
                path for path, stats in seen.items() if previous.get(path) != stats
            )
            differs = {
                p for p in seen.keys() | self._settled.keys() if seen.get(p) != self._settled.get(p)
            }
            if differs <= changing:
                return None  # everything that changed is still changing: look again next time
            report = self._rescan(seen, changing)
        log.info("poll: the model repository %s changed; rescanned it", self.root)
        return report

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
        self.registry.stop(timeout)

    # -- requests ------------------------------------------------------------------------
    def submit(self, sub: Submission, target: ReplyTarget) -> None:
        """Check a submission against the served set and queue it (or answer its error)."""
        wrapper = self._targets.get(id(target))
        if wrapper is None:
            wrapper = self._targets[id(target)] = _Target(target, self._jobs)
        entry = self._admit(sub)
        if isinstance(entry, Answer):
            wrapper.deliver([entry])
            return
        job = Job(sub, entry, wrapper)
        self._jobs[(id(wrapper), sub.ticket)] = (job, entry.worker)
        entry.worker.submit(job)

    def _admit(self, sub: Submission) -> ModelEntry | Answer:
        """The served model entry this submission runs on, or the answer refusing it.

        A submission without a model name runs on the only served model; with several
        served, which one is meant cannot be guessed, so it is refused (422).
        """
        if self.state != READY:
            message = (
                "models are still loading"
                if self.state == LOADING
                else "the server failed to load its models"
            )
            return Answer(sub.ticket, None, [], [], protocol.NOT_READY, message)
        served = self.registry.current
        name = sub.model
        if name is None:
            names = served.names
            if len(names) != 1:
                listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                message = f"model is required: {len(names)} models are served" + (
                    f" ({listed})" if names else ""
                )
                return Answer(sub.ticket, None, [], [], protocol.INVALID, message)
            name = names[0]
        entry = served.get(name, sub.version)
        if entry is None:
            shown = name if len(name) <= 80 else name[:77] + "..."
            versions = list(served.versions.get(name, {}))
            if versions:
                listed = ", ".join(str(v) for v in versions[-20:])
                message = f"model {shown!r} has no version {sub.version}; served versions: {listed}"
            else:
                names = served.names
                listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                message = f"no model named {shown!r}; loaded: {listed or 'none'}"
            return Answer(sub.ticket, None, [], [], protocol.NOT_FOUND, message)
        limit = self.settings.max_input_chars
        for i, (text, pair) in enumerate(sub.inputs):
            if (pair is not None) != entry.takes_pairs:
                want = "{text, text_pair} objects" if entry.takes_pairs else "single texts"
                message = f"inputs.{i}: model {entry.name!r} takes {want}"
                return Answer(sub.ticket, entry.name, entry.labels, [], protocol.INVALID, message)
            longest = max(len(text), len(pair or ""))
            if limit is not None and longest > limit:
                message = f"inputs.{i}: {longest} characters; at most {limit} per text"
                return Answer(sub.ticket, entry.name, entry.labels, [], protocol.TOO_LARGE, message)
        return entry

    def cancel(self, target: ReplyTarget, ticket: int) -> None:
        """The client went away: drop the job's rows that have not started."""
        wrapper = self._targets.get(id(target))
        found = self._jobs.pop((id(wrapper), ticket), None) if wrapper is not None else None
        if found is not None:
            job, worker = found
            worker.cancel(job)

    def forget(self, target: ReplyTarget) -> int:
        """A front end is gone (its process exited): drop its rows that have not started.
        Returns how many of its requests were still queued or running."""
        wrapper = self._targets.pop(id(target), None)
        if wrapper is None:
            return 0
        key = id(wrapper)
        mine = [k for k in list(self._jobs) if k[0] == key]
        for k in mine:
            found = self._jobs.pop(k, None)
            if found is not None:
                job, worker = found
                worker.cancel(job)
        return len(mine)

    def record(self, records: list[Record]) -> None:
        served = self.registry.current.models
        for record in records:
            self.metrics.observe_request(record, record.model in served)

    # -- control calls ---------------------------------------------------------------------
    CALLS = frozenset(
        {"status", "models", "model", "model_names", "reload", "render_metrics", "input_specs"}
    )

    def call(self, method: str, *args: Any) -> Any:
        """A front end's control call by name; expected refusals raise `CoreError`."""
        if method not in self.CALLS:
            raise CoreError("bad_call", f"unknown core call {method!r}")
        if method != "reload":
            return getattr(self, method)(*args)
        try:
            return self.reload().as_dict()
        except RuntimeError as exc:
            raise CoreError("not_ready", str(exc)) from exc
        except Exception as exc:  # the repository itself is unreadable: keep serving
            log.error("reload of %s failed; still serving the previous set: %s", self.root, exc)
            raise CoreError("reload_failed", f"cannot rescan the model repository: {exc}") from exc

    # -- reads -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        current = self.registry.current
        return {
            "state": self.state,
            "models": len(current.models),
            "versions": len(current.entries()),
            "failure": self.failure,
            "serving_default": self.fallback,
        }

    def models(self) -> list[dict[str, Any]]:
        """One card per model name: its newest version, with every served version listed."""
        current = self.registry.current
        return [current.card(current.models[name], self.runtime) for name in current.names]

    def model(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        current = self.registry.current
        entry = current.get(name, version)
        return current.card(entry, self.runtime) if entry is not None else None

    def model_names(self) -> list[str]:
        return self.registry.current.names

    def input_specs(self, known: list[str]) -> dict[str, Any]:
        """How each served model (its newest version) tokenises, for front ends that tokenise
        their own requests (`service.pretokenize`), with the tokenizers they lack (`known`:
        the identities of those they hold). A model with a slow tokenizer is left out."""
        models: dict[str, tuple[str, int, str, bool]] = {}
        tokenizers: dict[str, Any] = {}
        for name, entry in self.registry.current.models.items():
            rows = entry.worker.backbone.row_tokenizer()
            if rows is None:
                continue
            spec = entry.config.input
            models[name] = (rows.identity, spec.max_length, spec.truncation_side, entry.takes_pairs)
            if rows.identity not in known:
                tokenizers[rows.identity] = rows.to_wire()
        return {"models": models, "tokenizers": tokenizers}

    def render_metrics(self) -> bytes:
        return self.metrics.render()
