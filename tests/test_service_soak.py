"""A bounded soak of a real server: concurrent valid, invalid, oversized and abandoned
requests across two models.

Every request sent gets exactly one answer of an allowed status (the server's
`requests_total` counts each exactly once, abandoned ones included), every 200 equals the
offline prediction, resident memory stops growing, and open file descriptors return to
their baseline. `DYNPROMPT_SOAK_SECONDS` (default 60) sets the duration.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
import psutil
import pytest

from dynprompt.models import Backbone, RowResult
from tests.server_util import (
    HOST,
    ServerProcess,
    assert_result_matches,
    build_repository,
    offline_predictions,
    scrape,
    start_server,
)

SECONDS = float(os.environ.get("DYNPROMPT_SOAK_SECONDS", "60"))
THREADS = 6
MAX_REQUESTS = 200_000  # a bound on the loop besides the clock
MAX_INPUTS = 16
MAX_CHARS = 2000
PAYLOAD_LIMIT = 60_000
MODELS = {
    "dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]},
    "ilen": {
        "variant": "instance_length",
        "feature": "embeddings",
        "labels": ["negative", "neutral", "positive"],
        "max_length": 24,
    },
}
WORDS = "the a film plot actor dull gripping funny slow wonderful bad great ending long".split()
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=3 + (i * 7) % 30)) for i in range(40)]
ALLOWED = {
    "valid": {200},
    "invalid": {400, 404, 422},
    "oversized": {413},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("repo")
    models = build_repository(path, minilm, MODELS)
    expected = {name: offline_predictions(m, TEXTS) for name, m in models.items()}
    server = start_server(
        [
            "--model-repository", str(path),
            "--max-client-batch-size", str(MAX_INPUTS),
            "--max-input-chars", str(MAX_CHARS),
            "--payload-limit-bytes", str(PAYLOAD_LIMIT),
            "--max-wait-ms", "5",
        ],
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    yield server, models, expected
    assert server.stop() == 0, server.logs()[-3000:]


def invalid_request(rng: random.Random) -> tuple[bytes, str]:
    choice = rng.randrange(5)
    if choice == 0:
        return b'{"model": "dyn", "inputs": [', "malformed"
    if choice == 1:
        return json.dumps({"model": "nope", "inputs": ["x"]}).encode(), "unknown model"
    if choice == 2:
        return json.dumps({"model": "dyn", "inputs": []}).encode(), "no inputs"
    if choice == 3:
        return json.dumps({"model": "../etc/passwd", "inputs": ["x"]}).encode(), "bad name"
    return json.dumps({"model": "ilen", "inputs": ["  "], "x": 1}).encode(), "bad fields"


def oversized_request(rng: random.Random) -> bytes:
    choice = rng.randrange(3)
    if choice == 0:
        return json.dumps({"model": "dyn", "inputs": ["ok"] * (MAX_INPUTS + 1)}).encode()
    if choice == 1:
        return json.dumps({"model": "ilen", "inputs": ["word " * MAX_CHARS]}).encode()
    return json.dumps({"model": "dyn", "inputs": ["a" * 1000] * 70}).encode()  # over the payload


def abandon(port: int, rng: random.Random) -> None:
    """Send a classify request (whole, or half its body), then hang up without reading."""
    body = json.dumps({"model": "dyn", "inputs": rng.sample(TEXTS, 8)}).encode()
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(head + (body if rng.random() < 0.5 else body[: len(body) // 2]))
        time.sleep(rng.random() * 0.02)


class Soak:
    def __init__(self, server: ServerProcess, expected: dict[str, list[RowResult]], labels: Any):
        self.server = server
        self.expected = expected
        self.labels = labels
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + SECONDS

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while time.monotonic() < self.deadline and sum(self.sent.values()) < MAX_REQUESTS:
                kind = rng.choices(
                    ["valid", "invalid", "oversized", "abandoned"], weights=[6, 2, 1, 1]
                )[0]
                with self.lock:
                    self.sent[kind] += 1
                try:
                    self.one(client, kind, rng)
                except Exception as exc:  # recorded, and fails the test
                    with self.lock:
                        self.problems.append(f"{kind}: {exc!r}")

    def one(self, client: httpx.Client, kind: str, rng: random.Random) -> None:
        if kind == "abandoned":
            abandon(self.server.port, rng)
            return
        headers = {"content-type": "application/json"}
        if kind == "valid":
            name = rng.choice(list(self.expected))
            picks = rng.sample(range(len(TEXTS)), rng.randint(1, MAX_INPUTS))
            body = {"model": name, "inputs": [TEXTS[i] for i in picks], "return_routing": True}
            r = client.post("/v1/classify", json=body)
        elif kind == "invalid":
            raw, _ = invalid_request(rng)
            r = client.post("/v1/classify", content=raw, headers=headers)
        else:
            r = client.post("/v1/classify", content=oversized_request(rng), headers=headers)
        with self.lock:
            self.statuses[(kind, r.status_code)] += 1
        if r.status_code not in ALLOWED[kind]:
            raise AssertionError(f"status {r.status_code}: {r.text[:200]}")
        if kind == "valid":
            results = r.json()["results"]
            assert len(results) == len(picks)
            for got, i in zip(results, picks, strict=True):
                assert_result_matches(got, self.expected[name][i], self.labels[name])
        else:
            assert set(r.json()) == {"error"}


def classify_count(url: str) -> float:
    return sum(
        value
        for (name, _labels), value in scrape(url).items()
        if name == "dynprompt_requests_total"
    )


# pytest-timeout's limit (900 s, pyproject) would cut a longer soak short: the test's own
# limit covers its duration plus the start-up and the checks after it.
@pytest.mark.timeout(max(900, SECONDS + 600))
def test_soak(setup: Any) -> None:
    server, models, expected = setup
    proc = psutil.Process(server.pid)
    # Warm up (first requests allocate caches), then take the baselines.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in models:
            client.post("/v1/classify", json={"model": name, "inputs": TEXTS[:MAX_INPUTS]})
    time.sleep(1.0)
    fds_before = proc.num_fds()
    counted_before = classify_count(server.url)
    soak = Soak(server, expected, {n: m.labels for n, m in models.items()})
    rss: list[float] = []
    threads = [threading.Thread(target=soak.run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(proc.memory_info().rss / 2**20)
        time.sleep(1.0)
    for t in threads:
        t.join(120)

    total = sum(soak.sent.values())
    assert not soak.problems, (len(soak.problems), soak.problems[:5])
    assert soak.statuses[("valid", 200)] > 0 and soak.sent["abandoned"] > 0
    # Every classify request the clients sent was answered, and counted, exactly once.
    deadline = time.monotonic() + 30
    while classify_count(server.url) - counted_before < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert classify_count(server.url) - counted_before == total, (total, soak.statuses)
    # Memory: the heap grows between the engine's trims (about every second, see
    # service/memory.py) and falls back at each, so single samples swing by 100 MiB. A leak
    # lifts the whole curve: the last third's median is held to the first third's.
    third = max(1, len(rss) // 3)
    first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
    assert last <= first * 1.10 + 32, (first, last, rss)
    # File descriptors: back to the baseline once the clients are gone.
    deadline = time.monotonic() + 15
    while proc.num_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.num_fds() <= fds_before + 2, (fds_before, proc.num_fds())
    assert httpx.get(server.url + "/ready").status_code == 200
    sixth = max(1, len(rss) // 6)
    parts = [rss[i : i + sixth] for i in range(0, len(rss), sixth)]
    shape = ", ".join(f"{statistics.median(p):.0f} ({max(p):.0f})" for p in parts)
    print(f"soak: {total} requests in {SECONDS:g}s, {dict(soak.statuses)}, rss MiB at start"
          f" {rss[0]:.0f}, then by sixths median (max): {shape}")  # fmt: skip
