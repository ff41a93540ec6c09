"""Limits against abuse, against a real server: text length, model names, slow and idle
clients, oversized headers. Every refusal is a clean status (or a closed connection), never
a 5xx, and the server goes on answering."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone
from tests.server_util import HOST, ServerProcess, build_repository, start_server

MAX_CHARS = 200
MODELS = {"dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path: Path = tmp_path_factory.mktemp("repo")
    build_repository(path, minilm, MODELS)
    proc = start_server(
        [
            "--model-repository", str(path),
            "--max-input-chars", str(MAX_CHARS),
            "--header-timeout-s", "1",
            "--keep-alive-timeout-s", "1",
            "--max-header-bytes", "4096",
        ],
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` within `seconds` (reading and discarding any reply)."""
    sock.settimeout(0.25)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


def test_text_over_max_input_chars_is_413(server: ServerProcess) -> None:
    url = server.url + "/v1/classify"
    r = httpx.post(url, json={"model": "dyn", "inputs": ["ok", "a" * (MAX_CHARS + 1)]})
    assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_large"
    assert r.json()["error"]["message"].startswith("inputs.1")
    assert httpx.post(url, json={"model": "dyn", "inputs": ["a" * MAX_CHARS]}).status_code == 200


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..", "dyn/../dyn", "dyn\x00", "a" * 200, "~root"]
)
def test_model_names_are_validated_never_paths(server: ServerProcess, name: str) -> None:
    r = httpx.post(server.url + "/v1/classify", json={"model": name, "inputs": ["x"]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", r.text
    quoted = httpx.URL(server.url + "/v1/models/").copy_with(
        raw_path=b"/v1/models/" + name.replace("/", "%2F").replace("\x00", "%00").encode()
    )
    r = httpx.get(quoted)
    assert r.status_code in (404, 422), (name, r.status_code, r.text)
    assert "root:" not in r.text


def test_slow_client_that_never_finishes_its_headers_is_closed(server: ServerProcess) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert closed_within(sock, 10)
    assert httpx.get(server.url + "/health").status_code == 200


def test_idle_keep_alive_connection_is_closed(server: ServerProcess) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_within(sock, 10)


def test_oversized_headers_are_refused(server: ServerProcess) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        # The head arrives in pieces, as from a real client, so the server buffers it.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000)
        time.sleep(0.3)
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"a" * 6000 + b"\r\n\r\n")
        sock.settimeout(5)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionError):
            pass
    assert reply == b"" or reply.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), reply[:200]
    assert httpx.get(server.url + "/health").status_code == 200


def test_an_answer_costs_the_event_loop_one_write(tmp_path: Path, minilm: Backbone) -> None:
    """uvicorn writes a response's head and its body apart; the connection's transport joins
    the writes of one turn of the event loop (`connections.CoalescingTransport`), so an
    answer leaves in one send. Counted by the kernel: the event loop thread's write calls."""
    build_repository(tmp_path / "repo", minilm, MODELS)
    with start_server(
        ["--model-repository", str(tmp_path / "repo"), "--log-level", "warning"], log_dir=tmp_path
    ) as proc:
        io = Path(f"/proc/{proc.pid}/task/{proc.pid}/io")  # the main thread runs the loop

        def writes() -> int:
            fields = dict(line.split(": ") for line in io.read_text().splitlines())
            return int(fields["syscw"])

        with httpx.Client(base_url=proc.url, timeout=60) as client:
            body = {"model": "dyn", "inputs": ["a fine film"]}
            assert client.post("/v1/classify", json=body).status_code == 200
            before = writes()
            for _ in range(20):
                assert client.post("/v1/classify", json=body).status_code == 200
            assert client.get("/health").status_code == 200
            assert writes() - before == 21


def test_a_client_gone_before_its_request_waits_is_called_back_at_once() -> None:
    """The connection can be lost while the body is parsed, before the request registers
    for the news: the mark the loss left makes the registration call back at once."""
    from dynprompt.service.connections import GONE, ON_GONE, on_client_gone

    calls: list[str] = []
    waiting: dict[str, Any] = {}
    on_client_gone(waiting, lambda: calls.append("waiting"))
    assert calls == [] and callable(waiting[ON_GONE])
    gone: dict[str, Any] = {GONE: True}
    on_client_gone(gone, lambda: calls.append("gone"))
    assert calls == ["gone"] and ON_GONE not in gone
