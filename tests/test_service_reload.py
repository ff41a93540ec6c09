"""Zero-downtime model updates against a real server: reload under continuous traffic.

Traffic threads classify with two models the whole time while one checkpoint is replaced
(`POST /v1/admin/reload`), then replaced by a broken one, then replaced again and picked up
by SIGHUP. No request may fail; every answer equals the offline prediction of the old or
the new version, and once a reload has returned, only the new one.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, RowResult, save_checkpoint, weights_checksum
from dynprompt.service.schemas import ModelList, ReloadResult
from tests.server_util import (
    ServerProcess,
    build_model,
    build_repository,
    offline_predictions,
    start_server,
)

KEY = "reload-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["a gripping, funny film", "dull and far too long", "it was fine."]
MODELS = {
    "dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]},
    "probe": {"variant": "linear_probe", "labels": ["negative", "positive"]},
}


def same(got: list[dict[str, Any]], want: list[RowResult], tol: float = 1e-4) -> bool:
    return all(
        abs(g["scores"][label] - p) < tol
        for g, w in zip(got, want, strict=True)
        for label, p in zip(("negative", "positive"), w.probs, strict=True)
    )


class Traffic:
    """Threads posting to both models until stopped; records (model, sent_at, body or error)."""

    def __init__(self, url: str, threads: int = 3, max_requests: int = 5000) -> None:
        self.url = url
        self.stop = threading.Event()
        self.records: list[tuple[str, float, float, int, Any]] = []
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def _loop(self, i: int) -> None:
        names = list(MODELS)
        with httpx.Client(base_url=self.url, timeout=60, headers=AUTH) as client:
            n = 0
            while not self.stop.is_set() and len(self.records) < self.max_requests:
                name = names[(i + n) % len(names)]
                n += 1
                sent = time.monotonic()
                try:
                    r = client.post(
                        "/v1/classify",
                        json={"model": name, "inputs": TEXTS, "return_all_scores": True},
                    )
                    status, body = r.status_code, r.json() if r.status_code == 200 else r.text
                except httpx.HTTPError as exc:
                    status, body = -1, repr(exc)
                with self._lock:
                    self.records.append((name, sent, time.monotonic(), status, body))

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.records)
        while len(self.records) < start + count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.records) >= start + count, "traffic stalled"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("repo")
    models = build_repository(path, minilm, MODELS)
    server = start_server(
        ["--model-repository", str(path), "--api-key", KEY, "--max-wait-ms", "5"],
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    yield server, path, models
    assert server.stop() == 0, server.logs()[-3000:]


def versions(server: ServerProcess) -> dict[str, dict[str, Any]]:
    body = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()
    ModelList.model_validate(body)
    return {card["name"]: card for card in body["models"]}


def test_reload_needs_the_api_key(setup: Any) -> None:
    server = setup[0]
    r = httpx.post(server.url + "/v1/admin/reload", timeout=60)
    assert r.status_code == 401
    r = httpx.post(
        server.url + "/v1/admin/reload", headers={"Authorization": "Bearer wrong"}, timeout=60
    )
    assert r.status_code == 401


def test_reload_under_load_switches_versions_and_refuses_a_broken_checkpoint(
    setup: Any, minilm: Backbone
) -> None:
    server, path, models = setup
    old = {name: offline_predictions(m, TEXTS) for name, m in models.items()}
    replacement = build_model("dyn", minilm, seed=7, **MODELS["dyn"])
    new = offline_predictions(replacement, TEXTS)
    assert not same([{"scores": dict(zip(("negative", "positive"), w.probs, strict=True))}
                     for w in new], old["dyn"]), "the replacement must answer differently"  # fmt: skip
    before = versions(server)
    assert before["dyn"]["version"] == weights_checksum(path / "dyn")

    with Traffic(server.url) as traffic:
        traffic.wait_for(10)
        save_checkpoint(replacement, path / "dyn")
        r = httpx.post(server.url + "/v1/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        swapped_at = time.monotonic()
        report = ReloadResult.model_validate(r.json())
        assert report.loaded == ["dyn"] and report.unchanged == ["probe"]
        assert report.refused == [] and report.removed == []
        traffic.wait_for(10)

        # Now a broken checkpoint in the same folder: refused, the new version stays.
        (path / "dyn" / "weights.safetensors").write_bytes(b"not a safetensors file at all")
        r = httpx.post(server.url + "/v1/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        report = ReloadResult.model_validate(r.json())
        assert report.loaded == [] and report.unchanged == ["probe"]
        assert [x.path for x in report.refused] == [str(path / "dyn")]
        assert "safetensors" in report.refused[0].reason
        traffic.wait_for(10)

    after = versions(server)
    assert after["dyn"]["version"] != before["dyn"]["version"]
    assert after["dyn"]["loaded_at"] > before["dyn"]["loaded_at"]
    assert after["probe"] == before["probe"]
    assert any("refused checkpoint" in rec["msg"] for rec in server.log_records())

    failed = [rec for rec in traffic.records if rec[3] != 200]
    assert not failed, failed[:3]
    switched = 0
    for name, sent, _done, _status, body in traffic.records:
        results = body["results"]
        if name == "probe":
            assert same(results, old["probe"])
        elif sent > swapped_at:
            assert same(results, new), "after the reload returned, only the new version answers"
            switched += 1
        else:
            assert same(results, old["dyn"]) or same(results, new)
    assert switched >= 10


def test_sighup_reloads(setup: Any, minilm: Backbone) -> None:
    server, path, _ = setup
    replacement = build_model("dyn", minilm, seed=11, **MODELS["dyn"])
    save_checkpoint(replacement, path / "dyn")
    want = weights_checksum(path / "dyn")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while versions(server)["dyn"]["version"] != want and time.monotonic() < deadline:
        time.sleep(0.1)
    assert versions(server)["dyn"]["version"] == want
    r = httpx.post(
        server.url + "/v1/classify",
        json={"model": "dyn", "inputs": TEXTS, "return_all_scores": True},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200 and same(
        r.json()["results"], offline_predictions(replacement, TEXTS)
    )
    assert server.alive()
