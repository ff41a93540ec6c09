"""Batched tokenisation (`Backbone.tokenize_rows`) against the per-row reference
(`Backbone.tokenize_row`): ids, token types, truncation flags and router decisions, for
single texts and pairs, right and left truncation, short and very long real texts."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dynprompt.models import Backbone, classify_rows
from dynprompt.tokenizing import CUT_CHARS_PER_TOKEN
from dynprompt.tokenizing import cut as _cut
from tests.conftest import DATA, sst2_rows
from tests.server_util import build_model
from tests.tiny_models import FAMILIES, WORDS, tiny_backbone


def rte_pairs(limit: int) -> list[tuple[str, str]]:
    path = DATA / "superglue" / "rte" / "val.jsonl"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(r["premise"], r["hypothesis"]) for r in rows[:limit]]


def long_review(rng: random.Random, chars: int) -> str:
    """A long real-language text: SST-2 sentences strung together past `chars` characters."""
    sentences = [text for text, _ in sst2_rows("train", 5000)]
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < chars:
        out.append(rng.choice(sentences))
    return " ".join(out)


def assert_same_rows(
    backbone: Backbone,
    texts: list[str],
    pairs: list[str | None],
    max_length: int,
    side: str,
) -> None:
    batched = backbone.tokenize_rows(texts, pairs, max_length, side)
    for i, (text, pair) in enumerate(zip(texts, pairs, strict=True)):
        alone = backbone.tokenize_row(text, pair, max_length, side)
        assert batched[i].input_ids == alone.input_ids, (i, text[:80], pair)
        assert batched[i].token_type_ids == alone.token_type_ids, (i, text[:80])
        assert batched[i].truncated == alone.truncated, (i, text[:80])
        assert len(alone.input_ids) <= max_length


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_sentences_pairs_and_long_reviews_match_the_per_row_path(
    minilm: Backbone, side: str
) -> None:
    rng = random.Random(0)
    singles = [text for text, _ in sst2_rows("dev", 200)]
    singles += [long_review(rng, n) for n in (700, 3000, 25_000)]
    assert_same_rows(minilm, singles, [None] * len(singles), 64, side)
    assert any(r.truncated for r in minilm.tokenize_rows(singles, None, 64, side))
    premises, hypotheses = zip(*rte_pairs(60), strict=True)
    texts = [*premises, long_review(rng, 25_000), "short premise"]
    pairs: list[str | None] = [*hypotheses, "a hypothesis", long_review(rng, 9000)]
    for max_length in (32, 128):
        assert_same_rows(minilm, texts, pairs, max_length, side)
    # Mixed singles and pairs in one call.
    mixed_texts = singles[:20] + list(premises[:20])
    mixed_pairs: list[str | None] = [None] * 20 + list(hypotheses[:20])
    assert_same_rows(minilm, mixed_texts, mixed_pairs, 48, side)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_tiny_families_match_the_per_row_path(family: str, side: str) -> None:
    backbone = tiny_backbone(family)
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 400))) for _ in range(40)]
    pairs: list[str | None] = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 90))) if i % 2 else None
        for i in range(40)
    ]
    for max_length in (8, 40, 200):
        assert_same_rows(backbone, texts, pairs, max_length, side)


def test_routes_from_batched_tokens_equal_the_per_row_path(minilm: Backbone) -> None:
    rng = random.Random(1)
    texts = [text for text, _ in sst2_rows("dev", 48)] + [long_review(rng, 25_000)]
    models = [
        build_model("ipos", minilm, seed=1, variant="instance_position", labels=["n", "p"]),
        build_model("dyn", minilm, seed=2, variant="dynamic", labels=["n", "p"]),
    ]
    for model in models:
        per_row = minilm.collate([minilm.tokenize_row(t, None, 128) for t in texts])
        batched = minilm.tokenize(texts, max_length=128)
        assert torch.equal(per_row.input_ids, batched.input_ids)
        assert torch.equal(per_row.token_type_ids, batched.token_type_ids)
        assert per_row.truncated == batched.truncated
        want, _ = classify_rows(minilm, [model] * len(texts), per_row)
        got, _ = classify_rows(minilm, [model] * len(texts), batched)
        routes = [(r.prompt_length, r.tokens_before) for r in got]
        assert routes == [(r.prompt_length, r.tokens_before) for r in want]
        assert len(set(routes)) > 1


def test_a_long_text_is_cut_at_whitespace_before_tokenising() -> None:
    text = "word " * 10_000
    kept, was_cut = _cut(text, CUT_CHARS_PER_TOKEN * 62, "right")
    assert was_cut and len(kept) <= CUT_CHARS_PER_TOKEN * 62 and kept.endswith("word")
    kept, was_cut = _cut(text.strip(), CUT_CHARS_PER_TOKEN * 62, "left")
    assert was_cut and len(kept) <= CUT_CHARS_PER_TOKEN * 62 + 1 and kept.startswith(" word")
    assert _cut("short text", 100, "right") == ("short text", False)
    # No whitespace at all: cut at the limit.
    assert _cut("x" * 500, 100, "right") == ("x" * 100, True)
