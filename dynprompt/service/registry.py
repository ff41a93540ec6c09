"""The model repository: checkpoints loaded over shared backbones, served by name.

Backbones are cached by `(name_or_path, device, dtype)`, so every checkpoint
trained on the same backbone runs on one instance and one `BackboneWorker`
(a `finetune` checkpoint owns a private copy, hence its own worker). What the
server serves is one immutable `ModelSet` (name -> `ModelEntry`); a reload builds
a new set and swaps it in whole, and a request keeps the entry it started with.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from dynprompt.models.backbone import Backbone
from dynprompt.models.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_checkpoint,
    read_config,
    weights_checksum,
)
from dynprompt.models.config import DynPromptConfig
from dynprompt.models.inference import classify_rows
from dynprompt.models.model import DynPromptModel
from dynprompt.service.batcher import BackboneWorker, BatchLimits, Job
from dynprompt.service.metrics import ServiceMetrics

log = logging.getLogger("dynprompt.service.registry")

BackboneLoader = Callable[[str, str, torch.dtype], Backbone]
WARMUP_TEXTS = (
    "a warm-up sentence.",
    "an unremarkable and somewhat longer sentence that warms the server up.",
)


class RepositoryError(ValueError):
    """A model repository that cannot be served, with the path that says why."""


@dataclass(frozen=True, eq=False)
class ModelEntry:
    name: str
    path: Path
    version: str  # weights checksum
    model: DynPromptModel
    worker: BackboneWorker
    loaded_at: float = field(default_factory=time.time)  # Unix time

    @property
    def config(self) -> DynPromptConfig:
        return self.model.config

    @property
    def labels(self) -> list[str]:
        return list(self.config.head.labels)

    @property
    def takes_pairs(self) -> bool:
        return self.config.input.pair_field is not None

    def card(self) -> dict[str, Any]:
        config = self.config
        return {
            "name": self.name,
            "labels": self.labels,
            "variant": config.variant,
            "prompt_length": config.prompt.length,
            "pool_size": config.prompt.pool_size,
            "router_feature": config.router.feature if config.uses_router_features else None,
            "backbone": config.backbone.name_or_path,
            "version": self.version,
            "loaded_at": dt.datetime.fromtimestamp(self.loaded_at, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "metrics": dict(config.training.metrics),
            "max_length": config.input.max_length,
            "pair_input": self.takes_pairs,
        }


@dataclass(frozen=True)
class ModelSet:
    models: Mapping[str, ModelEntry]
    workers: tuple[BackboneWorker, ...]

    @property
    def names(self) -> list[str]:
        return sorted(self.models)


EMPTY = ModelSet(MappingProxyType({}), ())


@dataclass
class ReloadReport:
    """What one rescan of the repository did, by model name (refused: by folder)."""

    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # folder -> reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "loaded": sorted(self.loaded),
            "unchanged": sorted(self.unchanged),
            "removed": sorted(self.removed),
            "refused": [{"path": p, "reason": r} for p, r in sorted(self.refused.items())],
        }


def find_checkpoints(root: Path) -> list[Path]:
    """`root` itself if it is a checkpoint, else every folder under it holding dynprompt.json."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: model repository folder not found")
    if (root / CONFIG_FILE).is_file():
        return [root]
    found = [
        p.parent
        for p in root.rglob(CONFIG_FILE)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


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
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._current = EMPTY

    @property
    def current(self) -> ModelSet:
        return self._current

    def get(self, name: str) -> ModelEntry | None:
        return self._current.models.get(name)

    # -- loading -----------------------------------------------------------------------
    def backbone(self, name_or_path: str) -> Backbone:
        key = (name_or_path, self.device, str(self.dtype))
        with self._lock:
            if key not in self._backbones:
                start = time.perf_counter()
                self._backbones[key] = self._loader(name_or_path, self.device, self.dtype)
                log.info(
                    "loaded backbone %s on %s (%s) in %.1fs",
                    name_or_path, self.device, str(self.dtype).removeprefix("torch."),
                    time.perf_counter() - start,
                )  # fmt: skip
            return self._backbones[key]

    def load(self, root: Path) -> ModelSet:
        """Load every checkpoint under `root` into a new set (not yet served)."""
        paths = find_checkpoints(root)
        if not paths:
            raise RepositoryError(
                f"{root}: no checkpoints (folders with {CONFIG_FILE}) found in the model repository"
            )
        entries: dict[str, ModelEntry] = {}
        workers: dict[int, BackboneWorker] = {}
        for path in paths:
            config = read_config(path)
            if config.name in entries:
                raise RepositoryError(
                    f"{path / CONFIG_FILE}: field 'name': {config.name!r} is also the name of "
                    f"{entries[config.name].path}; model names must be unique"
                )
            entry = self._load_one(path, config)
            workers[id(entry.model.backbone)] = entry.worker
            entries[config.name] = entry
        return ModelSet(MappingProxyType(entries), tuple(workers.values()))

    def _load_one(self, path: Path, config: DynPromptConfig) -> ModelEntry:
        version = weights_checksum(path)
        shared = self.backbone(config.backbone.name_or_path)
        model = load_checkpoint(path, backbone=shared)
        self._check_fits(path, config, model.backbone)
        worker = self._worker_for(model, private=model.backbone is not shared)
        entry = ModelEntry(config.name, path, version, model, worker)
        log.info(
            "loaded model %s (%s, prompt length %d, router feature %s) version %s from %s "
            "on backbone %s",
            entry.name, config.variant, config.prompt.length,
            entry.card()["router_feature"] or "none", entry.version, path, worker.label,
        )  # fmt: skip
        return entry

    def reload(self, root: Path) -> ReloadReport:
        """Rescan `root` while the current set keeps serving, then swap in the new set whole.

        Unchanged checkpoints (same folder, same weights checksum) keep their loaded model;
        new and changed ones load and warm here, off the serving path. A checkpoint that
        fails to load or warm is refused with its reason, and the version already served
        from that folder (if any) stays. Requests in flight keep the entry they started with.
        """
        with self._reload_lock:
            current = self._current
            by_path = {entry.path: entry for entry in current.models.values()}
            report = ReloadReport()
            entries: dict[str, ModelEntry] = {}
            for path in find_checkpoints(root):
                old = by_path.get(path)
                try:
                    config = read_config(path)
                    taken = entries.get(config.name)
                    if taken is not None:
                        raise RepositoryError(
                            f"{path / CONFIG_FILE}: field 'name': {config.name!r} is also the "
                            f"name of {taken.path}; model names must be unique"
                        )
                    if (
                        old is not None
                        and old.name == config.name
                        and old.version == weights_checksum(path)
                    ):
                        entries[old.name] = old
                        report.unchanged.append(old.name)
                        continue
                    entry = self._load_one(path, config)
                    self.warm(ModelSet(MappingProxyType({entry.name: entry}), (entry.worker,)))
                except Exception as exc:  # any refusal keeps what is served
                    reason = f"{type(exc).__name__}: {exc}"
                    report.refused[str(path)] = reason
                    kept = f"; still serving version {old.version}" if old is not None else ""
                    log.error("refused checkpoint %s: %s%s", path, reason, kept)
                    if old is not None and old.name not in entries:
                        entries[old.name] = old
                    continue
                entries[entry.name] = entry
                report.loaded.append(entry.name)
            report.removed = sorted(set(current.models) - set(entries))
            workers = {id(e.worker): e.worker for e in entries.values()}
            self.activate(ModelSet(MappingProxyType(entries), tuple(workers.values())))
            log.info(
                "reloaded the model repository %s: %d loaded, %d unchanged, %d removed, "
                "%d refused",
                root, len(report.loaded), len(report.unchanged), len(report.removed),
                len(report.refused),
                extra={"fields": {"reload": report.as_dict()}},
            )  # fmt: skip
            return report

    def _check_fits(self, path: Path, config: DynPromptConfig, backbone: Backbone) -> None:
        limit = backbone.max_positions
        need = config.input.max_length + config.prompt.length
        if limit is not None and need > limit:
            raise CheckpointError(
                f"{path / CONFIG_FILE}: field 'input.max_length': {config.input.max_length} plus a "
                f"prompt of {config.prompt.length} exceeds the backbone's {limit} positions"
            )

    def _worker_for(self, model: DynPromptModel, private: bool) -> BackboneWorker:
        backbone = model.backbone
        with self._lock:
            worker = self._workers.get(id(backbone))
            if worker is None:
                label = backbone.name_or_path + (f"@{model.name}" if private else "")
                worker = BackboneWorker(
                    backbone, label, self.limits, self.metrics.observe_batch, self._job_started
                )
                self._workers[id(backbone)] = worker
            return worker

    def _job_started(self, job: Job) -> None:
        self.metrics.queue_duration.observe(job.queue_s)

    @staticmethod
    def warm(models: ModelSet) -> None:
        """One mixed batch per backbone, through the same path requests take."""
        for worker in models.workers:
            mine = [e for e in models.models.values() if e.worker is worker]
            rows, owners = [], []
            for entry in mine:
                for text in WARMUP_TEXTS:
                    pair = text if entry.takes_pairs else None
                    max_length = entry.config.input.max_length
                    rows.append(worker.backbone.tokenize_row(text, pair, max_length))
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
        """Serve `models` from now on; returns the set it replaced."""
        for worker in models.workers:
            worker.start()
        old, self._current = self._current, models
        self.metrics.set_models(
            [(e.name, e.config.variant, e.worker.label) for e in models.models.values()]
        )
        return old

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop(timeout)
