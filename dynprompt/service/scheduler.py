"""Which queued rows make the next batch: the batching policy, with no threads in it.

A batch closes when it holds `max_batch_size` rows or `max_batch_tokens` padded
tokens (prompts included), or `max_wait` after its oldest row arrived. It starts
with the oldest row (nobody starves) and takes the rows closest to it in length
whose padding stays within `padding_tolerance`; the rest wait for the next batch,
where rows of their own length join them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait_s: float = 0.005
    # A row joins a batch only if the padding it adds (to itself, or to the rows already
    # there when it is the longest) is at most this fraction of its own length.
    padding_tolerance: float = 0.25


@dataclass(eq=False, slots=True)
class Queued(Generic[T]):
    item: T
    cost: int  # the row's assembled length bound: tokens + its model's prompt length
    arrived: float


class Scheduler(Generic[T]):
    """Rows waiting for a batch, in arrival order."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.rows: list[Queued[T]] = []
        self.row_cap = limits.max_batch_size  # lowered after running out of memory

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, item: T, cost: int, now: float) -> None:
        self.rows.append(Queued(item, cost, now))

    def drop(self, gone: Callable[[T], bool]) -> list[T]:
        """Remove (and return) the rows for which `gone` is true."""
        kept: list[Queued[T]] = []
        dropped: list[Queued[T]] = []
        for row in self.rows:
            (dropped if gone(row.item) else kept).append(row)
        self.rows = kept
        return [row.item for row in dropped]

    def wait_s(self, now: float, stopping: bool = False) -> float | None:
        """Seconds until a batch is due (0: now); None when nothing waits."""
        if not self.rows:
            return None
        limits = self.limits
        widest = max(row.cost for row in self.rows)
        full = len(self.rows) >= self.row_cap or len(self.rows) * widest >= limits.max_batch_tokens
        if full or stopping:
            return 0.0
        return max(0.0, self.rows[0].arrived + limits.max_wait_s - now)

    def take(self) -> list[T]:
        """The next batch, in arrival order; its rows leave the queue."""
        queue, limits = self.rows, self.limits
        anchor = queue[0].cost
        order = sorted(range(len(queue)), key=lambda i: (abs(queue[i].cost - anchor), i))
        chosen, width = [order[0]], anchor
        for i in order[1:]:
            if len(chosen) >= self.row_cap:
                break
            cost = queue[i].cost
            wider = max(width, cost)
            padded = (len(chosen) + 1) * wider
            added = padded - len(chosen) * width - cost
            if padded <= limits.max_batch_tokens and added <= limits.padding_tolerance * cost:
                chosen.append(i)
                width = wider
        chosen.sort()
        picked = set(chosen)
        self.rows = [r for i, r in enumerate(queue) if i not in picked]
        return [queue[i].item for i in chosen]
