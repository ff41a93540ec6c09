"""What one connection may hold of the server: bounded time, bounded size, bounded count.

uvicorn's HTTP protocol, plus the limits a public server needs so that no client can
hold resources others need:

- a new connection must send a complete request head within `header_timeout_s`
  (slow loris), and a head may not grow past `max_header_bytes` (431; uvicorn's
  httptools parser has no such limit);
- a request's body must arrive within `body_timeout_s` of its head (408), so slow
  uploads end;
- at most `max_connections` connections are open; one more is answered 503 and closed
  (logged at most once every `LOG_EVERY_S`), long before file descriptors run out;
- at shutdown, uploads still in progress are answered 503 (`shutdown`, which uvicorn
  calls for every connection once the drain is over) instead of waiting out the graceful
  timeout and ending in uvicorn's plain-text 500.

When the protocol ends a request itself (408, 503), it leaves the reason in the
request's scope under `ABORTED`, so that the handler still waiting for the body
records that status rather than a vanished client.

A request waiting for its answer learns that its client went away from the protocol
itself (`on_client_gone`): the connection's loss calls it back. Under load most
requests wait longer than a few milliseconds, and a task per request reading the
ASGI channel for `http.disconnect` measured about a tenth of the event loop's CPU.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson

log = logging.getLogger("dynprompt.service")

ABORTED = "dynprompt.aborted"  # scope key: (status, error type, message)
# Scope keys: the callback to make if the connection is lost before the answer is complete,
# and the mark the loss leaves (for a callback registered after it).
ON_GONE = "dynprompt.on_gone"
GONE = "dynprompt.gone"
LOG_EVERY_S = 10.0
_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; returns the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class CoalescingTransport:
    """A connection's transport whose writes of one turn of the event loop leave in one send.

    uvicorn writes a response's head and its body separately, so each answer cost two
    sends; on loopback, or wherever the client is near, each send also pays for the TCP
    segment's way in and out of the kernel. Everything but `write` is the transport's own.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def on_client_gone(scope: MutableMapping[str, Any], callback: Callable[[], None]) -> None:
    """Call `callback` once the request's connection is lost before its answer is complete
    (at once if it already is). Only under `guarded_protocol`, which every server uses."""
    if scope.get(GONE):
        callback()
    else:
        scope[ON_GONE] = callback


def guarded_protocol(
    *,
    header_timeout_s: float,
    max_header_bytes: int,
    body_timeout_s: float,
    max_connections: int,
) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    refused_at = [0.0, 0]  # last log time, refusals since

    class GuardedProtocol(HttpToolsProtocol):
        _head_open = False
        _head_bytes = 0
        _body_open = False
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_timeout)
            if len(self.server_state.connections) > max_connections:
                refused_at[1] += 1
                now = time.monotonic()
                if now - refused_at[0] >= LOG_EVERY_S:
                    log.warning(
                        "connection limit (%d) reached: refused %d connections in the last %.0fs",
                        max_connections, refused_at[1], LOG_EVERY_S,
                    )  # fmt: skip
                    refused_at[:] = [now, 0]
                self._refuse(503, "too_many_connections", "the server has too many connections")

        def _head_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in time")
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            if self._body_timer is not None:
                self._body_timer.cancel()
            super().connection_lost(exc)
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
                scope[GONE] = True
                callback = scope.pop(ON_GONE, None)
                if callback is not None:
                    callback()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()
            # Until on_message_complete: the body is still arriving. The deadline starts
            # only if it outlasts this packet (`data_received`), so a request that arrives
            # whole costs no timer.
            self._body_open = self.cycle is not None and body_timeout_s > 0

        def on_message_complete(self) -> None:
            self._body_open = False
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._body_open and self._body_timer is None:
                self._body_timer = self.loop.call_later(body_timeout_s, self._body_timeout)
            if self._head_open and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, "header_too_large", "the request head is too large")

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self._body_open:
                message = f"the request body did not arrive within {body_timeout_s:g}s"
                self.abort(408, "body_timeout", message)

        def abort(self, status: int, type_: str, message: str) -> None:
            """End a request whose body is still arriving: answer `status` (if nothing was
            answered yet) and close; its handler finds the reason in the scope."""
            cycle = self.cycle
            if cycle is None or cycle.response_started or self.transport.is_closing():
                return
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            scope[ABORTED] = (status, type_, message)
            self._body_open = False
            self._refuse(status, type_, message)
            cycle.disconnected = True
            cycle.message_event.set()

        def shutdown(self) -> None:
            """uvicorn's shutdown of this connection, except that an upload still arriving
            is answered 503 `draining` (the drain has ended: it will never be served)."""
            if self._body_open:
                log.info("answered 503 to an upload still in progress at shutdown")
                self.abort(503, "draining", "the server is shutting down")
            else:
                super().shutdown()

        def _refuse(self, status: int, type_: str, message: str) -> None:
            body = orjson.dumps({"error": {"type": type_, "message": message}})
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s"
                % (status, _REASONS.get(status, b"Error"), len(body), body)
            )
            self.transport.close()

    return GuardedProtocol
