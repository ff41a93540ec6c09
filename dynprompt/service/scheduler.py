"""Which queued rows make the next batch: the batching policy, with no threads in it.

A batch closes when it holds `max_batch_size` rows or `max_batch_tokens` padded
tokens (prompts included), or `max_wait` after its oldest row arrived. It starts
with the oldest row (nobody starves) and takes the rows closest to it in length
whose padding stays within `padding_tolerance`; the rest wait for the next batch,
where rows of their own length join them.

Padding is not the only cost: every batch also pays a fixed price (Python, kernel
launches, the answers' round trip), which for a small model or a GPU dwarfs a few
padded tokens. So a batch may carry up to `padding_budget` padded tokens beyond what
the per-row tolerance allows: the break-even where the padding would cost as much as
the batch those rows would otherwise need. `CostModel` learns it from the batches run.
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
    # Padded tokens a batch may carry past the tolerance; None: learned (`CostModel`).
    padding_budget: int | None = None


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
        # Padded tokens a batch may carry past the tolerance (set by the worker when learned).
        self.padding_budget = limits.padding_budget or 0

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
        """The next batch, in arrival order; its rows leave the queue.

        Candidates are visited nearest in length first (ties: oldest first). Each side of
        the anchor stops at its first row that does not fit: the batch only grows, so a
        row refused now is refused later, and so is every row farther out on its side
        (shorter rows add more padding; longer ones widen the batch more). A take visits
        about a batch of rows after one sort on integer keys; sorting on tuples and
        visiting every row cost 20-200 us a row taken at 4,096-16,384 queued rows
        (`dynprompt bench scheduler`).
        """
        queue, limits = self.rows, self.limits
        anchor, n = queue[0].cost, len(queue)
        keys = [abs(row.cost - anchor) * n + i for i, row in enumerate(queue)]
        order = sorted(range(n), key=keys.__getitem__)
        chosen, width, real = [order[0]], anchor, anchor
        shorter_open = longer_open = True
        for i in order[1:]:
            if len(chosen) >= self.row_cap or not (shorter_open or longer_open):
                break
            cost = queue[i].cost
            shorter = cost < anchor
            if not (shorter_open if shorter else longer_open):
                continue
            wider = max(width, cost)
            padded = (len(chosen) + 1) * wider
            added = padded - len(chosen) * width - cost
            affordable = (
                added <= limits.padding_tolerance * cost
                or padded - real - cost <= self.padding_budget
            )
            if padded <= limits.max_batch_tokens and affordable:
                chosen.append(i)
                width, real = wider, real + cost
            elif shorter:
                shorter_open = False
            else:
                longer_open = False
        chosen.sort()
        picked = set(chosen)
        self.rows = [r for i, r in enumerate(queue) if i not in picked]
        return [queue[i].item for i in chosen]


class CostModel:
    """A batch's seconds as `fixed + per_token * padded_tokens`, fitted by least squares
    over the recent batches (each older batch weighs `decay` times less).

    `fixed / per_token` is the break-even: that many padded tokens cost as much as
    running one more batch. On a CPU with a real model it is a handful of tokens (keep
    grouping by length); with a tiny model or on a GPU it is hundreds (fill batches).
    """

    def __init__(self, decay: float = 0.99, min_batches: int = 16) -> None:
        self.decay = decay
        self.min_batches = min_batches
        self.batches = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, padded_tokens: int, seconds: float) -> None:
        d, x = self.decay, float(padded_tokens)
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + seconds
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * seconds
        self.batches += 1

    def break_even_tokens(self, cap: int) -> int | None:
        """Padded tokens worth one batch, at most `cap`; None until the fit means something
        (too few batches, or batches all of one size)."""
        if self.batches < self.min_batches:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x <= (0.05 * mean_x) ** 2:  # sizes too alike to tell fixed from per-token
            return None
        per_token = (self._xy / self._w - mean_x * mean_y) / var_x
        fixed = mean_y - per_token * mean_x
        if fixed <= 0:
            return 0
        if per_token <= fixed / cap:  # padding is (nearly) free at this scale
            return cap
        return int(fixed / per_token)
