"""The request path's floor: what the parts dynprompt does not write cost per request.

`dynprompt bench overhead` prices the whole request path against a goal; this module
prices, on the same machine and under the same load, the two parts of it that are not
dynprompt's code, so the goal can be read against what is left for the rest:

- `app`: an ASGI app that reads each POST's body, parses it (orjson) and answers a fixed
  classify answer of the real one's size, under uvicorn with the event loop and HTTP
  parser `dynprompt serve` uses (uvloop, httptools) and no access log. Nothing is
  validated, admitted, tokenised, batched, computed or counted: what it costs is uvicorn's
  HTTP/1.1 handling, the event loop and the kernel's loopback TCP.
- `tokenizer_ms`: the fast tokenizer alone (`RowTokenizer.tokenize_rows`, the call the
  server makes), in batches of the server's default batch size, CPU of every thread
  of this process (the tokenizer's own pool included).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
from starlette.types import Receive, Scope, Send

from tests.server_util import HOST, ServerProcess, free_port

# The answer `dynprompt serve` gives one SST-2 sentence under the overhead benchmark's
# `prefix` checkpoint, to the byte in shape and about in size.
ANSWER = orjson.dumps(
    {
        "model": "tiny",
        "results": [{"label": "positive", "score": 0.5123456789, "truncated": False}],
        "usage": {"input_tokens": 27, "prompt_tokens": 20},
    }
)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] == "POST":
        orjson.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def start(log_dir: Path) -> ServerProcess:
    """`app` under uvicorn in a process of its own, ready to take load."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / f"floor-{port}.log"
    command = [sys.executable, "-m", "uvicorn", "benchmarks.floor:app", "--host", HOST]
    command += ["--port", str(port), "--loop", "uvloop", "--http", "httptools"]
    command += ["--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    command += ["--no-server-header", "--no-date-header"]
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=root, stdout=log_file, stderr=log_file)
    server = ServerProcess(process, port, log_path, command)
    server.wait_ready()
    return server


def tokenizer_ms(backbone_path: Path, sentences: list[str], batch: int, rounds: int = 3) -> float:
    """The fast tokenizer's CPU-ms per sentence, best of `rounds` passes over `sentences`
    (the best: this machine's other load only ever adds to it)."""
    from dynprompt.models import load_backbone

    rows = load_backbone(str(backbone_path)).row_tokenizer()
    if rows is None:
        raise SystemExit(f"{backbone_path}: no fast tokenizer")
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for i in range(0, len(sentences), batch):
            rows.tokenize_rows(sentences[i : i + batch])
        best = min(best, (time.process_time() - started) * 1000 / len(sentences))
    return best
