"""The batcher and registry in-process: grouping by length, limits, cancellation, failure isolation,
shared backbones, and half precision. (The HTTP-level behaviour is in the other test_service files.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dynprompt.service.batcher as batcher
from dynprompt.models import Backbone, DynPromptModel, RowResult, load_backbone
from dynprompt.service.batcher import BackboneWorker, BatchFailed, BatchLimits, Job
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.registry import Registry, RepositoryError
from tests.server_util import (
    build_model,
    build_repository,
    offline_predictions,
)

SHORT, LONG = "fine", "a long and winding sentence that goes on about the film " * 3


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def model(minilm: Backbone) -> DynPromptModel:
    return build_model("m", minilm, variant="prefix", feature="embeddings", labels=["neg", "pos"])


def job(
    loop: asyncio.AbstractEventLoop, model: DynPromptModel, texts: list[str], rid: str = "r"
) -> Job:
    rows = [model.backbone.tokenize_row(t, None, model.config.input.max_length) for t in texts]
    return Job(rid, model, rows, loop, loop.create_future())


def worker_with(
    model: DynPromptModel, limits: BatchLimits, batches: list[tuple[Any, ...]]
) -> BackboneWorker:
    def record(*args: Any) -> None:
        batches.append(args)

    return BackboneWorker(model.backbone, "minilm", limits, on_batch=record)


def run(loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> list[Any]:
    async def wait() -> list[Any]:
        return list(
            await asyncio.wait_for(
                asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 60
            )
        )

    return loop.run_until_complete(wait())


@pytest.mark.parametrize(
    ("max_batch_size", "tolerance", "sizes"),
    [(4, 0.5, [4, 4]), (16, 0.5, [4, 4]), (16, 1e9, [8])],
)
def test_rows_are_grouped_by_length(
    loop: asyncio.AbstractEventLoop,
    model: DynPromptModel,
    max_batch_size: int,
    tolerance: float,
    sizes: list[int],
) -> None:
    batches: list[tuple[Any, ...]] = []
    limits = BatchLimits(max_batch_size, 10**6, 0.0, tolerance)
    worker = worker_with(model, limits, batches)
    texts = [SHORT if i % 2 == 0 else LONG for i in range(8)]  # arrivals alternate short/long
    jobs = [job(loop, model, [t], str(i)) for i, t in enumerate(texts)]
    for j in jobs:
        worker.submit(j)  # all queued before the thread starts
    worker.start()
    results = run(loop, jobs)
    worker.stop(10)
    assert [b[2] for b in batches] == sizes
    no_padding = all(padded == real for _, _, _, padded, real, _ in batches)
    assert no_padding == (len(sizes) == 2)  # grouped by length, or (tolerance off) mixed
    want = offline_predictions(model, texts)
    for got, ref in zip(results, want, strict=True):
        assert got[0].probs == pytest.approx(ref.probs, abs=1e-5)


def test_batch_closes_at_the_token_budget(
    loop: asyncio.AbstractEventLoop, model: DynPromptModel
) -> None:
    batches: list[tuple[Any, ...]] = []
    cost = len(model.backbone.tokenize_row(LONG, None, 128).input_ids) + model.config.prompt.length
    worker = worker_with(
        model, BatchLimits(max_batch_size=64, max_batch_tokens=3 * cost, max_wait_s=0.0), batches
    )
    jobs = [job(loop, model, [LONG] * 7)]
    worker.submit(jobs[0])
    worker.start()
    (results,) = run(loop, jobs)
    worker.stop(10)
    assert [b[2] for b in batches] == [3, 3, 1]
    assert all(padded <= 3 * cost for _, _, _, padded, _, _ in batches)
    assert len(results) == 7 and jobs[0].compute_s > 0


def test_cancelled_jobs_are_skipped(loop: asyncio.AbstractEventLoop, model: DynPromptModel) -> None:
    batches: list[tuple[Any, ...]] = []
    worker = worker_with(model, BatchLimits(max_batch_size=8, max_wait_s=0.0), batches)
    gone, kept = job(loop, model, [SHORT, LONG], "gone"), job(loop, model, [SHORT], "kept")
    worker.submit(gone)
    worker.submit(kept)
    assert worker.cancel(gone) and worker.cancel(gone)  # idempotent while queued
    worker.start()
    run(loop, [kept])
    worker.stop(10)
    assert [b[2] for b in batches] == [1] and not gone.future.done()
    assert not worker.cancel(kept)  # finished jobs cannot be cancelled


def test_a_failing_batch_fails_only_its_own_jobs(
    loop: asyncio.AbstractEventLoop, model: DynPromptModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batcher.classify_rows

    def flaky(backbone: Any, models: Any, encoded: Any) -> tuple[list[RowResult], Any]:
        if any("xyzzy" in backbone.tokenizer.decode(ids) for ids in encoded.input_ids.tolist()):
            raise RuntimeError("injected")
        return real(backbone, models, encoded)

    monkeypatch.setattr(batcher, "classify_rows", flaky)
    worker = worker_with(model, BatchLimits(max_batch_size=1, max_wait_s=0.0), [])
    jobs = [
        job(loop, model, [SHORT], "a"),
        job(loop, model, ["xyzzy", SHORT], "b"),
        job(loop, model, [LONG], "c"),
    ]
    for j in jobs:
        worker.submit(j)
    worker.start()
    a, b, c = run(loop, jobs)
    worker.stop(10)
    assert isinstance(b, BatchFailed) and "injected" in str(b)
    assert isinstance(a, list) and isinstance(c, list)
    assert jobs[1].state == batcher.CANCELLED  # its second row never ran


def test_registry_shares_backbones_and_runs_half_precision(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, minilm: Backbone
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
    jobs = [job(loop, served.models[name].model, texts, name) for name in ("a", "b")]
    for j in jobs:
        served.workers[0].submit(j)
    results = run(loop, jobs)
    registry.stop(10)
    for name, got in zip(("a", "b"), results, strict=True):
        for g, want in zip(got, offline_predictions(models[name], texts), strict=True):
            assert sum(g.probs) == pytest.approx(1.0, abs=1e-3)
            assert g.probs == pytest.approx(want.probs, abs=2e-2)  # fp16 vs the fp32 reference
    assert 'model="a",variant="dynamic"' in metrics.render().decode()


def test_repository_errors_name_the_path(tmp_path: Path, minilm: Backbone) -> None:
    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    with pytest.raises(RepositoryError, match="not found"):
        registry.load(tmp_path / "missing")
    build_repository(tmp_path / "x", minilm, {"same": {"variant": "prefix", "labels": ["a", "b"]}})
    build_repository(tmp_path / "y", minilm, {"same": {"variant": "prefix", "labels": ["a", "b"]}})
    with pytest.raises(RepositoryError, match="unique"):
        registry.load(tmp_path)
    # A checkpoint folder given directly is a repository of one.
    assert list(registry.load(tmp_path / "x" / "same").models) == ["same"]


def test_out_of_memory_splits_lowers_the_cap_and_recovers(
    loop: asyncio.AbstractEventLoop, model: DynPromptModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batcher.classify_rows
    sizes: list[int] = []

    def small_memory(backbone: Any, models: Any, encoded: Any) -> tuple[list[RowResult], Any]:
        texts = [backbone.tokenizer.decode(ids) for ids in encoded.input_ids.tolist()]
        sizes.append(len(texts))
        if len(texts) > 3 or any("gigantic" in t for t in texts):
            raise torch.OutOfMemoryError("injected out of memory")
        return real(backbone, models, encoded)

    monkeypatch.setattr(batcher, "classify_rows", small_memory)
    monkeypatch.setattr(batcher, "CAP_RECOVERY_BATCHES", 2)
    worker = worker_with(model, BatchLimits(max_batch_size=16, max_wait_s=0.05), [])
    texts = [f"film number {i}" for i in range(10)]
    jobs = [job(loop, model, texts, "big"), job(loop, model, [SHORT, "gigantic"], "huge")]
    for j in jobs:
        worker.submit(j)
    worker.start()
    big, huge = run(loop, jobs)
    assert isinstance(huge, batcher.RowTooLarge) and not isinstance(big, Exception)
    want = offline_predictions(model, texts)
    for got, ref in zip(big, want, strict=True):
        assert got.probs == pytest.approx(ref.probs, abs=1e-4)
    assert sizes[0] == 12 and max(sizes[1:]) < 12  # split, retried
    assert worker.row_cap < 16
    low = worker.row_cap
    more = [job(loop, model, [SHORT], f"r{i}") for i in range(4)]
    for j in more:
        worker.submit(j)
        run(loop, [j])
    worker.stop(10)
    assert worker.row_cap > low  # clean batches let the cap grow back
