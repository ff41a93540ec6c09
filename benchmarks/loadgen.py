"""A bounded HTTP load generator for `POST /v1/classify`.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --model sst2 \
        --concurrency 32 --duration 20 [--count 5000] [--inputs-per-request 1]

`--concurrency` clients, each with its own keep-alive connection, send SST-2 dev
sentences (synthetic ones when the shared data is absent) back to back until the
duration or the request count is reached, whichever comes first. Reports
sentences/s (the slope of answers over time inside the measured window, after
`--warmup`) and p50/p95/p99 latency of the requests answered in that window.

The client is a minimal HTTP/1.1 writer/reader on asyncio streams, not httpx: on
a 2-core machine the load generator shares the CPU with the server, and a heavy
client would measure itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    sentences: int
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    completions: list[tuple[float, int]] = field(default_factory=list)  # (time, sentences)
    answered: int = 0  # sentences answered 200 over the whole run, warm-up included
    cpu_ms_per_sentence: float = float("nan")  # filled in by callers that watch the server
    compute_ms_per_sentence: float = float("nan")  # the same, of its model threads only

    @property
    def sentences_per_s(self) -> float:
        """Slope of cumulative sentences answered over time (least squares).

        A batching server answers in bursts of a whole batch; counting the answers inside a
        window is off by up to one burst, the slope of the staircase is not.
        """
        points = sorted(self.completions)
        if len(points) < 2 or points[-1][0] - points[0][0] < 1e-3:
            return self.sentences / self.seconds if self.seconds > 0 else 0.0
        xs, ys, total = [], [], 0
        for t, n in points:
            total += n
            xs.append(t)
            ys.append(total)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        den = sum((x - mx) ** 2 for x in xs)
        return num / den if den > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> str:
        return (
            f"concurrency {self.concurrency}: {self.sentences_per_s:.1f} sentences/s, "
            f"{self.requests_per_s:.1f} requests/s, latency p50 {self.percentile(50):.1f} ms, "
            f"p95 {self.percentile(95):.1f} ms, p99 {self.percentile(99):.1f} ms, "
            f"statuses {dict(self.statuses)}"
        )


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (every thread)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def tree_thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU of every thread of a process and its descendants, summed by the
    thread's name in the kernel (the server names its threads: `service/threadnames.py`).
    Empty where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    root = psutil.Process(pid)
    out: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        tasks = Path(f"/proc/{process.pid}/task")
        try:
            tids = [entry.name for entry in tasks.iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                name = (tasks / tid / "comm").read_text().strip()
                fields = (tasks / tid / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # the thread ended meanwhile
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def sst2_sentences(limit: int | None = None) -> list[str]:
    """SST-2 dev sentences from the shared data folder, or seeded synthetic ones without it."""
    try:
        from dynprompt.training.data import data_dir

        path = data_dir() / "sst2" / "dev.tsv"
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        out = [line.split("\t")[0] for line in lines if line.strip()]
    except (OSError, ImportError):
        rng = random.Random(0)
        words = "the film plot acting story was very great dull funny sad and but not a".split()
        out = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(872)]
    return out[:limit] if limit else out


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the status and body."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{self.extra}\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def run_load(
    url: str,
    model: str,
    sentences: list[str],
    concurrency: int,
    duration_s: float = 20.0,
    count: int | None = None,
    inputs_per_request: int = 1,
    warmup_s: float = 2.0,
    api_key: str | None = None,
    timeout_s: float = 120.0,
) -> LoadResult:
    """Closed-loop load: each client sends its next request when the last one is answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cursor = 0
    started = time.perf_counter()
    window_start = started + warmup_s
    window_end = window_start + duration_s
    result = LoadResult(concurrency, 0.0, 0, 0)
    budget = count

    async def client(index: int) -> None:
        nonlocal cursor, budget
        conn = _Connection(host, port, headers)
        try:
            while time.perf_counter() < window_end:
                if budget is not None:
                    if budget <= 0:
                        break
                    budget -= 1
                batch = [
                    sentences[(cursor + i) % len(sentences)] for i in range(inputs_per_request)
                ]
                cursor += inputs_per_request
                body = json.dumps({"model": model, "inputs": batch}).encode()
                sent = time.perf_counter()
                status, _ = await asyncio.wait_for(conn.post("/v1/classify", body), timeout_s)
                done = time.perf_counter()
                if status == 200:
                    result.answered += inputs_per_request
                if window_start <= done <= window_end:  # answered inside the window
                    result.statuses[status] += 1
                    result.requests += 1
                    if status == 200:
                        result.sentences += inputs_per_request
                        result.latencies_ms.append((done - sent) * 1000)
                        result.completions.append((done, inputs_per_request))
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    result.seconds = min(time.perf_counter(), window_end) - window_start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (bound)")
    parser.add_argument(
        "--count", type=int, default=None, help="most requests to send, warm-up included (bound)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--sentences", type=int, default=None, help="use the first N only")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_load(
            args.url,
            args.model,
            sst2_sentences(args.sentences),
            args.concurrency,
            duration_s=args.duration,
            count=args.count,
            inputs_per_request=args.inputs_per_request,
            warmup_s=args.warmup,
            api_key=args.api_key,
        )
    )
    print(result.summary())
    return 0 if result.requests and set(result.statuses) == {200} else 1


if __name__ == "__main__":
    raise SystemExit(main())
