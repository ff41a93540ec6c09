"""`dynprompt bench gpu` runs end to end: on a CPU, with small batches and loads.

A GPU machine is lent for minutes at a time; a script that fails there costs the whole
loan. This runs every step of it here (offline ceilings, the batch pipeline, a real
`--workers 2` server under load, the CPU and batch columns from its metrics) and checks
the table it prints. The figures themselves are not judged, except rows per batch where
the load fixes it: a CPU run measures nothing the script is for.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def test_the_gpu_benchmark_runs_every_step_on_a_cpu() -> None:
    command = [
        sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--dtypes", "float32",
        "--rows", "4", "8", "--loads", "1x1", "4x2", "--duration", "2", "--workers", "2",
        "--no-write",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        cells[1]: cells[2:]
        for line in done.stdout.splitlines()
        if line.startswith("| float32 |")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    offline = ["bare at 4 rows", "bare at 8 rows", "pipeline at 4 rows", "pipeline at 8 rows"]
    for name in offline:
        assert float(rows[name][0].replace(",", "")) > 0, rows
    assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", rows["pipeline / bare at 8 (goal ≥ 0.7)"][0])
    served = [name for name in rows if name.startswith("server, ")]
    assert [name.split(" (")[0] for name in served] == [
        "server, 1 clients × 1 sentence(s)",
        "server, 4 clients × 2 sentence(s)",
    ]
    for name in served:
        figures = [float(v.replace(",", "")) for v in rows[name]]
        sentences, requests, p50, p99, cpu, core, rows_per_batch = figures
        assert sentences > 0 and requests > 0 and 0 < p50 <= p99
        assert cpu > 0 and core > 0  # the whole server's CPU, and its engine core's
        # From the server's batch_size histogram: one client of one sentence makes batches
        # of one row; four clients of two sentences, of more (a request's two rows arrive
        # together, though length grouping may part them), up to the batch cap of 8.
        if name.startswith("server, 1 clients"):
            assert rows_per_batch == 1.0, rows[name]
        else:
            assert 1.0 < rows_per_batch <= 8.0, rows[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it measures for minutes")
def test_without_cuda_the_gpu_benchmark_says_so_and_exits_0() -> None:
    command = [sys.executable, "-m", "benchmarks.gpu", "--no-write"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA device here" in done.stdout, done.stderr[-2000:]
