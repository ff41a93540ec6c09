"""End to end: the real server, scraped by a real Prometheus with the shipped config and alert
rules, answers every dashboard and alert query after real traffic (successes, errors, 429s).

The server is started with the Dockerfile's own command (`dynprompt serve`); Prometheus is the
`prometheus` binary (Debian package `prometheus`). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy_util import (
    ALERT_RULES,
    DOCKERFILE_CPU,
    GPU_ONLY_METRICS,
    PROMETHEUS_CONFIG,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    dockerfile_server_command,
    metrics_in,
    venv_tool,
)

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus binary not installed (Debian package `prometheus`)"
    ),
]

READY_TIMEOUT_S = 180
BURST_REQUESTS = 64
BURST_INPUTS = 32


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM the process group we started (the server drains), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def tail(path: Path, lines: int = 60) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


def wait_http_ok(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{what} exited with {proc.returncode} before {url} was ready:\n{tail(log)}"
            )
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"{what}: {url} not ready after {timeout_s:.0f}s ({last}):\n{tail(log)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    command = dockerfile_server_command(DOCKERFILE_CPU)
    executable = venv_tool(command[0])
    assert executable, f"{command[0]!r} (the Dockerfile's ENTRYPOINT) is not installed in this venv"
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNPROMPT_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [
        executable,
        *command[1:],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-queue-requests",
        "4",
        "--max-wait-ms",
        "50",
        "--max-client-batch-size",
        str(BURST_INPUTS * 2),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_http_ok(
            f"http://127.0.0.1:{port}/ready", proc, log, READY_TIMEOUT_S, "dynprompt serve"
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        print(f"--- server log (tail) ---\n{tail(log)}")


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the shipped `dynprompt` job and rules, retargeted at the test server."""
    assert PROMETHEUS is not None
    workdir = tmp_path_factory.mktemp("prometheus")
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = copy.deepcopy(next(j for j in shipped["scrape_configs"] if j["job_name"] == "dynprompt"))
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": shipped["rule_files"],
        "scrape_configs": [job],
    }
    for rule_file in shipped["rule_files"]:
        shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, workdir / rule_file)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    port = free_port()
    log = workdir / "prometheus.log"
    args = [
        PROMETHEUS,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/-/ready", proc, log, 60, "prometheus")
        wait_until(lambda: query(url, 'up{job="dynprompt"} == 1'), 30, "target never came up")
        yield url
    finally:
        stop(proc, grace_s=10)
        print(f"--- prometheus log (tail) ---\n{tail(log)}")


def prom_api(url: str, path: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    body = response.json()
    assert body.get("status") == "success", f"/api/v1/{path} {params}: {body}"
    return body["data"]


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    return prom_api(url, "query", **params)["result"]


def wait_until(check: Any, timeout_s: float, message: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{message} (after {timeout_s}s)")


def send_traffic(base: str) -> tuple[str, Counter[int], float]:
    """Valid requests, each kind of client error, and bursts past the queue; returns the model
    name, the status codes seen on /v1/classify, and when the traffic started."""
    statuses: Counter[int] = Counter()
    started = time.time()
    limits = httpx.Limits(max_connections=BURST_REQUESTS + 8)
    with httpx.Client(base_url=base, timeout=120, limits=limits) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        names = [card["name"] for card in models.json()["models"]]
        assert names, "the server lists no model"
        model = "sst2" if "sst2" in names else names[0]

        def classify(**kwargs: Any) -> httpx.Response:
            response = client.post("/v1/classify", **kwargs)
            statuses[response.status_code] += 1
            return response

        def burst_one(i: int) -> int:
            inputs = [f"review {i}-{j}: " + "a rather good film " * (1 + j % 6) for j in range(32)]
            response = classify(json={"model": model, "inputs": inputs})
            if response.status_code == 429:
                assert response.headers.get("retry-after"), "429 without Retry-After"
            return response.status_code

        for phase in range(2):
            for _ in range(10):
                ok = classify(json={"model": model, "inputs": ["a great movie", "awful"]})
                assert ok.status_code == 200, ok.text
                assert len(ok.json()["results"]) == 2
            unknown = classify(json={"model": "no-such-model", "inputs": ["a great movie"]})
            assert unknown.status_code == 404, unknown.text
            empty = classify(json={"model": model, "inputs": [""]})
            assert empty.status_code == 422, empty.text
            malformed = classify(
                content=b'{"model": "' + model.encode() + b'", "inputs": [',
                headers={"content-type": "application/json"},
            )
            assert malformed.status_code == 400, malformed.text
            with ThreadPoolExecutor(max_workers=BURST_REQUESTS) as pool:
                list(pool.map(burst_one, range(BURST_REQUESTS)))
            if phase == 0:
                time.sleep(3)  # several scrapes between the phases, so rates see increases
    return model, statuses, started


def test_dashboard_and_alert_queries_on_live_server(server: str, prometheus: str) -> None:
    model, statuses, started = send_traffic(server)
    assert statuses[429] > 0, f"the bursts never filled the queue: {dict(statuses)}"
    assert statuses[200] > 0

    # Wait for a scrape that follows all the traffic, then a few rule evaluations.
    traffic_end = time.time()
    wait_until(
        lambda: any(
            float(s["value"][1]) > traffic_end + 1
            for s in query(prometheus, 'timestamp(up{job="dynprompt"})')
        ),
        30,
        "no scrape after the traffic",
    )
    time.sleep(3)
    now = time.time()
    window = f"{int(now - started) + 15}s"  # every rate window covers all the traffic

    # The server counted what the client saw.
    counted = {
        s["metric"].get("status"): float(s["value"][1])
        for s in query(prometheus, "sum by (status) (dynprompt_requests_total)", now)
    }
    for status, seen in statuses.items():
        assert counted.get(str(status), 0) >= seen, f"status {status}: {counted} < client {seen}"

    # The dashboard's `model` variable lists the model.
    values = prom_api(prometheus, "label/model/values", **{"match[]": "dynprompt_requests_total"})
    assert model in values

    # Every dashboard query parses and returns data, for All models and for the one model
    # (as a repeated per-model panel queries it). The GPU memory panel alone may be empty:
    # the gauge exists only on a GPU server.
    empty = []
    for model_value in (".*", model):
        for title, expr in dashboard_expressions(rate_interval=window, model=model_value):
            if model_value != ".*" and "model=~" not in expr:
                continue
            result = query(prometheus, expr, now)
            if not result and not GPU_ONLY_METRICS & set(metrics_in(expr)):
                empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)

    # Every alert expression evaluates; the rules loaded and evaluate without error.
    for _name, expr in alert_expressions():
        query(prometheus, expr, now)
    groups = prom_api(prometheus, "rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule["alert"] for rule in alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    firing = {a["labels"]["alertname"] for a in prom_api(prometheus, "alerts")["alerts"]}
    assert "DynpromptTargetDown" not in firing
    assert ALERT_RULES.name in {Path(g["file"]).name for g in groups}
