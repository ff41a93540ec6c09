"""How a front end reaches the engine core: in its own process, or over a local socket.

`LocalCore` wraps an `EngineCore` in the HTTP process (`--workers 1`): submissions
are method calls, answers come back from the core's threads through
`call_soon_threadsafe`, once per batch.

With `--workers N` the core runs in a process of its own (`serve_core`) behind a
ZeroMQ ROUTER socket on a Unix socket in a private folder, and each HTTP process
holds a `RemoteCore` (a DEALER socket), as vLLM separates its API server from its
engine core. Both directions carry lists of messages: whatever one event-loop
iteration (front end) or one batch (core) produced travels as one pickled frame,
so the per-request cost of the hop is a few microseconds. Pickle is safe here
because both ends are this program and the socket lives in a folder only this
user can open. Submissions, records and answers cross as plain tuples, not as
their NamedTuple classes: pickle calls a Python method per NamedTuple both to
write and to read one, and the engine core, whose threads share one interpreter
lock, is the side that must not pay per-request Python it can avoid: as tuples an
answer costs it a third of the time to write, a submission and its record half the
time to read.

A finished request's `Record` rides in the next frame with everything else, not in
a frame of its own, so the core is woken about once per front-end iteration, not
once per request. That alone would let a scrape answered through another HTTP
process miss a request whose answer its client already holds; so before rendering
the metrics the core fences: it asks every other front end to flush, and renders
once each has answered (or `FENCE_S` has passed: a front end that is gone). A front
end whose process has exited is forgotten within `PEER_CHECK_S`: its rows that have
not started are dropped, and no fence waits for it.

Messages, front end -> core: ("s", Submission fields) submit, ("c", ticket) cancel,
("r", Record fields) a finished request's metrics, ("q", call id, method, args) a
control call, ("f", fence id) flushed. Core -> front end: ("a", [Answer fields, ...])
answers (each row's RowAnswer fields a tuple too), ("q", call id, ok, value) a
control call's result (value is (kind, message) when not ok), ("f", fence id) flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynprompt.service.protocol import (
    NOT_READY,
    Answer,
    CoreError,
    Record,
    RowAnswer,
    Submission,
)

log = logging.getLogger("dynprompt.service.transport")

PICKLE = pickle.HIGHEST_PROTOCOL
# How long a metrics scrape waits for the other front ends' records (see the fence above).
FENCE_S = 0.25
# How often a process of a `--workers N` server checks that the processes it works with
# (its supervisor, the core, the front ends) still exist.
PEER_CHECK_S = 0.5


class LocalCore:
    """The engine core in this process (`--workers 1`)."""

    def __init__(self, core: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core  # an EngineCore (imported by the caller: it brings torch)
        self.loop = loop
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._loop_thread = threading.get_ident()

    def submit(self, sub: Submission) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = self.loop.create_future()
        self._pending[sub.ticket] = future
        self.core.submit(sub, self)
        return future

    def deliver(self, answers: list[Answer]) -> None:
        """Called by the core: from its threads, or from the loop for an immediate refusal."""
        if threading.get_ident() == self._loop_thread:
            self._resolve(answers)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self.loop.call_soon_threadsafe(self._resolve, answers)

    def _resolve(self, answers: list[Answer]) -> None:
        for answer in answers:
            future = self._pending.pop(answer.ticket, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def cancel(self, ticket: int) -> None:
        self._pending.pop(ticket, None)
        self.core.cancel(self, ticket)

    def record(self, record: Record) -> None:
        self.core.record([record])

    async def call(self, method: str, *args: Any) -> Any:
        if method == "reload":  # loads checkpoints: keep it off the event loop
            return await asyncio.to_thread(self.core.call, method, *args)
        return self.core.call(method, *args)

    async def close(self) -> None:
        await asyncio.to_thread(self.core.stop, 10.0)


_IDENTITIES = itertools.count(1)


def alive(pid: int) -> bool:
    """Whether process `pid` exists (a child exited but not yet reaped still does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RemoteCore:
    """The engine core in another process, over a ZeroMQ DEALER socket.

    Given the core's pid, it watches that process: if the core dies, every request
    waiting on it, and every one after, is answered 503 at once instead of hanging until
    the drain times out (the supervisor stops the server when its core is gone).
    """

    def __init__(self, address: str, core_pid: int | None = None) -> None:
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 2000)
        # "pid:n": the core tells from the pid that this process has exited.
        self.socket.setsockopt(zmq.IDENTITY, b"%d:%d" % (os.getpid(), next(_IDENTITIES)))
        self.socket.connect(address)
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._out: list[tuple[Any, ...]] = []
        self._reader: asyncio.Task[None] | None = None
        self._dead: str | None = None  # why the core cannot answer any more
        self._watcher = (
            asyncio.ensure_future(self._watch(core_pid)) if core_pid is not None else None
        )

    async def _watch(self, pid: int) -> None:
        while alive(pid):
            await asyncio.sleep(PEER_CHECK_S)
        self._dead = "the engine process exited; the server is stopping"
        log.error("%s (pid %d was the engine)", self._dead, pid)
        pending, self._pending = self._pending, {}
        for ticket, future in pending.items():
            if not future.done():
                future.set_result(Answer(ticket, None, [], [], NOT_READY, self._dead))
        calls, self._calls = self._calls, {}
        for waiter in calls.values():
            if not waiter.done():
                waiter.set_exception(CoreError(NOT_READY, self._dead))

    def _send(self, message: tuple[Any, ...]) -> None:
        self._out.append(message)
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self.flush)
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())

    def flush(self) -> None:
        out, self._out = self._out, []
        if out:
            self.socket.send(pickle.dumps(out, PICKLE), copy=False)

    async def _read(self) -> None:
        while True:
            frame = await self.socket.recv()
            kind, *rest = pickle.loads(frame)
            if kind == "a":
                for fields in rest[0]:
                    future = self._pending.pop(fields[0], None)
                    if future is not None and not future.done():
                        future.set_result(_answer(fields))
            elif kind == "f":  # the core renders metrics: send what is pending, then say so
                self._send(("f", rest[0]))
                self.flush()
            elif kind == "q":
                call_id, ok, value = rest
                waiter = self._calls.pop(call_id, None)
                if waiter is not None and not waiter.done():
                    if ok:
                        waiter.set_result(value)
                    else:
                        waiter.set_exception(CoreError(*value))

    def submit(self, sub: Submission) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self._dead is not None:
            future.set_result(Answer(sub.ticket, None, [], [], NOT_READY, self._dead))
            return future
        self._pending[sub.ticket] = future
        self._send(("s", tuple(sub)))
        return future

    def cancel(self, ticket: int) -> None:
        self._pending.pop(ticket, None)
        self._send(("c", ticket))

    def record(self, record: Record) -> None:
        self._send(("r", tuple(record)))  # flushed with this iteration's frame

    async def call(self, method: str, *args: Any) -> Any:
        if self._dead is not None:
            raise CoreError(NOT_READY, self._dead)
        call_id = next(self._call_ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = waiter
        self._send(("q", call_id, method, args))
        return await waiter

    async def close(self) -> None:
        self.flush()
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.socket.close()
        self.context.term()


class _RemoteTarget:
    """Answers for one front end, queued by the core's threads for the socket thread."""

    def __init__(self, identity: bytes, server: CoreServer) -> None:
        self.identity = identity
        self.server = server

    def deliver(self, answers: list[Answer]) -> None:
        wire = [(*a[:3], [tuple(row) for row in a.rows], *a[4:]) for a in answers]
        self.server.post(self.identity, ("a", wire))


def _answer(fields: tuple[Any, ...]) -> Answer:
    """An `Answer` from its wire tuple (the front end's side of `_RemoteTarget.deliver`)."""
    answer = Answer(*fields)
    return answer._replace(rows=[RowAnswer(*row) for row in answer.rows])


@dataclass
class _Fence:
    """A metrics scrape waiting for the front ends in `waiting` to flush their records."""

    number: int
    waiting: set[bytes]
    deadline: float
    reply: Callable[[], None]


class CoreServer:
    """The core process's socket loop: receive, hand to the core, send answers back.

    ZeroMQ sockets belong to one thread, so the core's threads never touch the socket:
    they queue outgoing frames and wake this loop through a pipe.
    """

    def __init__(
        self, core: Any, address: str, parent: int | None = None, orphan_grace_s: float = 35.0
    ) -> None:
        import zmq

        self.zmq = zmq
        self.core = core
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.bind(address)
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._targets: dict[bytes, _RemoteTarget] = {}
        self._stop = threading.Event()
        self._fences: list[_Fence] = []
        self._fence_numbers = itertools.count(1)
        self._silent: set[bytes] = set()  # front ends that let a fence expire: not waited for
        self._peers_checked = time.monotonic()
        self.parent = parent  # the supervisor's pid
        self.orphan_grace_s = orphan_grace_s
        self._orphaned: float | None = None  # when the supervisor was found gone

    def post(self, identity: bytes, message: tuple[Any, ...]) -> None:
        """Queue a frame for a front end (any thread)."""
        self._outbox.append((identity, pickle.dumps(message, PICKLE)))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"x")

    def run(self) -> None:
        zmq = self.zmq
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._stop.is_set():
            timeout = 500.0
            if self._fences:
                timeout = max(0.0, min(f.deadline for f in self._fences) - time.monotonic()) * 1000
            events = dict(poller.poll(timeout))
            if self.socket in events:
                self._receive_all()
            if self._fences:
                self._settle_fences()
            if self._wake_read in events:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_read, 4096):
                        pass
            self._send_all()
            if time.monotonic() - self._peers_checked >= PEER_CHECK_S:
                self._check_peers()
                self._check_parent()
        self._send_all()
        self.socket.close()
        self.context.term()

    def _send_all(self) -> None:
        socket, more = self.socket, self.zmq.SNDMORE
        while self._outbox:
            identity, frame = self._outbox.popleft()
            socket.send(identity, more)
            socket.send(frame, copy=False)

    def _receive_all(self) -> None:
        """Everything readable now, in arrival order per front end.

        A front end's message is one frame, so the ROUTER reads exactly two parts: its
        identity, then the frame. This thread's interpreter time bounds the engine core, so
        it reads them with two `recv`s and asks `ZMQ_EVENTS` whether more are waiting:
        pyzmq's `recv_multipart` is a Python loop around those `recv`s, and learning that
        none is left from a raised `zmq.Again` builds an exception and an errno enum, each
        several times the cost of the plain call in a `timeit` on this machine.
        """
        zmq = self.zmq
        socket, events, ready, now = self.socket, zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
        while socket.getsockopt(events) & ready:
            identity = socket.recv(now)
            frame = socket.recv(now)
            target = self._targets.get(identity)
            if target is None:
                target = self._targets[identity] = _RemoteTarget(identity, self)
            self._silent.discard(identity)
            self._handle(target, pickle.loads(frame))

    def _check_peers(self) -> None:
        """Forget the front ends whose process has exited (their identity names their pid).

        ZeroMQ does not tell a ROUTER that a peer went away (that notice is a draft option
        the bundled libzmq lacks), and the supervisor restarts a dead HTTP process under a
        new pid: without this, the dead one's queued rows would still be computed and every
        scrape would wait `FENCE_S` for it once.
        """
        self._peers_checked = time.monotonic()
        for identity in list(self._targets):
            pid = identity.split(b":")[0]
            if pid.isdigit() and not alive(int(pid)):
                self._gone(identity)

    def _check_parent(self) -> None:
        """Without its supervisor nobody would stop this process: stop once the HTTP
        processes (which drain when they notice the same) are gone."""
        if self.parent is None or os.getppid() == self.parent:
            return
        now = time.monotonic()
        if self._orphaned is None:
            self._orphaned = now
            log.warning("the supervisor (pid %d) is gone; stopping once the HTTP processes "
                        "have drained", self.parent)  # fmt: skip
        if not self._targets or now - self._orphaned > self.orphan_grace_s:
            self._stop.set()

    def _gone(self, identity: bytes) -> None:
        target = self._targets.pop(identity, None)
        self._silent.discard(identity)
        for fence in self._fences:
            fence.waiting.discard(identity)
        if target is not None:
            dropped = self.core.forget(target)
            if dropped:
                log.warning("an HTTP process exited with %d requests in flight; "
                            "dropped their rows that had not started", dropped)  # fmt: skip

    def _handle(self, target: _RemoteTarget, messages: list[tuple[Any, ...]]) -> None:
        core = self.core
        records: list[Record] = []
        for kind, *rest in messages:
            if kind == "s":
                core.submit(Submission(*rest[0]), target)
            elif kind == "c":
                core.cancel(target, rest[0])
            elif kind == "r":
                records.append(Record(*rest[0]))
            elif kind == "q":
                self._control(target, *rest)
            elif kind == "f":
                for fence in self._fences:
                    if fence.number == rest[0]:
                        fence.waiting.discard(target.identity)
        if records:
            core.record(records)

    def _settle_fences(self) -> None:
        """Render for every fence all of whose front ends have flushed, or that expired."""
        now = time.monotonic()
        for fence in [f for f in self._fences if not f.waiting or f.deadline <= now]:
            self._fences.remove(fence)
            if fence.waiting:
                log.warning(
                    "%d HTTP processes did not flush their records within %gs; the metrics "
                    "may miss their last requests", len(fence.waiting), FENCE_S,
                )  # fmt: skip
                self._silent |= fence.waiting
            fence.reply()

    def _control(self, target: _RemoteTarget, call_id: int, method: str, args: tuple[Any]) -> None:
        def reply() -> None:
            try:
                value = (True, self.core.call(method, *args))
            except CoreError as exc:
                value = (False, (exc.kind, exc.message))
            except Exception as exc:  # a bug: say so to the caller instead of hanging it
                log.exception("core call %s failed", method)
                value = (False, ("internal_error", f"{type(exc).__name__}: {exc}"))
            self.post(target.identity, ("q", call_id, *value))

        if method == "reload":  # loads checkpoints: keep the socket loop answering
            threading.Thread(target=reply, name="dynprompt-reload", daemon=True).start()
            return
        if method == "render_metrics":
            # The caller's own records came before this call in its frames; every other
            # front end flushes first (the fence), so a scrape counts every request
            # answered before it, whichever process answered it.
            self._check_peers()
            others = set(self._targets) - {target.identity} - self._silent
            if others:
                number = next(self._fence_numbers)
                for identity in others:
                    self.post(identity, ("f", number))
                self._fences.append(_Fence(number, others, time.monotonic() + FENCE_S, reply))
                return
        reply()


def serve_core(
    core: Any, address: str, load: Any, parent: int | None = None, orphan_grace_s: float = 35.0
) -> int:
    """Run a core process: bind, load the models in the background, serve until SIGTERM.

    `load` loads and warms the repository (it raises if nothing can be served, and the
    process then exits 1 so that the supervisor stops the server). SIGHUP reloads. If the
    supervisor (`parent`) goes away, the core serves its HTTP processes while they drain
    (they notice too), and stops once none is left or after `orphan_grace_s`.
    """
    server = CoreServer(core, address, parent, orphan_grace_s)
    failed = threading.Event()

    def loading() -> None:
        try:
            load()
        except Exception as exc:
            log.error("cannot serve the model repository: %s", exc)
            failed.set()
            server.stop()

    def on_hup(signum: int, frame: Any) -> None:
        def reload() -> None:
            try:
                core.call("reload")
            except CoreError as exc:
                log.warning("SIGHUP reload not done: %s", exc.message)

        threading.Thread(target=reload, name="dynprompt-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains
    signal.signal(signal.SIGHUP, on_hup)
    threading.Thread(target=loading, name="dynprompt-load", daemon=True).start()
    server.run()
    core.stop(10.0)
    return 1 if failed.is_set() else 0
