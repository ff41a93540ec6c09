"""Progress of long loops on stderr: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns, which a log file, `nohup`, a CI log or
`docker logs` turn into one endless line that shows nothing until the run ends. So
when the stream is not a terminal, a plain line is written instead every `every`
steps or every `seconds` seconds, whichever comes first, with the same figures the
bar would show (count, rate, time left and the postfix values).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_SECONDS = 30.0


class ProgressDisplay:
    """A tqdm bar when `stream` is a terminal, plain lines when it is not, nothing when
    `enabled` is false."""

    def __init__(
        self,
        *,
        desc: str,
        total: int | None = None,
        initial: int = 0,
        unit: str = "it",
        unit_scale: bool = False,
        every: int | None = None,
        seconds: float = PLAIN_SECONDS,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.desc, self.total, self.unit, self.unit_scale = desc, total, unit, unit_scale
        self.every, self.seconds, self.clock = every, seconds, clock
        self.n = self.start_n = self.last_n = initial
        self.started = self.last_time = clock()
        self.postfix: dict[str, str] = {}
        isatty = getattr(self.stream, "isatty", None)
        self.tty = enabled and bool(isatty and isatty())
        self.plain = enabled and not self.tty
        self.bar: Any = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain:
            due_steps = self.every is not None and self.n - self.last_n >= self.every
            if due_steps or self.clock() - self.last_time >= self.seconds:
                self._line()

    def set_postfix(self, **values: str) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def write(self, message: str) -> bool:
        """Print a message above the bar; False when there is no bar (the caller logs it)."""
        if self.bar is None:
            return False
        self.bar.write(message, file=self.stream)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain and self.n != self.last_n:
            self._line()

    def line(self) -> str:
        """The plain line for the current state."""
        from tqdm import tqdm

        now = self.clock()
        elapsed = now - self.started
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 and done else None
        postfix = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        if self.total:
            bar_format = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        else:
            bar_format = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        text: str = tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            prefix=self.desc,
            unit=self.unit,
            unit_scale=self.unit_scale,
            rate=rate,
            postfix=postfix or None,
            bar_format=bar_format,
            initial=self.start_n,
        )
        return text

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_n = self.n
        self.last_time = self.clock()
