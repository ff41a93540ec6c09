"""`dynprompt bench overhead` runs end to end, and its floor answers like the server does."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from benchmarks import floor, overhead
from tests.server_util import start_server


def shape(value: object) -> object:
    """A JSON value with its leaves replaced by their types."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def test_the_floor_answers_what_the_server_answers(tmp_path: Path) -> None:
    """The floor prices uvicorn on the server's own answer: same fields, same size."""
    backbone = overhead.tiny_backbone_folder(tmp_path / "tiny-bert")
    repo = overhead.prefix_repository(tmp_path / "repo", backbone)
    body = {"model": "tiny", "inputs": ["a gorgeous, witty, seductive movie."]}
    with start_server(["--model-repository", str(repo)], log_dir=tmp_path / "logs") as server:
        real = httpx.post(server.url + "/v1/classify", json=body, timeout=30)
    with floor.start(tmp_path / "logs") as fixed:
        answered = httpx.post(fixed.url + "/v1/classify", json=body, timeout=30)
    assert real.status_code == answered.status_code == 200
    assert shape(answered.json()) == shape(real.json())
    assert abs(len(answered.content) - len(real.content)) <= 8
    assert 0 < floor.tokenizer_ms(backbone, ["one sentence", "and another"] * 16, batch=32) < 50


def test_bench_overhead_runs_and_reports_its_floor(capsys: pytest.CaptureFixture[str]) -> None:
    code = overhead.main(
        ["--rounds", "1", "--duration", "0.5", "--warmup", "0.2", "--concurrency", "4"]
        + ["--workers", "1", "--no-write"]
    )
    assert code == 0
    out = capsys.readouterr().out
    path = re.search(r"\| --workers 1 \| \d+ \| [\d.]+ \| [\d.]+ \| \*\*([\d.]+)\*\*", out)
    together = re.search(r"\| together \| \| \*\*([\d.]+)\*\* \|", out)
    assert path is not None and together is not None, out
    assert float(path.group(1)) > 0
    assert float(together.group(1)) > 0
    assert "spends" in out.splitlines()[-1]
