"""`python -m benchmarks.scheduler` runs and prints its whole table (one round, nothing
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
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| [\d,]+ \| \d+ \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["64", "256", "1,024", "4,096", "16,384"]
    for row in rows:
        take, first, ratio, wait = (c.strip() for c in row.strip("|").split("|")[2:])
        assert float(take) > 0 and float(first) > 0 and float(wait) >= 0
        assert re.fullmatch(r"\d+\.\dx", ratio)
