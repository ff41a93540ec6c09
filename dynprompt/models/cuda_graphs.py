"""CUDA graphs of a backbone's forward, one per shape bucket.

A small model's forward is hundreds of kernel launches, each a few microseconds of
CPU: at small batches the GPU waits for Python. A CUDA graph records the launches
once and replays them with one call. Graphs need fixed shapes, so a batch is padded
up to a bucket of rows and of width (`buckets`): padded rows attend to one position
and are dropped, padded positions are masked, and the real rows' outputs are what
the unpadded forward computes. Graphs are captured on first use of a bucket and the
least recently used ones are dropped beyond `max_graphs` (each holds its own memory).
Any failure to capture falls back, once and with a warning, to the eager forward.

`Bucketed(..., capture=False)` runs the same padding with the eager forward; it is
how the padding is tested on a CPU, and what runs where graphs cannot.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Forward = Callable[[Tensor, Tensor, Tensor | None], Tensor]
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
WIDTH_STEP = 16


def bucket(value: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size >= value, or None beyond the largest."""
    at = bisect.bisect_left(sizes, value)
    return sizes[at] if at < len(sizes) else None


def width_bucket(width: int, limit: int) -> int | None:
    rounded = -(-width // WIDTH_STEP) * WIDTH_STEP
    return rounded if rounded <= limit else None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    embeds: Tensor
    mask: Tensor
    types: Tensor | None
    out: Tensor | None


class Bucketed:
    """`forward` run on inputs padded to a (rows, width) bucket, replayed from a CUDA graph
    per bucket when `capture` is on."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_rows: int,
        max_width: int,
        capture: bool,
        max_graphs: int = 64,
        with_types: bool = False,
    ) -> None:
        self.forward = forward
        self.rows = tuple(r for r in ROW_BUCKETS if r < max_rows) + (max_rows,)
        self.max_width = max_width
        self.capture = capture
        self.max_graphs = max_graphs
        self.with_types = with_types
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.failed = False

    def __call__(self, embeds: Tensor, mask: Tensor, types: Tensor | None) -> Tensor:
        rows, width, dim = embeds.shape
        b_rows, b_width = bucket(rows, self.rows), width_bucket(width, self.max_width)
        if b_rows is None or b_width is None or self.failed:
            return self.forward(embeds, mask, types)
        entry = self.graphs.get((b_rows, b_width))
        if entry is None:
            entry = self._make(b_rows, b_width, dim, embeds.dtype, embeds.device)
            if entry is None:
                return self.forward(embeds, mask, types)
        self.graphs.move_to_end((b_rows, b_width))
        # Fill the bucket: real rows top-left, padded positions masked, padded rows
        # attending to their first position only (an all-masked row would be NaN).
        entry.embeds[:rows, :width].copy_(embeds)
        entry.mask.zero_()
        entry.mask[:rows, :width].copy_(mask)
        entry.mask[rows:, 0] = 1
        if entry.types is not None:
            entry.types.zero_()
            if types is not None:
                entry.types[:rows, :width].copy_(types)
        if entry.graph is None:
            out = self.forward(entry.embeds, entry.mask, entry.types)
        else:
            entry.graph.replay()
            assert entry.out is not None
            out = entry.out
        # A copy: the graph's output buffer is overwritten by its next replay.
        return out[:rows, :width].clone()

    def _make(
        self, rows: int, width: int, dim: int, dtype: torch.dtype, device: torch.device
    ) -> _Graph | None:
        embeds = torch.zeros(rows, width, dim, dtype=dtype, device=device)
        mask = torch.zeros(rows, width, dtype=torch.long, device=device)
        mask[:, 0] = 1
        types = (
            torch.zeros(rows, width, dtype=torch.long, device=device) if self.with_types else None
        )
        entry = _Graph(None, embeds, mask, types, None)
        if self.capture:
            try:
                entry.graph, entry.out = self._capture(embeds, mask, types)
            except Exception as exc:  # a model that cannot be captured still serves, eagerly
                self.failed = True
                self.graphs.clear()
                log.warning(
                    "CUDA graph capture failed (%s: %s); running the backbone eagerly",
                    type(exc).__name__, exc,
                )  # fmt: skip
                return None
        self.graphs[(rows, width)] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry

    def _capture(
        self, embeds: Tensor, mask: Tensor, types: Tensor | None
    ) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy initialisation must not happen inside capture
                self.forward(embeds, mask, types)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(embeds, mask, types)
        return graph, out
