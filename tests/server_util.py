"""Start `dynprompt serve` as a real subprocess on a free loopback port, for tests that speak HTTP.

    server = start_server(["--model-repository", str(repo)])   # returns once /ready is 200
    httpx.post(server.url + "/v1/classify", json=...)
    server.stop()                                                # SIGTERM, drain, exit code

Logs go to a file (`server.log_path`, `server.logs()`, `server.log_records()` for the JSON
lines). `build_repository` writes small seeded checkpoints over the real MiniLM backbone, so
tests never depend on the shipped default model.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from dynprompt.models import (
    Backbone,
    DynPromptModel,
    RowResult,
    load_backbone,
    make_config,
    predict,
    save_checkpoint,
)
from dynprompt.service.protocol import Answer

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_LIVE: list[ServerProcess] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(eq=False)
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (other lines, e.g. progress bars, skipped)."""
        out = []
        for line in self.logs().splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /ready until 200; raise with the log's tail if the server dies or times out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"server exited with {self.process.returncode} before ready:\n{self._tail()}"
                    )
                try:
                    if client.get(self.url + "/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self._tail()}")

    def terminate(self) -> None:
        """Send SIGTERM (the server drains, then exits); does not wait."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it will not go. Returns the exit code."""
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        if self in _LIVE:
            _LIVE.remove(self)
        return code

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    wait: bool = True,
    timeout: float = 120.0,
    log_dir: str | Path | None = None,
) -> ServerProcess:
    """`dynprompt serve ARGS --host 127.0.0.1 --port <free>`; with `wait`, returns once ready.

    `env` adds to (and overrides) this process's environment. A port taken between choosing
    and binding it is retried on another port.
    """
    log_dir = (
        Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="dynprompt-serve-"))
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for attempt in range(3):
        port = free_port()
        log_path = log_dir / f"server-{port}.log"
        command = [
            sys.executable,
            "-m",
            "dynprompt.cli",
            "serve",
            *args,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
            )
        server = ServerProcess(process, port, log_path, list(args))
        _LIVE.append(server)
        if not wait:
            return server
        try:
            server.wait_ready(timeout)
            return server
        except RuntimeError:
            server.kill()
            _LIVE.remove(server)
            if "address already in use" in server.logs() and attempt < 2:
                continue
            raise
        except TimeoutError:
            server.kill()
            _LIVE.remove(server)
            raise
    raise AssertionError("unreachable")


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


# --------------------------------------------------------------------------- test checkpoints


@functools.cache
def minilm() -> Backbone:
    """The real MiniLM backbone, loaded once per test session (CPU, fp32)."""
    return load_backbone("minilm")


# name -> make_config choices. Prompt length 8 keeps the tests quick.
TEST_MODELS: dict[str, dict[str, Any]] = {
    "ipos": {
        "variant": "instance_position",
        "feature": "backbone",
        "labels": ["negative", "positive"],
    },
    "dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]},
    "pre": {"variant": "prefix", "feature": "embeddings", "labels": ["negative", "positive"]},
    "ilen": {
        "variant": "instance_length",
        "feature": "embeddings",
        "labels": ["negative", "neutral", "positive"],
        "max_length": 24,
    },
    "pair": {
        "variant": "instance_position",
        "feature": "embeddings",
        "labels": ["entailment", "not_entailment"],
        "pair_field": "hypothesis",
        "text_field": "premise",
    },
    "probe": {"variant": "linear_probe", "labels": ["negative", "positive"]},
}


def build_model(
    name: str, backbone: Backbone, seed: int = 0, prompt_length: int = 8, **choices: Any
) -> DynPromptModel:
    """A seeded random model; router weights scaled up so that argmax decisions vary across
    inputs and sit far from ties (numerical noise of batching cannot flip them)."""
    torch.manual_seed(seed)
    config = make_config(
        name=name, backbone=backbone.spec(), prompt_length=prompt_length, **choices
    )
    model = DynPromptModel(config, backbone)
    for layer in (model.routers.position, model.routers.length, model.routers.pool):
        if layer is not None:
            torch.nn.init.normal_(layer.weight, std=0.5)
    return model.eval()


def build_repository(
    directory: str | Path,
    backbone: Backbone | None = None,
    models: dict[str, dict[str, Any]] | None = None,
) -> dict[str, DynPromptModel]:
    """Write one checkpoint folder per entry of `models` (default TEST_MODELS) under `directory`."""
    backbone = backbone if backbone is not None else minilm()
    out = {}
    for seed, (name, choices) in enumerate((models or TEST_MODELS).items()):
        model = build_model(name, backbone, seed=seed, **choices)
        save_checkpoint(model, Path(directory) / name)
        out[name] = model
    return out


# --------------------------------------------------------------------------- expected answers

Input = str | dict[str, str]


def offline_predictions(model: DynPromptModel, inputs: Sequence[Input]) -> list[RowResult]:
    """What the core model predicts offline for these inputs: the reference answers."""
    texts = [i if isinstance(i, str) else i["text"] for i in inputs]
    pairs = [None if isinstance(i, str) else i.get("text_pair") for i in inputs]
    return predict(model, texts, pairs if any(p is not None for p in pairs) else None)


def assert_result_matches(
    got: dict[str, Any], want: RowResult, labels: list[str], tol: float = 1e-4
) -> None:
    """One result of the server against the offline prediction: label, score, routing."""
    best = max(range(len(want.probs)), key=want.probs.__getitem__)
    assert got["label"] == labels[best], (got, want)
    assert abs(got["score"] - want.probs[best]) < tol, (got, want)
    if "scores" in got:
        assert list(got["scores"]) == labels
        for label, p in zip(labels, want.probs, strict=True):
            assert abs(got["scores"][label] - p) < tol, (got, want)
    if "routing" in got:
        routing = got["routing"]
        assert routing["prompt_length"] == want.prompt_length, (got, want)
        assert routing["tokens_before"] == want.tokens_before, (got, want)
        assert routing["tokens_after"] == want.prompt_length - want.tokens_before
        if want.pool_weights is None:
            assert "pool_weights" not in routing
        else:
            assert len(routing["pool_weights"]) == len(want.pool_weights)
            for a, b in zip(routing["pool_weights"], want.pool_weights, strict=True):
                assert abs(a - b) < tol


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    return parse_metrics(httpx.get(url + "/metrics", timeout=30).text)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


class Collect:
    """A reply target of the engine core (in-process tests) that keeps every answer by ticket."""

    def __init__(self) -> None:
        self.answers: dict[int, Answer] = {}
        self.cond = threading.Condition()

    def deliver(self, answers: list[Answer]) -> None:
        with self.cond:
            for answer in answers:
                self.answers[answer.ticket] = answer
            self.cond.notify_all()

    def wait(self, ticket: int, timeout: float = 60) -> Answer:
        with self.cond:
            assert self.cond.wait_for(lambda: ticket in self.answers, timeout), "no answer"
            return self.answers[ticket]
