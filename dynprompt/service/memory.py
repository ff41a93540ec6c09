"""Giving memory back to the system.

A serving process keeps freed pages in glibc's heap: past its first frees, glibc's
dynamic mmap threshold rises to 32 MiB, so activations of every batch width come from
the heap, and the heap's free holes keep their pages. A 6-minute mixed soak grew from
494 to 961 MiB resident; `malloc_trim(0)` brought it back to 518. The same forward in a
loop grows 140-220 MiB in 40 s.

Two cures were measured (`docs/reliability.md`, "Memory over a long soak"). A fixed
mmap threshold keeps the heap flat but maps and faults every activation afresh: the
shipped model's forward cost 20-35% more CPU. Trimming every second keeps the peak
within about 100 MiB of the start for about 1% of the compute thread's time (a trim
takes 3-25 ms). So the engine trims after every model swap (with the CUDA cache and
Python's cycles) and, while serving, at most once every `TRIM_EVERY_S`, and never
for more than `TRIM_SHARE` of the time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import time
from collections.abc import Callable

TRIM_EVERY_S = 1.0
TRIM_SHARE = 0.01


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


def trim() -> None:
    """Return glibc's free pages to the system (nothing where there is no glibc)."""
    function = _malloc_trim()
    if function is not None:
        function(0)


def release_memory(device: str) -> None:
    """Give freed memory back: Python's cycles, the CUDA cache, and glibc's free pages
    (without `malloc_trim` the resident size keeps what fragmentation leaves behind)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    trim()


class Trimmer:
    """`trim()` at most once every `every_s` seconds, and for at most `share` of the time
    (a trim walks the whole heap, so a large heap trims less often); call it as often as
    convenient."""

    def __init__(self, every_s: float = TRIM_EVERY_S, share: float = TRIM_SHARE) -> None:
        self.every_s = every_s
        self.share = share
        self._next = time.monotonic() + every_s

    def maybe(self) -> None:
        start = time.monotonic()
        if start < self._next:
            return
        trim()
        took = time.monotonic() - start
        self._next = start + max(self.every_s, took / self.share)
