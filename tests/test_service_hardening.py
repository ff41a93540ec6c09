"""No client can stall the others (issue "a server that cannot be stalled"), against a real
server: slow uploads end, connections are capped, an over-limit body still gets its 413
under concurrency, a huge list of inputs is refused before validation, and a shutdown
answers unfinished uploads with 503. Every refusal is a status, never a 5xx or a
traceback, and the server goes on answering."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from dynprompt.models import Backbone
from tests.server_util import HOST, ServerProcess, build_repository, sample, scrape, start_server

MODELS = {"pre": {"variant": "prefix", "feature": "embeddings", "labels": ["neg", "pos"]}}
PAYLOAD_LIMIT = 100_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Path:
    path: Path = tmp_path_factory.mktemp("repo")
    build_repository(path, minilm, MODELS)
    return path


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        [
            "--model-repository", str(repo),
            "--body-timeout-s", "1",
            "--max-connections", "40",
            "--payload-limit-bytes", str(PAYLOAD_LIMIT),
            "--header-timeout-s", "30",
        ],
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def read_reply(sock: socket.socket, seconds: float = 10) -> bytes:
    sock.settimeout(seconds)
    reply = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def slow_upload(port: int, declared: int = 1000) -> socket.socket:
    """A connection that sends a classify head and then only the start of its body."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {declared}\r\n\r\n".encode()
        + b'{"model": "pre", "inputs": ["'
    )
    return sock


def healthy(server: ServerProcess) -> bool:
    r = httpx.post(server.url + "/v1/classify", json={"model": "pre", "inputs": ["ok"]}, timeout=30)
    return r.status_code == 200


def test_a_slow_upload_gets_408_and_is_counted(server: ServerProcess) -> None:
    before = scrape(server.url)
    with slow_upload(server.port) as sock:
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "body_timeout"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(server.url)
        if sample(after, "dynprompt_requests_total", model="_unknown", status="408") > sample(
            before, "dynprompt_requests_total", model="_unknown", status="408"
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the 408 was not counted")
    assert healthy(server)
    assert "Traceback" not in server.logs()


def test_connections_beyond_the_cap_are_refused_and_logged_once(server: ServerProcess) -> None:
    idle = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(60)]
    try:
        refused = 0
        for sock in idle:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                if sock.recv(65536).startswith(b"HTTP/1.1 503"):
                    refused += 1
        assert refused >= 15, refused  # 60 opened, at most 40 kept
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert healthy(server)
    warnings = [r for r in server.log_records() if "connection limit" in str(r.get("msg"))]
    assert 1 <= len(warnings) <= 2  # rate-limited: one line, not one per refusal


def test_an_over_limit_body_gets_its_413_under_concurrency(server: ServerProcess) -> None:
    big = json.dumps({"model": "pre", "inputs": ["word " * (3 * PAYLOAD_LIMIT // 5)]}).encode()

    def post(i: int) -> int:
        chunks = (big[j : j + 8192] for j in range(0, len(big), 8192))  # no Content-Length
        r = httpx.post(
            server.url + "/v1/classify",
            content=chunks if i % 2 else big,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(8)))
    assert statuses == [413] * 8
    assert healthy(server)


def test_twenty_thousand_inputs_are_refused_before_validation(server: ServerProcess) -> None:
    body = b'{"model": "pre", "inputs": [' + b",".join([b'"a"'] * 20_000) + b"]}"
    r = httpx.post(
        server.url + "/v1/classify",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_many_inputs", r.text
    assert healthy(server)


def test_shutdown_answers_unfinished_uploads_with_503(repo: Path, tmp_path: Path) -> None:
    proc = start_server(
        ["--model-repository", str(repo), "--body-timeout-s", "60"], log_dir=tmp_path
    )
    replies: list[bytes] = []
    try:
        socks = [slow_upload(proc.port) for _ in range(3)]
        time.sleep(0.5)
        threads = [
            threading.Thread(target=lambda s=s: replies.append(read_reply(s, 30))) for s in socks
        ]
        for t in threads:
            t.start()
        proc.terminate()
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
    finally:
        proc.stop()
    assert len(replies) == 3
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "draining"
    assert "Traceback" not in proc.logs()
