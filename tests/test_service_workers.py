"""`--workers 2`: two HTTP processes in front of one engine process, over real HTTP.

Each test opens many connections, so both HTTP processes serve some of them (the access
log names the process of every request); the rules of DESIGN §4 must hold for the server
as a whole: one admission limit, one drain, one reload, one count per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel, save_checkpoint, weights_checksum
from dynprompt.service.engine import Admission, SharedCounts
from tests.server_util import (
    ServerProcess,
    assert_result_matches,
    build_model,
    build_repository,
    offline_predictions,
    sample,
    scrape,
    start_server,
)

Repo = tuple[Path, dict[str, DynPromptModel]]
MODELS = {
    "ipos": {"variant": "instance_position", "feature": "backbone", "labels": ["neg", "pos"]},
    "pre": {"variant": "prefix", "feature": "embeddings", "labels": ["neg", "pos"]},
}
TEXTS = [f"sentence {i}: a {'fine' if i % 2 else 'dull'} film about {i} people" for i in range(24)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Repo:
    path = tmp_path_factory.mktemp("repo")
    return path, build_repository(path, minilm, MODELS)


@pytest.fixture(scope="module")
def server(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        ["--model-repository", str(repo[0]), "--workers", "2", "--max-wait-ms", "20"],
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


async def _post_each(url: str, bodies: list[dict[str, Any]], errors_too: bool) -> list[Any]:
    async def one(body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await client.post("/v1/classify", json=body)

    return list(await asyncio.gather(*(one(b) for b in bodies), return_exceptions=errors_too))


def one_connection_each(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Every body on its own connection, all at once."""
    return asyncio.run(_post_each(url, bodies, errors_too=False))


def in_flight(
    server: ServerProcess, bodies: list[dict[str, Any]], errors_too: bool = False
) -> tuple[threading.Thread, list[list[Any]]]:
    """Send every body on its own connection from a thread, and return once the server has
    admitted them all. The thread leaves its list of responses in the returned list (with
    `errors_too`, a connection that broke leaves its exception instead)."""
    answers: list[list[Any]] = []
    sender = threading.Thread(
        target=lambda: answers.append(asyncio.run(_post_each(server.url, bodies, errors_too)))
    )
    sender.start()
    deadline = time.monotonic() + 30
    while sample(scrape(server.url), "dynprompt_queue_depth") < len(bodies):
        assert time.monotonic() < deadline, "requests never got in flight"
        time.sleep(0.05)
    return sender, answers


def processes_that_answered(server: ServerProcess, status: int = 200) -> set[int]:
    return {
        rec["pid"]
        for rec in server.log_records()
        if rec.get("path") == "/v1/classify" and rec.get("status") == status
    }


def engine_core_process(server: ServerProcess) -> int:
    """The pid of the server's engine core: its one child that loaded torch."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    (core,) = [pid for pid in children if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]
    return int(core)


def http_processes(server: ServerProcess) -> list[int]:
    """The pids of the server's HTTP processes: spawned children without torch (the other
    children are the engine core and multiprocessing's resource tracker)."""
    found = []
    for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split():
        try:
            spawned = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            if spawned and "libtorch" not in Path(f"/proc/{pid}/maps").read_text():
                found.append(int(pid))
        except FileNotFoundError:  # exited meanwhile
            continue
    return found


def test_answers_equal_offline_from_both_processes(server: ServerProcess, repo: Repo) -> None:
    models = repo[1]
    bodies = [
        {"model": ("ipos", "pre")[i % 2], "inputs": [text], "return_routing": True}
        for i, text in enumerate(TEXTS)
    ]
    responses = one_connection_each(server.url, bodies)
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        model = models[body["model"]]
        (want,) = offline_predictions(model, body["inputs"])
        assert_result_matches(response.json()["results"][0], want, model.labels)
    assert len(processes_that_answered(server)) == 2


def test_the_http_processes_tokenise_their_requests(server: ServerProcess) -> None:
    """The engine core gets rows, not texts: every row is counted as tokenised by `http`."""

    def tokenized() -> tuple[float, float]:
        metrics, name = scrape(server.url), "dynprompt_tokenized_rows_total"
        return sample(metrics, name, where="http"), sample(metrics, name, where="engine")

    deadline = time.monotonic() + 30
    while tokenized()[0] == 0:  # both HTTP processes take the specs right after loading
        one_connection_each(server.url, [{"model": "pre", "inputs": TEXTS[:2]}] * 4)
        assert time.monotonic() < deadline, "the HTTP processes never tokenised"
    time.sleep(0.5)  # the other process's first refresh
    http, engine = tokenized()
    bodies = [{"model": ("ipos", "pre")[i % 2], "inputs": TEXTS[: 1 + i % 6]} for i in range(16)]
    assert all(r.status_code == 200 for r in one_connection_each(server.url, bodies))
    rows = sum(len(b["inputs"]) for b in bodies)
    assert tokenized() == (http + rows, engine)
    assert len(processes_that_answered(server)) == 2


def test_every_request_is_counted_exactly_once(server: ServerProcess) -> None:
    before = scrape(server.url)
    bodies: list[dict[str, Any]] = [{"model": "pre", "inputs": [t]} for t in TEXTS[:10]]
    bodies += [{"model": "ghost", "inputs": ["x"]}] * 4  # 404
    bodies += [{"model": "ipos", "inputs": [""]}] * 3  # 422
    statuses = [r.status_code for r in one_connection_each(server.url, bodies)]
    assert statuses == [200] * 10 + [404] * 4 + [422] * 3
    for _ in range(3):  # any process's /metrics shows the whole server's counts
        after = scrape(server.url)
        for model, status, count in (
            ("pre", "200", 10),
            ("_unknown", "404", 4),
            ("ipos", "422", 3),
        ):
            got = sample(after, "dynprompt_requests_total", model=model, status=status)
            assert (
                got - sample(before, "dynprompt_requests_total", model=model, status=status)
                == count
            )
        assert sample(after, "dynprompt_queue_depth") == 0


def test_process_metrics_are_the_engine_cores(server: ServerProcess) -> None:
    """`process_*` series describe the engine-core process (the one that loaded torch),
    whichever HTTP process answers the scrape: its CPU is what bounds a device's feed."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    core = [pid for pid in children if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]
    assert len(core) == 1, children
    fronts = [pid for pid in children if pid not in core]
    assert fronts

    def vsize(pid: str) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[20])

    for _ in range(4):  # several scrapes: both HTTP processes answer some
        scraped = sample(scrape(server.url), "process_virtual_memory_bytes")
        assert abs(scraped - vsize(core[0])) <= 0.05 * vsize(core[0])
        for pid in fronts:
            assert abs(scraped - vsize(pid)) > 0.05 * vsize(pid)
    assert sample(scrape(server.url), "process_cpu_seconds_total") > 0


def test_a_scrape_does_not_wait_for_a_stopped_http_process(repo: Repo, tmp_path: Path) -> None:
    """Before rendering, the core asks every other HTTP process to flush its requests'
    records; one that cannot answer (here: stopped) delays a scrape by the fence's
    timeout once, is logged, and is not waited for again until it speaks."""
    with start_server(
        ["--model-repository", str(repo[0]), "--workers", "2", "--max-wait-ms", "5"],
        log_dir=tmp_path,
    ) as proc:
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:16]]
        assert [r.status_code for r in one_connection_each(proc.url, bodies)] == [200] * 16
        answered = sorted(processes_that_answered(proc))
        assert len(answered) == 2
        assert sample(scrape(proc.url), "dynprompt_requests_total", model="pre", status="200") == 16
        stopped = answered[0]
        os.kill(stopped, signal.SIGSTOP)
        try:
            text = None
            for _ in range(30):  # a new connection may be handed to the stopped process
                try:
                    text = httpx.get(proc.url + "/metrics", timeout=3).text
                    break
                except httpx.TimeoutException:
                    continue
            assert text is not None, "no scrape was answered while one process was stopped"
            assert 'dynprompt_requests_total{model="pre",status="200"} 16.0' in text
        finally:
            os.kill(stopped, signal.SIGCONT)
        warned = [r for r in proc.log_records() if "did not flush their records" in r["msg"]]
        assert len(warned) == 1
        more = [{"model": "pre", "inputs": [t]} for t in TEXTS[16:24]]
        assert [r.status_code for r in one_connection_each(proc.url, more)] == [200] * 8
        assert sample(scrape(proc.url), "dynprompt_requests_total", model="pre", status="200") == 24


def test_a_killed_http_process_leaves_nothing_behind(repo: Repo, tmp_path: Path) -> None:
    """An HTTP process that dies with requests in flight (SIGKILL) takes them with it: the
    core drops their queued rows instead of computing them, their admission permits come
    back when the supervisor restarts the process (queue depth 0, the full limit again),
    and no later scrape waits for the dead process."""
    with start_server(
        [
            "--model-repository", str(repo[0]), "--workers", "2",
            "--max-wait-ms", "3000", "--max-batch-size", "64", "--max-queue-requests", "16",
        ],
        log_dir=tmp_path,
    ) as proc:  # fmt: skip
        fronts = http_processes(proc)
        assert len(fronts) == 2, fronts
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:16]]
        sender, answers = in_flight(proc, bodies, errors_too=True)
        os.kill(fronts[0], signal.SIGKILL)  # within the 3 s its rows wait for a batch
        sender.join(60)
        (responses,) = answers
        served = [r for r in responses if isinstance(r, httpx.Response)]
        lost = len(responses) - len(served)
        assert [r.status_code for r in served] == [200] * len(served)
        assert 0 < lost < len(bodies), "both processes should have held some of the requests"

        deadline = time.monotonic() + 60
        while len(http_processes(proc)) < 2:
            assert time.monotonic() < deadline, "the killed HTTP process was not restarted"
            time.sleep(0.1)
        metrics = scrape(proc.url)
        assert sample(metrics, "dynprompt_queue_depth") == 0  # the dead process's permits
        assert sample(metrics, "dynprompt_batch_size_sum") == len(served)  # lost rows not run
        messages = [r["msg"] for r in proc.log_records()]
        dropped = [m for m in messages if "exited with" in m and "in flight" in m]
        assert dropped == [f"an HTTP process exited with {lost} requests in flight; "
                           "dropped their rows that had not started"]  # fmt: skip
        assert not any("did not flush" in m for m in messages)  # no scrape waited for it
        again = one_connection_each(proc.url, bodies)  # the whole limit is there again
        assert [r.status_code for r in again] == [200] * len(bodies)


def test_without_its_supervisor_the_server_drains_and_frees_the_port(
    repo: Repo, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor (nothing can catch it) must not leave the HTTP processes
    and the engine core running on: they notice, finish the requests in flight, exit, and
    the port is free again."""
    proc = start_server(
        [
            "--model-repository", str(repo[0]), "--workers", "2",
            "--max-wait-ms", "1500", "--max-batch-size", "64",
        ],
        log_dir=tmp_path,
    )  # fmt: skip
    try:
        served = [*http_processes(proc), engine_core_process(proc)]
        assert len(served) == 3, served  # two HTTP processes and the engine core
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:8]]
        sender, answers = in_flight(proc, bodies)
        proc.kill()  # SIGKILL: the supervisor cannot drain anything
        sender.join(60)
        (responses,) = answers
        assert [r.status_code for r in responses] == [200] * len(bodies)

        def running(pid: int) -> bool:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                return False
            return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited

        deadline = time.monotonic() + 60
        while any(running(pid) for pid in served):
            assert time.monotonic() < deadline, "processes outlived their supervisor"
            time.sleep(0.1)
        with socket.socket() as probe:  # no process listens on the port any more
            # As a restarted server binds (uvicorn sets SO_REUSEADDR): connections the
            # server closed first linger in TIME_WAIT on this port, and without the option
            # they alone refuse the bind (seen once in CI); a listener still refuses it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", proc.port))
            probe.listen()
        messages = [r["msg"] for r in proc.log_records()]
        assert sum("is gone; draining and exiting" in m for m in messages) == 2
        assert sum("is gone; stopping once the HTTP processes" in m for m in messages) == 1
    finally:
        proc.stop()


def test_requests_in_flight_get_503_when_the_engine_core_dies(repo: Repo, tmp_path: Path) -> None:
    """If the engine core dies, the requests waiting on it are answered 503 at once (not
    left hanging until the drain times out), and the server exits 1."""
    proc = start_server(
        [
            "--model-repository", str(repo[0]), "--workers", "2",
            "--max-wait-ms", "3000", "--max-batch-size", "64", "--drain-timeout-s", "60",
        ],
        log_dir=tmp_path,
    )  # fmt: skip
    try:
        core = engine_core_process(proc)
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:8]]
        sender, answers = in_flight(proc, bodies)
        os.kill(core, signal.SIGKILL)
        sender.join(30)  # well within the 60 s drain
        assert not sender.is_alive(), "requests hung after the engine core died"
        (responses,) = answers
        assert [r.status_code for r in responses] == [503] * len(bodies)
        for r in responses:
            error = r.json()["error"]
            assert error["type"] == "not_ready" and "engine process exited" in error["message"]
        assert proc.wait(60) == 1
    finally:
        proc.stop()


def _hold_the_lock(path: str, holding: Any) -> None:
    """In a child: take the admission lock as `Admission.try_acquire` does, and keep it."""
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    holding.set()
    time.sleep(60)


def test_admission_survives_a_process_killed_while_admitting(tmp_path: Path) -> None:
    """A process killed inside its few microseconds of admitting (the OOM killer, kill -9)
    must not leave the lock taken: the other processes would block on it forever, their
    event loops with them. The lock is a flock, which the kernel drops with its holder."""
    spawn = multiprocessing.get_context("spawn")
    shared = SharedCounts.create(spawn, 2, str(tmp_path))
    holding = spawn.Event()
    holder = spawn.Process(target=_hold_the_lock, args=(shared.lock_path, holding))
    holder.start()
    assert holding.wait(60), "the child never took the lock"
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    admission = Admission(2, shared, slot=0)
    admitted: list[bool] = []
    trying = threading.Thread(
        target=lambda: admitted.extend(admission.try_acquire() for _ in range(3)), daemon=True
    )
    trying.start()
    trying.join(10)
    assert admitted == [True, True, False]  # not blocked, and the limit still holds
    assert shared.total() == 2
    shared.free(0)
    assert shared.total() == 0 and admission.try_acquire()


def test_the_queue_limit_is_shared_by_the_processes(repo: Repo, tmp_path: Path) -> None:
    with start_server(
        [
            "--model-repository", str(repo[0]), "--workers", "2",
            "--max-queue-requests", "3", "--max-wait-ms", "3000", "--max-batch-size", "64",
        ],
        log_dir=tmp_path,
    ) as proc:  # fmt: skip
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:16]]
        responses = one_connection_each(proc.url, bodies)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 3 + [429] * 13, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "queue_full" and r.headers["retry-after"]
        refused = processes_that_answered(proc, 429)
        assert len(refused | processes_that_answered(proc)) == 2  # both processes took part


def test_sigterm_drains_every_process(repo: Repo, tmp_path: Path) -> None:
    models = repo[1]
    proc = start_server(
        [
            "--model-repository", str(repo[0]), "--workers", "2",
            "--max-wait-ms", "3000", "--max-batch-size", "64",
        ],
        log_dir=tmp_path,
    )  # fmt: skip
    try:
        bodies = [{"model": "pre", "inputs": [t]} for t in TEXTS[:12]]
        sender, answers = in_flight(proc, bodies)
        proc.terminate()
        sender.join(60)
        (responses,) = answers
        assert [r.status_code for r in responses] == [200] * len(bodies)
        for body, response in zip(bodies, responses, strict=True):
            (want,) = offline_predictions(models["pre"], body["inputs"])
            assert_result_matches(response.json()["results"][0], want, models["pre"].labels)
        assert proc.wait(60) == 0
        assert len(processes_that_answered(proc)) == 2  # in-flight work of both was finished
        messages = [rec["msg"] for rec in proc.log_records()]
        assert sum("SIGTERM: draining (new requests" in m for m in messages) == 2
    finally:
        proc.stop()


def test_reload_swaps_the_model_for_every_process(
    repo: Repo, tmp_path: Path, minilm: Backbone
) -> None:
    path = tmp_path / "repo"
    build_repository(path, minilm, {"pre": MODELS["pre"]})
    with start_server(
        ["--model-repository", str(path), "--workers", "2", "--max-wait-ms", "5"], log_dir=tmp_path
    ) as proc:
        replacement = build_model("pre", minilm, seed=99, **MODELS["pre"])
        save_checkpoint(replacement, path / "pre")
        r = httpx.post(proc.url + "/v1/admin/reload", timeout=120)
        assert r.status_code == 200 and r.json()["loaded"] == ["pre"], r.text
        version = weights_checksum(path / "pre")
        bodies = [{"model": "pre", "inputs": [t], "return_all_scores": True} for t in TEXTS[:16]]
        for response, body in zip(one_connection_each(proc.url, bodies), bodies, strict=True):
            (want,) = offline_predictions(replacement, body["inputs"])
            assert_result_matches(response.json()["results"][0], want, replacement.labels)
        assert len(processes_that_answered(proc)) == 2

        async def cards() -> list[str]:
            async def one() -> str:
                async with httpx.AsyncClient(base_url=proc.url, timeout=30) as client:
                    return str((await client.get("/v1/models/pre")).json()["version"])

            return list(await asyncio.gather(*(one() for _ in range(8))))

        assert set(asyncio.run(cards())) == {version}


def thread_names(pid: int | str) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return sorted((tasks / tid / "comm").read_text().strip() for tid in os.listdir(tasks))


def test_every_process_names_its_threads_by_role(server: ServerProcess) -> None:
    """`top -H` and `bench overhead` tell the roles apart: the supervisor, each HTTP
    process's event loop, and the engine core's socket, prepare, tokenizer and compute
    threads."""
    from benchmarks.loadgen import tree_cpu_seconds, tree_thread_cpu_seconds

    with httpx.Client(base_url=server.url, timeout=60) as client:
        for text in TEXTS[:4]:
            assert client.post("/v1/classify", json={"model": "pre", "inputs": [text]}).is_success
    assert Path(f"/proc/{server.pid}/comm").read_text().strip() == "dp-supervise"
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    names = {pid: thread_names(pid) for pid in children}
    core = [pid for pid, threads in names.items() if "dp-core" in threads]
    assert len(core) == 1, names
    for role in ("dp-prepare", "dp-compute", "dp-tokenize"):
        assert role in names[core[0]], names[core[0]]
    # The others: the two HTTP processes, and multiprocessing's resource tracker.
    fronts = [pid for pid in children if Path(f"/proc/{pid}/comm").read_text() == "dp-loop\n"]
    assert len(fronts) == 2, names
    for pid in fronts:
        assert not {"dp-prepare", "dp-compute", "dp-core"} & set(names[pid])
    by_name = tree_thread_cpu_seconds(server.pid)
    assert {"dp-supervise", "dp-core", "dp-loop", "dp-compute"} <= set(by_name)
    assert by_name["dp-compute"] > 0  # it has run this module's batches
    # Threads that have ended count in their process's total but in no thread's.
    assert 0 < sum(by_name.values()) <= tree_cpu_seconds(server.pid) + 0.05
