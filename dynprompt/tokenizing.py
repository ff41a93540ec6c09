"""Texts to token rows, the one way: for the engine's backbones and for the HTTP processes.

It imports neither torch nor transformers (only the Rust `tokenizers`, and only when a
tokenizer is built), so the HTTP processes of `--workers N` can tokenise their own
requests: tokenising is the largest part of what the engine core does per request, and
there is one engine core per device but an HTTP process per core (vLLM's API servers
tokenise for its engine core the same way). `RowTokenizer.to_wire` and `from_wire` carry
a tokenizer from the engine to them; its `identity` tells the engine whether rows a front
end sends were made the way it would make them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# A text is cut to this many characters per token of budget before it is tokenised (natural
# language averages 4-5); a cut that comes up short is retried this many times, 4x longer.
CUT_CHARS_PER_TOKEN = 16
CUT_RETRIES = 3
_SPACE = re.compile(r"\s")


@dataclass
class TokenizedRow:
    """One input tokenised on its own, so requests can be batched later in any mix."""

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class Template:
    """Where the tokenizer puts special tokens around one text or a pair.

    Read once from the tokenizer's own output on probe texts (`models.backbone`):
    transformers 5 no longer exposes `build_inputs_with_special_tokens` on fast
    tokenizers, and the specials are added here to already-truncated ids.
    """

    lead: list[int]
    trail: list[int]
    lead_types: list[int]
    trail_types: list[int]
    pair_lead: list[int]
    pair_mid: list[int]
    pair_trail: list[int]
    pair_lead_types: list[int]
    pair_mid_types: list[int]
    pair_trail_types: list[int]
    a_type: int
    b_type: int

    def specials(self, pair: bool) -> int:
        if pair:
            return len(self.pair_lead) + len(self.pair_mid) + len(self.pair_trail)
        return len(self.lead) + len(self.trail)

    def wrap(self, first: list[int], second: list[int] | None) -> tuple[list[int], list[int]]:
        """(ids, token types) with the special tokens added."""
        if second is None:
            ids = self.lead + first + self.trail
            types = self.lead_types + [self.a_type] * len(first) + self.trail_types
        else:
            ids = self.pair_lead + first + self.pair_mid + second + self.pair_trail
            types = (
                self.pair_lead_types
                + [self.a_type] * len(first)
                + self.pair_mid_types
                + [self.b_type] * len(second)
                + self.pair_trail_types
            )
        return ids, types

    def finish(
        self,
        first: list[int],
        second: list[int] | None,
        max_length: int,
        truncation_side: str,
        was_cut: bool = False,
    ) -> TokenizedRow:
        """Truncate longest-first to `max_length` (specials included) and add the specials."""
        budget = max_length - self.specials(second is not None)
        if budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        total = len(first) + (len(second) if second is not None else 0)
        truncated = total > budget
        if truncated:
            first, second = truncate_longest_first(first, second, budget, truncation_side)
        ids, types = self.wrap(first, second)
        return TokenizedRow(ids, types, truncated or was_cut)


class RowTokenizer:
    """A fast (Rust) tokenizer with padding and truncation off, and its `Template`.

    Never reconfigured after it is made, so concurrent `tokenize_rows` calls are safe
    (transformers sets padding and truncation on its own tokenizer per call).
    """

    def __init__(self, fast: Any, template: Template) -> None:
        fast.no_padding()
        fast.no_truncation()
        self.fast = fast
        self.template = template
        self._wire: str | None = None
        self._identity: str | None = None

    @classmethod
    def from_wire(cls, wire: tuple[str, dict[str, Any]]) -> RowTokenizer:
        from tokenizers import Tokenizer

        serialized, template = wire
        made = cls(Tokenizer.from_str(serialized), Template(**template))
        made._wire = serialized
        return made

    def to_wire(self) -> tuple[str, dict[str, Any]]:
        """Builtins only: pickled to another process, rebuilt there by `from_wire`."""
        if self._wire is None:
            self._wire = self.fast.to_str()
        return self._wire, asdict(self.template)

    @property
    def identity(self) -> str:
        """Equal for two tokenizers that make the same rows of any text."""
        if self._identity is None:
            serialized, template = self.to_wire()
            digest = hashlib.sha256(serialized.encode())
            digest.update(repr(sorted(template.items())).encode())
            self._identity = digest.hexdigest()[:16]
        return self._identity

    def key(self, max_length: int, truncation_side: str) -> str:
        """Names how rows are made: rows made under equal keys are equal."""
        return f"{self.identity}:{max_length}:{truncation_side}"

    def tokenize_rows(
        self,
        texts: Sequence[str],
        pairs: Sequence[str | None] | None = None,
        max_length: int = 128,
        truncation_side: str = "right",
    ) -> list[TokenizedRow]:
        """Tokenise many inputs with one call of the fast tokenizer: row for row what one
        call of the tokenizer per text, truncated longest-first, gives.

        The Rust tokenizer encodes the whole batch in one call (in parallel, without the
        GIL); truncation and special tokens are then list operations (`Template.finish`).
        Before encoding, each text is cut by characters at a whitespace boundary (`cut`),
        so the cost of a row is bounded by what the model reads, not by the text's length:
        a 20,000-character review costs what its first few hundred tokens cost.
        Tokenizers split words at whitespace, so the cut text's tokens are a prefix (or,
        for left truncation, a suffix) of the full text's; a row whose cut yields no more
        tokens than the budget is encoded again from a longer cut, so the result is exact
        for any text whose cut fell on whitespace.
        """
        template = self.template
        pairs = list(pairs) if pairs is not None else [None] * len(texts)
        if len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        budgets = {pair: max_length - template.specials(pair) for pair in (False, True)}
        if any(budgets[p is not None] < 1 for p in pairs):
            raise ValueError(f"max_length {max_length} leaves no room for text")
        # One flat list of segments: every text, then every pair.
        segments = [*texts, *(p for p in pairs if p is not None)]
        budget_of = [budgets[p is not None] for p in pairs] + [
            budgets[True] for p in pairs if p is not None
        ]
        limits = [CUT_CHARS_PER_TOKEN * b for b in budget_of]
        cuts = [
            cut(text, limit, truncation_side) for text, limit in zip(segments, limits, strict=True)
        ]
        ids = self._encode([c for c, _ in cuts])
        for _ in range(CUT_RETRIES):
            # A cut segment that came up short may hold more tokens further on: cut longer.
            short = [
                i for i, (c, was_cut) in enumerate(cuts) if was_cut and len(ids[i]) <= budget_of[i]
            ]
            if not short:
                break
            for i in short:
                limits[i] *= 4
                cuts[i] = cut(segments[i], limits[i], truncation_side)
            for i, row in zip(short, self._encode([cuts[i][0] for i in short]), strict=True):
                ids[i] = row
        rows = []
        second = len(texts)
        for i, pair in enumerate(pairs):
            pair_ids = None
            still_cut = cuts[i][1]
            if pair is not None:
                pair_ids = ids[second]
                still_cut = still_cut or cuts[second][1]
                second += 1
            rows.append(template.finish(ids[i], pair_ids, max_length, truncation_side, still_cut))
        return rows

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        fast = self.fast
        encode = getattr(fast, "encode_batch_fast", None) or fast.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=False)]


def truncate_longest_first(
    first: list[int], second: list[int] | None, budget: int, side: str
) -> tuple[list[int], list[int] | None]:
    """Trim the longer segment first, as Hugging Face's `longest_first` does."""
    if second is None:
        return (first[:budget] if side == "right" else first[len(first) - budget :]), None
    a, b = len(first), len(second)
    while a + b > budget:
        if a >= b:
            a -= 1
        else:
            b -= 1
    if side == "right":
        return first[:a], second[:b]
    return first[len(first) - a :], second[len(second) - b :]


def cut(text: str, limit: int, side: str) -> tuple[str, bool]:
    """`text` cut to about `limit` characters at a whitespace boundary, and whether it was.

    Right truncation keeps the start, left truncation the end. Cutting at whitespace keeps
    every word whole, so the tokens of what is kept are those the full text has there. A
    text with no whitespace near the limit is cut at the limit.
    """
    if len(text) <= limit:
        return text, False
    if side == "right":
        window = text[: limit + 1]
        at = max(window.rfind(c) for c in " \t\n\r")
        return (text[:at] if at > 0 else text[:limit]), True
    match = _SPACE.search(text, len(text) - limit - 1)
    return (text[match.start() :] if match else text[len(text) - limit :]), True
