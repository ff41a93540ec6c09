"""`python -m benchmarks.scheduler` runs and prints both its tables (one round, nothing
written). Its figures are timing and are not judged here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_scheduler_benchmark_prints_every_point() -> None:
    command = [sys.executable, "-m", "benchmarks.scheduler", "--rounds", "1", "--no-write"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines()
        if re.match(r"\| [\d,]+ \| \d+ \|", line)
    ]
    takes = [c for c in cells if len(c) == 6]
    wakeups = [c for c in cells if len(c) == 2]
    assert [c[0] for c in takes] == ["64", "256", "1,024", "4,096", "16,384"]
    for _, _, take, first, ratio, wait in takes:
        assert float(take) > 0 and float(first) > 0 and float(wait) >= 0
        assert re.fullmatch(r"\d+\.\dx", ratio)
    assert [c[0] for c in wakeups] == ["256", "1,024", "4,096"]
    assert all(float(c[1]) >= 0 for c in wakeups)
