"""The served models: checkpoints loaded over shared backbones, by name and version.

Backbones are cached by `(name_or_path, device, dtype)`, so every checkpoint
trained on the same backbone runs on one instance and one `BackboneWorker`
(a `finetune` checkpoint owns a private copy, hence its own worker). What the
server serves is one immutable `ModelSet`; a reload builds a new set and swaps it
in whole, and a request keeps the entry it started with.

Start-up and reload are the same code (`Registry.reload`): every checkpoint loads
on its own, a bad one is refused with its reason and never displaces what is
served, and a rescan that would serve nothing keeps the served set. Workers and
backbones live exactly as long as the served set uses them: after a swap, the
ones it no longer uses finish their queued work, stop their threads and are freed
(with the allocator's free pages given back to the system).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from dynprompt.models.backbone import Backbone
from dynprompt.models.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, read_config
from dynprompt.models.config import DynPromptConfig
from dynprompt.models.inference import classify_rows
from dynprompt.models.model import DynPromptModel
from dynprompt.service import repository
from dynprompt.service.memory import release_memory
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.repository import Candidate, Files, RepositoryError, find_checkpoints
from dynprompt.service.scheduler import BatchLimits
from dynprompt.service.worker import BackboneWorker

__all__ = [
    "EMPTY",
    "BackboneLoader",
    "ModelEntry",
    "ModelSet",
    "Registry",
    "ReloadReport",
    "RepositoryError",
    "find_checkpoints",
]

log = logging.getLogger("dynprompt.service.registry")

BackboneLoader = Callable[[str, str, torch.dtype], Backbone]
WARMUP_TEXTS = (
    "a warm-up sentence.",
    "an unremarkable and somewhat longer sentence that warms the server up.",
)
# A retired worker keeps running this long after the swap before it stops taking jobs:
# a request that looked its model up just before the swap still reaches a live worker.
RETIRE_GRACE_S = 2.0
# How long a retired worker may take to finish the jobs it had queued.
RETIRE_TIMEOUT_S = 60.0


@dataclass(frozen=True, eq=False)
class ModelEntry:
    name: str
    path: Path
    version: str  # weights checksum
    model: DynPromptModel
    worker: BackboneWorker
    loaded_at: float = field(default_factory=time.time)  # Unix time
    model_version: int = 1  # the numbered folder (1 for an unversioned one)
    label: str = ""  # how reload reports name it: "sst2", or "sst2/2" for a numbered folder
    files: Files | None = None  # what was read, to recognise an unchanged checkpoint

    @property
    def config(self) -> DynPromptConfig:
        return self.model.config

    @property
    def labels(self) -> list[str]:
        return list(self.config.head.labels)

    @property
    def takes_pairs(self) -> bool:
        return self.config.input.pair_field is not None

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.model_version

    def card(
        self, versions: Sequence[int] = (), runtime: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        config = self.config
        training = config.training
        return {
            "name": self.name,
            "labels": self.labels,
            "variant": config.variant,
            "prompt_length": config.prompt.length,
            "pool_size": config.prompt.pool_size,
            "router_feature": config.router.feature if config.uses_router_features else None,
            "backbone": config.backbone.name_or_path,
            "version": self.version,
            "model_version": self.model_version,
            "versions": list(versions) or [self.model_version],
            "loaded_at": dt.datetime.fromtimestamp(self.loaded_at, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "metrics": dict(training.metrics),
            "training_data": training.data
            if isinstance(training.data, str)
            else "; ".join(training.data),
            "train_examples": getattr(training, "train_examples", None),
            "dev_examples": getattr(training, "dev_examples", None)
            or training.metrics.get("dev_examples"),
            "max_length": config.input.max_length,
            "pair_input": self.takes_pairs,
            **(runtime or {}),
        }


@dataclass(frozen=True)
class ModelSet:
    models: Mapping[str, ModelEntry]  # the newest version of each name
    workers: tuple[BackboneWorker, ...]
    versions: Mapping[str, Mapping[int, ModelEntry]]  # every served version of each name

    @classmethod
    def of(cls, entries: Iterable[ModelEntry]) -> ModelSet:
        by_name: dict[str, dict[int, ModelEntry]] = defaultdict(dict)
        workers: dict[int, BackboneWorker] = {}
        for entry in entries:
            by_name[entry.name][entry.model_version] = entry
            workers.setdefault(id(entry.worker), entry.worker)
        versions = {
            name: MappingProxyType(dict(sorted(found.items())))
            for name, found in sorted(by_name.items())
        }
        newest = {name: found[max(found)] for name, found in versions.items()}
        return cls(MappingProxyType(newest), tuple(workers.values()), MappingProxyType(versions))

    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    def entries(self) -> list[ModelEntry]:
        return [entry for found in self.versions.values() for entry in found.values()]

    def get(self, name: str, version: int | None = None) -> ModelEntry | None:
        if version is None:
            return self.models.get(name)
        return self.versions.get(name, {}).get(version)

    def card(self, entry: ModelEntry, runtime: Mapping[str, str] | None = None) -> dict[str, Any]:
        return entry.card(list(self.versions.get(entry.name, {})), runtime)


EMPTY = ModelSet.of(())


@dataclass
class ReloadReport:
    """What one rescan did, by label ("sst2", "sst2/2"); refused: by folder, with the reason."""

    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # folder -> reason
    waiting: list[str] = field(default_factory=list)  # still being written: left for later
    kept: bool = False  # the rescan would have served nothing: the served set stays

    def as_dict(self) -> dict[str, Any]:
        return {
            "loaded": sorted(self.loaded),
            "unchanged": sorted(self.unchanged),
            "removed": sorted(self.removed),
            "refused": [{"path": p, "reason": r} for p, r in sorted(self.refused.items())],
            "waiting": sorted(self.waiting),
            "kept": self.kept,
        }

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.removed)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Registry:
    def __init__(
        self,
        loader: BackboneLoader,
        device: str,
        dtype: torch.dtype,
        limits: BatchLimits,
        metrics: ServiceMetrics,
    ) -> None:
        self._loader = loader
        self.device = device
        self.dtype = dtype
        self.limits = limits
        self.metrics = metrics
        self._backbones: dict[tuple[str, str, str], Backbone] = {}
        self._workers: dict[int, BackboneWorker] = {}  # id(backbone) -> its worker
        self._lock = threading.Lock()  # guards _backbones, _workers, _retiring
        self._reload_lock = threading.Lock()
        self._retiring: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._current = EMPTY

    @property
    def current(self) -> ModelSet:
        return self._current

    def get(self, name: str, version: int | None = None) -> ModelEntry | None:
        """The served model `name`: its newest version, or the pinned `version`."""
        return self._current.get(name, version)

    def live(self) -> tuple[int, int]:
        """(backbone instances, workers) the registry holds: what the served set uses."""
        with self._lock:
            backbones = {id(b) for b in self._backbones.values()}
            backbones |= {id(w.backbone) for w in self._workers.values()}
            return len(backbones), len(self._workers)

    # -- loading -----------------------------------------------------------------------
    def backbone(self, name_or_path: str) -> Backbone:
        key = (name_or_path, self.device, str(self.dtype))
        with self._lock:
            if key not in self._backbones:
                start = time.perf_counter()
                backbone = self._loader(name_or_path, self.device, self.dtype)
                if backbone.device.type == "cuda":
                    # Batches padded to shape buckets, each replayed from a CUDA graph.
                    backbone.use_buckets(self.limits.max_batch_size, capture=True)
                self._backbones[key] = backbone
                log.info(
                    "loaded backbone %s on %s (%s) in %.1fs",
                    name_or_path, self.device, str(self.dtype).removeprefix("torch."),
                    time.perf_counter() - start,
                )  # fmt: skip
            return self._backbones[key]

    def load(self, root: Path) -> ModelSet:
        """Load and warm every checkpoint of `root` into a new set, not yet served.

        Each checkpoint loads on its own and a bad one is refused (logged); raises
        `RepositoryError` only when none loads.
        """
        with self._reload_lock:
            models, report = self._build(root, EMPTY, frozenset())
            if not models.models:
                self._collect()  # the workers of checkpoints that failed to warm
                raise RepositoryError(nothing_served(root, report))
        return models

    def reload(
        self, root: Path, skip: frozenset[str] = frozenset(), fresh: bool = False
    ) -> ReloadReport:
        """Rescan `root` while the current set keeps serving, then swap in the new set whole.

        Unchanged checkpoints (same folder, same files) keep their loaded model, without
        being read again; new and changed ones load and warm here, off the serving path.
        A checkpoint that fails to load or warm, or that collides with another folder of
        the same name and version, is refused with its reason, and what was served under
        its name and version stays. Folders in `skip` (still being written) keep what they
        served and are left for a later reload. A rescan that would serve nothing keeps
        the served set. Requests in flight keep the entry they started with.

        `fresh`: the served set is a stand-in (the shipped default model for an empty
        repository): it is replaced whole by what `root` serves, and kept only when `root`
        serves nothing.
        """
        with self._reload_lock:
            current = self._current
            models, report = self._build(root, EMPTY if fresh else current, skip)
            report.removed = sorted(
                e.label for e in current.entries() if models.get(*e.key) is None
            )
            if not models.models and current.models:
                report.kept = True
                report.loaded, report.removed = [], []
                report.unchanged = sorted(e.label for e in current.entries())
                report.refused[str(root)] = (
                    "the rescan found no checkpoint that can be served; still serving the "
                    f"{len(current.entries())} model versions served before"
                )
                log.warning(
                    "the model repository %s holds no checkpoint that can be served; keeping "
                    "the %d model versions served before (%s)",
                    root, len(current.entries()), ", ".join(report.unchanged),
                )  # fmt: skip
                self._collect()
            elif models.models:
                self.activate(models)
            else:
                self._collect()
            log.info(
                "rescanned the model repository %s: %d loaded, %d unchanged, %d removed, "
                "%d refused%s",
                root, len(report.loaded), len(report.unchanged), len(report.removed),
                len(report.refused),
                f", {len(report.waiting)} still being written" if report.waiting else "",
                extra={"fields": {"reload": report.as_dict()}},
            )  # fmt: skip
            return report

    def _build(
        self, root: Path, current: ModelSet, skip: frozenset[str]
    ) -> tuple[ModelSet, ReloadReport]:
        found = repository.scan(root)
        report = ReloadReport()
        for path, reason in found.refused.items():
            self._refuse(report, path, reason, None)
        served = {entry.key: entry for entry in current.entries()}
        groups: dict[tuple[str, int], list[Candidate]] = defaultdict(list)
        for candidate in found.candidates:
            groups[(candidate.name, candidate.version)].append(candidate)
        entries: list[ModelEntry] = []
        for (name, version), group in sorted(groups.items()):
            old = served.get((name, version))
            if len(group) > 1:
                group = self._collision(report, name, version, group, old)
                if not group:
                    if old is not None:
                        entries.append(old)
                    continue
            candidate = group[0]
            if str(candidate.path) in skip:
                report.waiting.append(candidate.label)
                log.info("checkpoint %s is still being written; trying it later", candidate.path)
                if old is not None:
                    entries.append(old)
                continue
            try:
                entry = self._load_or_keep(candidate, old, report)
            except Exception as exc:  # any refusal keeps what is served
                self._refuse(report, str(candidate.path), _reason(exc), old)
                if old is not None:
                    entries.append(old)
                continue
            entries.append(entry)
        return ModelSet.of(entries), report

    @staticmethod
    def _collision(
        report: ReloadReport,
        name: str,
        version: int,
        group: list[Candidate],
        old: ModelEntry | None,
    ) -> list[Candidate]:
        """Folders that are the same name and version: the one served stays, the rest are
        refused (all of them, when none is served: nothing is picked silently)."""
        kept = [c for c in group if old is not None and c.path == old.path]
        for candidate in group:
            if candidate in kept:
                continue
            others = ", ".join(str(c.path) for c in group if c is not candidate)
            reason = (
                f"model {name!r} version {version} is also the folder {others}; "
                "remove one (an unversioned folder is version 1)"
            )
            Registry._refuse(report, str(candidate.path), reason, old)
        return kept

    @staticmethod
    def _refuse(report: ReloadReport, path: str, reason: str, old: ModelEntry | None) -> None:
        report.refused[path] = reason
        kept = f"; still serving version {old.version} from {old.path}" if old is not None else ""
        log.error("refused checkpoint %s: %s%s", path, reason, kept)

    def _load_or_keep(
        self, candidate: Candidate, old: ModelEntry | None, report: ReloadReport
    ) -> ModelEntry:
        served = old if old is not None and old.path == candidate.path else None
        if served and served.files and repository.stats(candidate.path) == served.files.stats:
            report.unchanged.append(candidate.label)
            return served
        try:
            files = repository.inspect(candidate.path)
        except CheckpointError as exc:
            if (candidate.path / CONFIG_FILE).name not in str(exc):
                # dynprompt.json passed the checks and the weights did not: a config that
                # is itself wrong is the first thing to say.
                read_config(candidate.path)
            raise
        if served and served.files and files.same_content(served.files):
            report.unchanged.append(candidate.label)  # touched or copied over, not changed
            return dataclasses.replace(served, files=files)
        entry = self._load_one(candidate, files)
        self.warm(ModelSet.of([entry]))
        report.loaded.append(candidate.label)
        return entry

    def _load_one(self, candidate: Candidate, files: Files) -> ModelEntry:
        path = candidate.path
        config = read_config(path)
        if config.name != candidate.name:
            log.info(
                "checkpoint %s calls itself %r; it is served as %r (a model's name is its "
                "folder)",
                path, config.name, candidate.name,
            )  # fmt: skip
        shared = self.backbone(config.backbone.name_or_path)
        model = load_checkpoint(path, backbone=shared)
        if repository.stats(path) != files.stats:
            raise CheckpointError(
                f"{path}: its files changed while it was loaded; it loads once they stop changing"
            )
        self._check_fits(path, config, model.backbone)
        private = model.backbone is not shared
        worker = self._worker_for(
            model, f"{config.backbone.name_or_path}@{candidate.label}", private
        )
        entry = ModelEntry(
            candidate.name,
            path,
            files.checksum,
            model,
            worker,
            model_version=candidate.version,
            label=candidate.label,
            files=files,
        )
        log.info(
            "loaded model %s version %d (%s, prompt length %d, router feature %s), weights %s, "
            "from %s on backbone %s",
            entry.name, entry.model_version, config.variant, config.prompt.length,
            entry.card()["router_feature"] or "none", entry.version, path, worker.label,
        )  # fmt: skip
        return entry

    def _check_fits(self, path: Path, config: DynPromptConfig, backbone: Backbone) -> None:
        limit = backbone.max_positions
        need = config.input.max_length + config.prompt.length
        if limit is not None and need > limit:
            raise CheckpointError(
                f"{path / CONFIG_FILE}: field 'input.max_length': {config.input.max_length} plus a "
                f"prompt of {config.prompt.length} exceeds the backbone's {limit} positions"
            )

    def _worker_for(
        self, model: DynPromptModel, private_label: str, private: bool
    ) -> BackboneWorker:
        backbone = model.backbone
        with self._lock:
            worker = self._workers.get(id(backbone))
            if worker is None:
                label = private_label if private else backbone.name_or_path
                worker = BackboneWorker(
                    backbone,
                    label,
                    self.limits,
                    self.metrics.observe_batch,
                    self.metrics.observe_tokenized,
                )
                self._workers[id(backbone)] = worker
            return worker

    def warm(self, models: ModelSet) -> None:
        """One mixed batch per backbone, through the same path requests take."""
        for worker in models.workers:
            mine = [e for e in models.entries() if e.worker is worker]
            rows, owners = [], []
            for entry in mine:
                spec = entry.config.input
                for text in WARMUP_TEXTS:
                    pair = text if entry.takes_pairs else None
                    row = worker.backbone.tokenize_row(
                        text, pair, spec.max_length, spec.truncation_side
                    )
                    rows.append(row)
                    owners.append(entry.model)
            start = time.perf_counter()
            with torch.inference_mode():
                encoded = worker.backbone.collate(rows, worker.backbone.device)
                classify_rows(worker.backbone, owners, encoded)
            log.info(
                "warmed backbone %s (%d models) in %.2fs",
                worker.label, len(mine), time.perf_counter() - start,
            )  # fmt: skip

    def activate(self, models: ModelSet) -> ModelSet:
        """Serve `models` from now on; returns the set it replaced. Workers and backbones
        that `models` does not use are released (after `RETIRE_GRACE_S`)."""
        for worker in models.workers:
            worker.start()
        old, self._current = self._current, models
        self.metrics.set_models(
            sorted({(e.name, e.config.variant, e.worker.label) for e in models.entries()})
        )
        self._collect()
        return old

    # -- releasing ---------------------------------------------------------------------
    def _collect(self) -> None:
        """Release every worker and backbone the served set does not use."""
        live = {id(w) for w in self._current.workers}
        with self._lock:
            dead = [w for w in self._workers.values() if id(w) not in live]
            self._workers = {k: w for k, w in self._workers.items() if id(w) in live}
            used = {id(w.backbone) for w in self._workers.values()}
            unused = [key for key, b in self._backbones.items() if id(b) not in used]
            for key in unused:
                del self._backbones[key]
            if not dead and not unused:
                return
            for key in unused:
                log.info("released backbone %s on %s (%s): no served model uses it", *key)
            thread = threading.Thread(
                target=self._release, args=(dead,), name="dynprompt-retire", daemon=True
            )
            self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
        thread.start()

    def _release(self, workers: list[BackboneWorker]) -> None:
        if workers:
            self._stopping.wait(RETIRE_GRACE_S)
        for worker in workers:
            worker.stop(RETIRE_TIMEOUT_S)
            log.info("stopped backbone worker %s: no served model uses it", worker.label)
        workers.clear()  # the thread's own reference: the workers can be freed now
        release_memory(self.device)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every released worker has stopped and its memory is freed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._retiring)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop(timeout)
        self.settle(timeout)


def nothing_served(root: Path, report: ReloadReport) -> str:
    """Why a repository gives no model, naming each refused folder."""
    if not report.refused:
        return f"{root}: no checkpoints (folders with {CONFIG_FILE}) found in the model repository"
    reasons = "; ".join(f"{path}: {reason}" for path, reason in sorted(report.refused.items()))
    return f"{root}: no checkpoint could be loaded ({len(report.refused)} refused: {reasons})"
