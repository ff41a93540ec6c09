"""Shared fixtures: the real MiniLM backbone (loaded once) and real SST-2 sentences."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dynprompt.models import Backbone, load_backbone

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm() -> Backbone:
    return load_backbone("minilm")


def sst2_rows(split: str = "dev", limit: int | None = None) -> list[tuple[str, int]]:
    path = DATA / "sst2" / f"{split}.tsv"
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data beside the repo)")
    with path.open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [(text, int(label)) for text, label in reader]
    return rows[:limit] if limit else rows


@pytest.fixture(scope="session")
def sst2_sentences() -> list[str]:
    return [text for text, _ in sst2_rows("dev", 64)]
