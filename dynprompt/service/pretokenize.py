"""Tokenising in the HTTP processes (`--workers N`), so that the engine core does not.

There is one engine core per device and one HTTP process per core, and tokenising was
the largest share of the core's own work per request (`dynprompt bench overhead`,
docs/benchmarks.md). So with several HTTP processes, each makes its requests' rows and
the core only checks, batches and computes them, as vLLM's API servers tokenise for its
engine core.

The core says how each served model tokenises (`EngineCore.input_specs`: its tokenizer,
sent once, and its length and truncation side); the front end asks again every
`REFRESH_S` and after a reload it forwarded. Rows travel with the key they were made
under (`RowTokenizer.key`), and a core whose model now tokenises otherwise (a reload in
between) tokenises the texts itself: a stale spec costs time, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from dynprompt.service.protocol import CoreError
from dynprompt.tokenizing import RowTokenizer

log = logging.getLogger("dynprompt.service")

REFRESH_S = 2.0
STARTING_S = 0.2
# Requests with more rows than this are tokenised in a thread: the event loop keeps serving
# the others meanwhile (the Rust tokenizer releases the interpreter lock).
INLINE_ROWS = 4

Inputs = list[tuple[str, str | None]]
Tokens = list[tuple[list[int], list[int], bool]]


class Caller(Protocol):
    """The part of the engine core's handle (`engine.CoreHandle`) this needs."""

    async def call(self, method: str, *args: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Spec:
    tokenizer: RowTokenizer
    max_length: int
    truncation_side: str
    takes_pairs: bool


class Pretokenizer:
    def __init__(self) -> None:
        self._specs: dict[str, Spec] = {}
        self._tokenizers: dict[str, RowTokenizer] = {}
        self._failure: str | None = None
        self._waiting: list[tuple[Spec, str, Inputs, asyncio.Future[Any]]] = []

    @property
    def models(self) -> list[str]:
        return sorted(self._specs)

    async def refresh(self, core: Caller) -> None:
        """Take the core's current specs (tokenizers no served model uses are dropped)."""
        reply: dict[str, Any] = await core.call("input_specs", list(self._tokenizers))
        tokenizers = dict(self._tokenizers)
        for identity, wire in reply["tokenizers"].items():
            # Parsing a tokenizer's JSON takes tens of milliseconds: off the event loop.
            tokenizers[identity] = await asyncio.to_thread(RowTokenizer.from_wire, wire)
        specs = {
            name: Spec(tokenizers[identity], max_length, side, pairs)
            for name, (identity, max_length, side, pairs) in reply["models"].items()
            if identity in tokenizers
        }
        used = {spec.tokenizer.identity for spec in specs.values()}
        self._specs = specs
        self._tokenizers = {k: v for k, v in tokenizers.items() if k in used}

    async def keep_fresh(self, core: Caller, period: float = REFRESH_S) -> None:
        """Refresh every `period` seconds for the process's lifetime (a task)."""
        while True:
            try:
                await self.refresh(core)
                self._failure = None
            except CoreError:
                pass  # the core is not serving (yet): its texts are tokenised there
            except Exception as exc:  # a bug: say it once, and let the core tokenise
                message = f"{type(exc).__name__}: {exc}"
                if message != self._failure:
                    log.error("cannot take the engine's tokenizers; it tokenises: %s", message)
                self._failure = message
                self._specs = {}
            # Until the core serves something (it loads while the HTTP processes start),
            # ask again soon: meanwhile the core tokenises every request.
            await asyncio.sleep(period if self._specs else min(period, STARTING_S))

    async def tokens(
        self, model: str | None, inputs: Inputs, truncation_side: str | None = None
    ) -> tuple[Tokens, str] | None:
        """The rows of a request's inputs for `model` (None: the only served one) and the
        key they were made under; None where the core must tokenise (a model this process
        does not know yet, inputs of the wrong form).

        Calls made in one turn of the event loop are tokenised together, one call of the
        tokenizer per spec at the end of the turn (`_flush`): requests come in bursts (the
        answers of one batch go out together, and their clients send again together), and
        a tokenizer call per request cost the event loop about 1.7 times the CPU per row.
        """
        if model is not None:
            spec = self._specs.get(model)
        else:  # the only served model, as the core reads it
            spec = next(iter(self._specs.values())) if len(self._specs) == 1 else None
        if spec is None:
            return None
        if any((pair is not None) != spec.takes_pairs for _, pair in inputs):
            return None  # the core refuses it
        side = truncation_side or spec.truncation_side
        if len(inputs) > INLINE_ROWS:
            return (await asyncio.to_thread(self._make, spec, side, [inputs]))[0]
        future: asyncio.Future[tuple[Tokens, str] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append((spec, side, inputs, future))
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        groups: dict[tuple[Spec, str], list[tuple[Inputs, asyncio.Future[Any]]]] = {}
        for spec, side, inputs, future in waiting:
            groups.setdefault((spec, side), []).append((inputs, future))
        for (spec, side), members in groups.items():
            try:
                made = self._make(spec, side, [inputs for inputs, _ in members])
            except Exception:  # a bug: the core tokenises these, and no request hangs
                log.exception("tokenising in the HTTP process failed; the engine tokenises")
                made = [None] * len(members)
            for (_, future), result in zip(members, made, strict=True):
                if not future.done():
                    future.set_result(result)

    @staticmethod
    def _make(spec: Spec, side: str, requests: list[Inputs]) -> list[tuple[Tokens, str] | None]:
        """Each request's rows, from one call of the tokenizer."""
        texts = [text for inputs in requests for text, _ in inputs]
        pairs = [pair for inputs in requests for _, pair in inputs] if spec.takes_pairs else None
        try:
            rows = spec.tokenizer.tokenize_rows(texts, pairs, spec.max_length, side)
        except ValueError:
            return [None] * len(requests)  # the core says what is wrong with them
        key = spec.tokenizer.key(spec.max_length, side)
        made: list[tuple[Tokens, str] | None] = []
        at = 0
        for inputs in requests:
            n = len(inputs)
            made.append(
                ([(r.input_ids, r.token_type_ids, r.truncated) for r in rows[at : at + n]], key)
            )
            at += n
        return made
