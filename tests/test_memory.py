"""The engine's periodic `malloc_trim`: never more often than its period, never more than
its share of the time (a trim walks the whole heap)."""

from __future__ import annotations

import time

import pytest

from dynprompt.service import memory


def test_trims_keep_to_their_period_and_share(monkeypatch: pytest.MonkeyPatch) -> None:
    spans: list[tuple[float, float]] = []
    real_trim = memory.trim

    def recorded() -> None:
        start = time.monotonic()
        real_trim()
        spans.append((start, time.monotonic()))

    monkeypatch.setattr(memory, "trim", recorded)
    # Some freed heap for the trims to return.
    garbage = [bytearray(1 << 16) for _ in range(2000)]
    del garbage[::2]
    trimmer = memory.Trimmer(every_s=0.05, share=0.1)
    created = time.monotonic()
    end = created + 1.0
    while time.monotonic() < end:
        trimmer.maybe()
        time.sleep(0.001)
    assert len(spans) >= 2, spans
    assert spans[0][0] - created >= 0.05  # not at once: a fresh worker has nothing to give back
    for (start, stop), (following, _) in zip(spans, spans[1:], strict=False):
        assert following - start >= max(0.05, (stop - start) / 0.1) * 0.999, spans
