"""Fault injection against a real server: a batch that raises, and running out of memory.

A `sitecustomize` on the server's PYTHONPATH wraps `classify_rows`, the call that allocates
a batch's activations (the allocation boundary on a GPU): a batch of more than `OOM_ROWS`
rows, or any batch holding the word "gigantic", raises `torch.OutOfMemoryError` as CUDA
would; a batch holding "xyzzy" raises a plain error. On CPU this exercises the same
split-and-retry path a GPU takes.
"""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel
from tests.server_util import (
    ServerProcess,
    assert_result_matches,
    build_repository,
    offline_predictions,
)
from tests.server_util import start_server as start

OOM_ROWS = 4
FAULT = textwrap.dedent(
    f"""
    import torch
    import dynprompt.models.inference as _inference

    _real = _inference.classify_rows

    def classify_rows(backbone, models, encoded):
        texts = [backbone.tokenizer.decode(ids) for ids in encoded.input_ids.tolist()]
        if any("xyzzy" in t for t in texts):
            raise RuntimeError("injected fault /secret/path")
        if len(texts) > {OOM_ROWS} or any("gigantic" in t for t in texts):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return _real(backbone, models, encoded)

    _inference.classify_rows = classify_rows
    """
)
MODELS = {
    "dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]},
    "probe": {"variant": "linear_probe", "labels": ["negative", "positive"]},
}
TEXTS = [f"sentence number {i}, a {'good' if i % 2 else 'bad'} film" for i in range(12)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("repo")
    models = build_repository(path, minilm, MODELS)
    fault_dir = tmp_path_factory.mktemp("fault")
    (fault_dir / "sitecustomize.py").write_text(FAULT)
    server = start(
        ["--model-repository", str(path), "--max-batch-size", "16", "--max-wait-ms", "30"],
        env={"PYTHONPATH": str(fault_dir)},
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    yield server, models
    assert server.stop() == 0, server.logs()[-3000:]


def classify(url: str, model: str, inputs: list[str], request_id: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/classify",
        json={"model": model, "inputs": inputs},
        headers={"x-request-id": request_id},
        timeout=120,
    )


def check_ok(r: httpx.Response, model: DynPromptModel, inputs: list[str]) -> None:
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["results"], offline_predictions(model, inputs), strict=True):
        assert_result_matches(got, want, model.labels)


def assert_healthy(server: ServerProcess, models: dict[str, DynPromptModel]) -> None:
    assert server.alive()
    assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
    for name, model in models.items():
        check_ok(
            classify(server.url, name, ["a fine film"], f"after-{name}"), model, ["a fine film"]
        )


def test_out_of_memory_batches_are_split_and_retried(setup: Any) -> None:
    server, models = setup
    # 12 rows in one request: the batch runs out of memory and is split until it fits.
    check_ok(classify(server.url, "dyn", TEXTS, "big-1"), models["dyn"], TEXTS)
    with ThreadPoolExecutor(6) as pool:  # concurrent requests across both models
        futures = [
            pool.submit(classify, server.url, name, TEXTS[i : i + 3], f"c-{name}-{i}")
            for i in range(0, 12, 3)
            for name in models
        ]
        for future, (i, name) in zip(
            futures, [(i, n) for i in range(0, 12, 3) for n in models], strict=True
        ):
            check_ok(future.result(), models[name], TEXTS[i : i + 3])
    assert "batches now hold at most" in server.logs()
    assert_healthy(server, models)


def test_only_a_row_that_cannot_fit_alone_fails_with_503(setup: Any) -> None:
    server, models = setup
    with ThreadPoolExecutor(4) as pool:
        huge = pool.submit(classify, server.url, "dyn", ["ok", "a gigantic input"], "huge-1")
        others = [
            pool.submit(classify, server.url, "probe", TEXTS[:3], f"fine-{i}") for i in range(3)
        ]
        r = huge.result()
        for other in others:
            check_ok(other.result(), models["probe"], TEXTS[:3])
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"]["type"] == "out_of_memory" and "huge-1" in body["error"]["message"]
    assert "Traceback" not in r.text and "injected" not in r.text
    assert r.headers["x-request-id"] == "huge-1"
    assert_healthy(server, models)


def test_a_failing_batch_fails_only_its_requests_with_a_500(setup: Any) -> None:
    server, models = setup
    with ThreadPoolExecutor(6) as pool:
        bad = pool.submit(classify, server.url, "dyn", ["xyzzy here"], "bad-1")
        others = [
            pool.submit(classify, server.url, name, TEXTS[:2], f"other-{name}-{i}")
            for i in range(3)
            for name in models
        ]
        r = bad.result()
        statuses = [o.result().status_code for o in others]
    assert r.status_code == 500
    body = r.json()
    assert body == {
        "error": {
            "type": "internal_error",
            "message": body["error"]["message"],
        }
    }
    assert "bad-1" in body["error"]["message"]
    assert "secret" not in r.text and "Traceback" not in r.text and "injected" not in r.text
    # Requests that shared the failing batch fail with it (500); none else, none lost.
    assert set(statuses) <= {200, 500} and statuses.count(200) >= 1
    assert any("bad-1" in rec["msg"] for rec in server.log_records() if rec["level"] == "error")
    assert_healthy(server, models)


def test_fault_file_is_only_on_the_server(tmp_path: Path) -> None:
    """The injection lives in the server process alone; this process computes normally."""
    import dynprompt.models.inference as inference

    assert inference.classify_rows.__module__ == "dynprompt.models.inference"
