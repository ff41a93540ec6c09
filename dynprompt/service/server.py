"""Running the server: one process, or HTTP processes in front of an engine process.

`serve_single` (`--workers 1`, the default on a CPU): uvicorn and the engine core share
one process; the core's threads run the batches. `supervise` (`--workers N`): this
process binds the port, starts one engine-core process and N HTTP processes that share
the port, and watches them (an HTTP process that dies is restarted; if the core dies,
the requests waiting on it get 503 and the server stops with exit 1). They watch it in
turn: if this process is killed, they drain and exit instead of keeping the port.

SIGHUP rescans the model repository (as `POST /v1/admin/reload` does). SIGTERM (or
Ctrl-C) starts a drain: `/ready` and new classify requests answer 503, requests already
admitted finish (up to `--drain-timeout-s`), uploads still arriving are answered 503,
then the server exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn

from dynprompt.service import errors
from dynprompt.service.config import Settings
from dynprompt.service.connections import (
    guarded_protocol,
    raise_fd_limit,
)
from dynprompt.service.engine import Admission, CoreHandle, Engine, SharedCounts
from dynprompt.service.logs import configure_logging
from dynprompt.service.threadnames import CORE, LOOP, SUPERVISE, TOKENIZE, name_this_thread
from dynprompt.service.transport import PEER_CHECK_S

log = logging.getLogger("dynprompt.service")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before shutting down."""

    def __init__(
        self,
        config: uvicorn.Config,
        engine: Engine,
        drain_timeout_s: float,
        reload_on_hup: bool = False,
        ignore_sigint: bool = False,
        parent: int | None = None,
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.reload_on_hup = reload_on_hup
        self.ignore_sigint = ignore_sigint
        self.parent = parent  # the supervisor's pid (--workers N): drain if it goes away
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.reload_on_hup:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if self.parent is not None:
            self._spawn(self._watch_parent(self.parent))
        await super().serve(sockets)

    async def _watch_parent(self, parent: int) -> None:
        """Drain and exit when the supervisor is gone (killed with SIGKILL, say): nothing
        would restart this process or stop it, and it would keep the port."""
        while os.getppid() == parent:
            await asyncio.sleep(PEER_CHECK_S)
        log.warning("the supervisor (pid %d) is gone; draining and exiting", parent)
        self.handle_exit(signal.SIGTERM, None)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: rescanning the model repository")
        self._spawn(self._reload())

    async def _reload(self) -> None:
        try:
            await self.engine.reload()
        except errors.ServiceError as exc:
            log.warning("SIGHUP reload not done: %s", exc.message)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.ignore_sigint:
            return  # the supervisor got it too, and drains every process with SIGTERM
        if self._draining or self._loop is None:
            if self._draining:
                log.warning("second signal: stopping without waiting for in-flight requests")
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._drain(sig)))

    async def _drain(self, sig: int) -> None:
        name = signal.Signals(sig).name
        log.info("%s: draining (new requests get 503, in-flight ones finish)", name)
        finished = await self.engine.drain(self.drain_timeout_s)
        if finished:
            log.info("drained: no request in flight; shutting down")
        else:
            log.warning("drain timeout (%gs) reached with requests in flight", self.drain_timeout_s)
        self.should_exit = True

    def fail(self) -> None:
        """The models cannot be served: exit non-zero."""
        self.exit_code = 1
        self.should_exit = True


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop where installed
        log_config=None,
        access_log=False,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=10,
        server_header=False,
        date_header=False,
        proxy_headers=False,  # nothing here reads the client's address
        http=guarded_protocol(
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            body_timeout_s=settings.body_timeout_s,
            max_connections=min(settings.max_connections, raise_fd_limit() - 64),
        ),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


def settle_heap() -> None:
    """Take everything loaded so far out of the garbage collector's sight.

    torch, transformers and the models leave millions of long-lived objects; without this,
    the collector re-walks them while requests allocate, which measured about an eighth
    of the event loop's CPU. Requests' own garbage is still collected (a larger young
    generation makes that less frequent too).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def start_tokenizer_pool() -> None:
    """Start the fast tokenizer's thread pool (Rust's rayon, one per process) from a thread
    named `TOKENIZE`, whose name its threads inherit. Started by whichever thread first
    tokenises a batch, they would carry that thread's name: the model loader's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    def start() -> None:
        name_this_thread(TOKENIZE)
        Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")).encode_batch(["a", "b"])

    thread = threading.Thread(target=start, name="dynprompt-tokenize-pool")
    thread.start()
    thread.join()


def prepare_threads(settings: Settings) -> None:
    """Thread pools of the process that computes: torch's, and the fast tokenizer's.

    The tokenizer's pool sizes itself from `RAYON_NUM_THREADS` when it starts, here,
    before any model loads.
    """
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    if settings.tokenizer_threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(settings.tokenizer_threads)
    start_tokenizer_pool()
    hf_logging.disable_progress_bar()  # the weight-loading bar is not a log line


# --------------------------------------------------------------------------- one process


def serve_single(settings: Settings) -> int:
    """HTTP and the engine core in this process."""
    from dynprompt.service.app import create_app
    from dynprompt.service.core import EngineCore, backbone_loader
    from dynprompt.service.transport import LocalCore

    prepare_threads(settings)
    admission = Admission(settings.max_queue_requests)
    engine = Engine(settings, admission)
    servers: list[DrainingServer] = []  # made below; the loader's failure stops it

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[CoreHandle]:
        core = EngineCore(settings, backbone_loader(settings), admission.value)
        handle = LocalCore(core, asyncio.get_running_loop())

        def loaded(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                hint = (
                    ""
                    if settings.model_repository is not None
                    else " (the shipped default model; serve another with --model-repository DIR)"
                )
                log.error(
                    "cannot serve the model repository %s%s: %s",
                    settings.repository, hint, task.exception(),
                )  # fmt: skip
                servers[0].fail()

        loading = asyncio.ensure_future(asyncio.to_thread(core.load, settings.repository))
        loading.add_done_callback(loaded)
        loading.add_done_callback(lambda _: settle_heap())
        try:
            yield handle
        finally:
            await handle.close()

    server = DrainingServer(
        uvicorn_config(settings, create_app(settings, engine, connect)),
        engine,
        settings.drain_timeout_s,
        reload_on_hup=True,
    )
    servers.append(server)
    name_this_thread(LOOP)
    server.run()
    return server.exit_code


# --------------------------------------------------------------------------- several


def _core_process(settings: Settings, address: str, shared: SharedCounts, parent: int) -> None:
    name_this_thread(CORE)
    configure_logging(settings.log_level, settings.log_format)
    from dynprompt.service.core import EngineCore, backbone_loader
    from dynprompt.service.transport import serve_core

    prepare_threads(settings)
    core = EngineCore(settings, backbone_loader(settings), lambda: float(shared.total()))

    def load() -> None:
        core.load(settings.repository)
        settle_heap()

    sys.exit(serve_core(core, address, load, parent, settings.drain_timeout_s + 5))


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT: every HTTP process binds its own, and
    the kernel spreads new connections over them evenly (one shared listening socket lets
    whichever process wakes first take a whole burst)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    return sock


def _front_process(
    settings: Settings,
    port: int,
    address: str,
    shared: SharedCounts,
    slot: int,
    parent: int,
    core: int,
) -> None:
    configure_logging(settings.log_level, settings.log_format)
    # This process tokenises its own requests (`pretokenize`) in the calling thread: a pool
    # of the tokenizer's threads per HTTP process would cost more CPU in wake-ups than it
    # saves on the few rows of a request, and the other cores serve the other processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from dynprompt.service.app import create_app
    from dynprompt.service.pretokenize import Pretokenizer
    from dynprompt.service.transport import RemoteCore

    engine = Engine(settings, Admission(settings.max_queue_requests, shared, slot))

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[CoreHandle]:
        handle = RemoteCore(address, core_pid=core)
        engine.pretokenizer = Pretokenizer()
        refresh = asyncio.ensure_future(engine.pretokenizer.keep_fresh(handle))
        settle_heap()
        try:
            yield handle
        finally:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
            await handle.close()

    server = DrainingServer(
        uvicorn_config(settings, create_app(settings, engine, connect)),
        engine,
        settings.drain_timeout_s,
        ignore_sigint=True,
        parent=parent,
    )
    name_this_thread(LOOP)
    server.run(sockets=[reuseport_socket(settings.host, port)])
    sys.exit(server.exit_code)


def supervise(settings: Settings, workers: int) -> int:
    """Bind, start the core and `workers` HTTP processes, and watch them until a signal."""
    name_this_thread(SUPERVISE)
    spawn = multiprocessing.get_context("spawn")
    # Bound (not listening) for as long as the server runs: the port is taken now, so a
    # clash fails here, and every HTTP process binds it again beside this one.
    sock = reuseport_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="dynprompt-")  # 0700: only this user reaches the core
    address = f"ipc://{folder}/core"
    shared = SharedCounts.create(spawn, workers, folder)  # requests admitted, per process
    core = spawn.Process(
        target=_core_process,
        args=(settings, address, shared, os.getpid()),
        name="dynprompt-core",
    )
    core.start()

    def front(slot: int) -> multiprocessing.process.BaseProcess:
        process = spawn.Process(
            target=_front_process,
            args=(settings, port, address, shared, slot, os.getpid(), core.pid),
            name="dynprompt-http",
        )
        process.start()
        return process

    fronts = [front(slot) for slot in range(workers)]
    log.info(
        "serving on %s:%d with %d HTTP processes (pids %s) and engine process %d",
        settings.host, port, workers,
        ", ".join(str(p.pid) for p in fronts), core.pid,
    )  # fmt: skip
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping:
            log.warning("second signal: stopping without waiting for in-flight requests")
            for process in [*fronts, core]:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGKILL)
            return
        stopping.append(signum)
        log.info("%s: draining every HTTP process", signal.Signals(signum).name)
        for process in fronts:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        log.info("SIGHUP: rescanning the model repository")
        if core.is_alive() and core.pid is not None:
            os.kill(core.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    code = 0
    restarts: list[float] = []  # when HTTP processes were restarted
    try:
        while True:
            time.sleep(0.1)
            if not core.is_alive() and not stopping:
                log.error("the engine process exited with %s; stopping", core.exitcode)
                code = 1
                for process in fronts:
                    process.terminate()
                break
            if stopping:
                if not any(p.is_alive() for p in fronts):
                    break
                continue
            for i, process in enumerate(fronts):
                if not process.is_alive():
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < 60] + [now]
                    if len(restarts) > 2 * workers:
                        log.error("HTTP processes keep exiting; stopping")
                        code = 1
                        stopping.append(signal.SIGTERM)
                        for other in fronts:
                            other.terminate()
                        break
                    log.error("HTTP process %s exited with %s; restarting", process.pid,
                              process.exitcode)  # fmt: skip
                    shared.free(i)  # its requests died with it
                    fronts[i] = front(i)
    finally:
        for process in fronts:
            process.join(30)
        if core.is_alive() and core.pid is not None:
            os.kill(core.pid, signal.SIGTERM)
        core.join(30)
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)
    return code
