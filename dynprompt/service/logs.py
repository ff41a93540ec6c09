"""Log lines: JSON (one object per line) or text, and a cheap access log.

The access log writes one line per request, so it skips `logging`'s record,
handler and formatter machinery (about 25 µs a line, a tenth of a request's whole
budget): it serialises with orjson and writes whatever the event loop produced in
one iteration with one write. Everything else goes through `logging` as usual.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import sys
import time
from typing import Any

import orjson

ACCESS_LOGGER = "dynprompt.service.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
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


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our own access line replaces it
    AccessLog.json = fmt == "json"


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the date and time are formatted once a second."""
    global _second
    whole = int(created)
    if whole != _second[0]:
        stamp = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, stamp)
    return f"{_second[1]}.{int((created - whole) * 1000):03d}+00:00"


class AccessLog:
    """One line per HTTP request: info for the API (`/v1/...`, `/predict`), debug otherwise."""

    json = True

    def __init__(self) -> None:
        logger = logging.getLogger(ACCESS_LOGGER)
        self.info = logger.isEnabledFor(logging.INFO)
        self.debug = logger.isEnabledFor(logging.DEBUG)
        self._lines: list[bytes] = []
        self.pid = os.getpid()

    def line(self, method: str, path: str, status: int, fields: dict[str, Any]) -> None:
        api = path.startswith("/v1/") or path == "/predict"
        if not (self.info if api else self.debug):
            return
        level = "info" if api else "debug"
        message = f"{method} {path} {status}"
        if self.json:
            head = {
                "ts": _timestamp(time.time()),
                "level": level,
                "logger": ACCESS_LOGGER,
                "pid": self.pid,  # which HTTP process, with --workers N
            }
            out = orjson.dumps({**head, "msg": message, **fields}, default=str)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            stamp = dt.datetime.now().isoformat(sep=" ", timespec="milliseconds")
            out = f"{stamp} {level.upper()} {ACCESS_LOGGER}: {message} {extra}".encode()
        self._write(out)

    def request(self, obs: Any, method: str, path: str, seconds: float) -> None:
        """The line of a request the engine served (`protocol.Observation`).

        Written with one f-string: every value in it is a number, one of the service's own
        paths and methods, a request id already checked against a pattern of characters
        that need no JSON escaping, or the model name, escaped by orjson."""
        if not self.info:
            return
        duration = round(seconds * 1000, 2)
        model = orjson.dumps(obs.model).decode()
        timing = ""
        if obs.queue_s is not None:
            queue, compute = round(obs.queue_s * 1000, 2), round(obs.compute_s * 1000, 2)
            timing = f',"queue_ms":{queue},"compute_ms":{compute}'
        if not self.json:
            fields = {
                "request_id": obs.request_id, "method": method, "path": path,
                "status": obs.status, "duration_ms": duration, "model": obs.model,
                "rows": obs.rows,
            }  # fmt: skip
            if timing:
                fields["queue_ms"] = round(obs.queue_s * 1000, 2)
                fields["compute_ms"] = round(obs.compute_s * 1000, 2)
            self.line(method, path, obs.status, fields)
            return
        self._write(
            f'{{"ts":"{_timestamp(time.time())}","level":"info","logger":"{ACCESS_LOGGER}",'
            f'"pid":{self.pid},"msg":"{method} {path} {obs.status}",'
            f'"request_id":"{obs.request_id}","method":"{method}","path":"{path}",'
            f'"status":{obs.status},"duration_ms":{duration},"model":{model},'
            f'"rows":{obs.rows}{timing}}}'.encode()
        )

    def _write(self, line: bytes) -> None:
        self._lines.append(line)
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            stream = sys.stderr
            stream.flush()  # whatever `logging` wrote first stays first
            stream.buffer.write(b"\n".join(lines) + b"\n")
            stream.buffer.flush()
