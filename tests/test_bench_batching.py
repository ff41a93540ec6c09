"""`python -m benchmarks.batching` replays the server's closed loop, runs the engine's own
threads under it, and prints its table (one round, a few sentences, nothing written). Its
CPU figures are timing and are not judged here; the batches' shapes are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_batching_benchmark_replays_the_closed_loop() -> None:
    command = [
        sys.executable, "-m", "benchmarks.batching", "--rounds", "1", "--models", "probe",
        "--sentences", "64", "--clients", "12", "--tolerances", "0.25", "0", "--no-write",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| `linear_probe` |")
    ]
    assert [r[1] for r in rows] == [
        "sorting all 64 by length",
        "the scheduler, replayed in one thread, `--padding-tolerance 0.25`",
        "the engine's own threads, no HTTP, `--padding-tolerance 0.25`",
        "the scheduler, replayed in one thread, `--padding-tolerance 0`",
        "the engine's own threads, no HTTP, `--padding-tolerance 0`",
    ]
    for _, _, cpu_ms, ratio, _, padding in rows:
        assert float(cpu_ms) > 0 and float(ratio) > 0
        assert 0 <= float(padding) < 1
    assert rows[0][3] == "1.000" and rows[0][4] == "32.0"  # 64 sentences, batches of 32
    for row in rows[1:]:  # 12 clients: no batch can hold more than the 12 rows queued
        assert 0 < float(row[4]) <= 12
    assert re.search(r"12 clients", done.stdout)
