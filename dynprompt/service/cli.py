"""`dynprompt serve`: settings, logging, threads, and uvicorn with a draining SIGTERM.

SIGHUP rescans the model repository (as `POST /v1/admin/reload` does).
SIGTERM (or Ctrl-C) starts a drain: `/ready` and new classify requests answer 503,
requests already admitted finish (up to `--drain-timeout-s`), then the server
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch
import uvicorn

from dynprompt.service import errors
from dynprompt.service.config import Settings, SettingsError, settings_from
from dynprompt.service.engine import Engine

log = logging.getLogger("dynprompt.service")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        return super().format(record) + (" " + extra if extra else "")


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our own access line replaces it


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before shutting down."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await super().serve(sockets)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: rescanning the model repository")
        task = asyncio.ensure_future(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        try:
            await self.engine.reload()
        except errors.ServiceError as exc:
            log.warning("SIGHUP reload not done: %s", exc.message)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            if self._draining:
                log.warning("second signal: stopping without waiting for in-flight requests")
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(sig)))

    async def _drain(self, sig: int) -> None:
        name = signal.Signals(sig).name
        log.info("%s: draining (new requests get 503, in-flight ones finish)", name)
        finished = await self.engine.drain(self.drain_timeout_s)
        if finished:
            log.info("drained: no request in flight; shutting down")
        else:
            log.warning("drain timeout (%gs) reached with requests in flight", self.drain_timeout_s)
        self.should_exit = True

    def fail(self, message: str) -> None:
        """The models cannot be served: exit non-zero."""
        self.exit_code = 1
        self.should_exit = True


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, plus a deadline for a new connection's first request head.

    uvicorn times out idle keep-alive connections but not a client that opens a connection
    and trickles its headers (slow loris); this closes such a connection after
    `header_timeout_s`.
    """
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class GuardedProtocol(base):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in time")
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return GuardedProtocol


def serve_main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"dynprompt serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is not a log line
    from dynprompt.service.app import create_app

    device = settings.resolved_device()
    log.info(
        "starting dynprompt serve: repository %s, device %s, dtype %s, backend %s, "
        "%d torch threads",
        settings.repository, device, settings.dtype, settings.backend, torch.get_num_threads(),
        extra={"fields": {"settings": settings.public_dict()}},
    )  # fmt: skip
    servers: list[DrainingServer] = []  # create_app needs the server's fail(), made below
    app = create_app(settings, on_fatal=lambda message: servers[0].fail(message))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=10,
        server_header=False,
        http=guarded_protocol(settings.header_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = DrainingServer(config, app.state.engine, settings.drain_timeout_s)
    servers.append(server)
    server.run()
    return server.exit_code
