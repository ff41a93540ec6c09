"""Shape buckets (`models.cuda_graphs`): a batch padded to a bucket of rows and width gives
the real rows exactly what the unpadded forward gives them. On a CPU the padding runs with
the eager forward (`capture=False`); on a GPU the same padded shapes are what the graphs
replay."""

from __future__ import annotations

import random

import pytest
import torch

from dynprompt.models import Backbone, classify_rows
from dynprompt.models.cuda_graphs import ROW_BUCKETS, Bucketed, bucket, width_bucket
from tests.server_util import build_model
from tests.tiny_models import FAMILIES, WORDS, tiny_backbone


def test_buckets_round_up_and_stop_at_the_limit() -> None:
    assert bucket(1, ROW_BUCKETS) == 1 and bucket(3, ROW_BUCKETS) == 4
    assert bucket(33, ROW_BUCKETS) == 48 and bucket(512, ROW_BUCKETS) == 512
    assert bucket(5000, ROW_BUCKETS) is None
    assert width_bucket(1, 512) == 16 and width_bucket(16, 512) == 16
    assert width_bucket(17, 512) == 32 and width_bucket(500, 512) == 512
    assert width_bucket(513, 512) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_forward_equals_the_unpadded_one(family: str) -> None:
    backbone = tiny_backbone(family)
    rng = random.Random(5)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(7)]
    pairs = [rng.choice(WORDS) if i % 3 == 0 else None for i in range(7)]
    encoded = backbone.tokenize(texts, pairs)
    embeds = backbone.embed(encoded.input_ids)
    buckets = Bucketed(
        backbone._hidden_states,
        max_rows=64,
        max_width=256,
        capture=False,
        with_types=backbone._accepts_token_types,
    )
    with torch.inference_mode():
        want = backbone._hidden_states(embeds, encoded.attention_mask, encoded.token_type_ids)
        got = buckets(embeds, encoded.attention_mask, encoded.token_type_ids)
    assert got.shape == want.shape
    real = encoded.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert list(buckets.graphs) == [(8, -(-embeds.shape[1] // 16) * 16)]


def test_classify_rows_answers_the_same_with_buckets(sst2_sentences: list[str]) -> None:
    from dynprompt.models import load_backbone

    plain, bucketed = load_backbone("minilm"), load_backbone("minilm")
    bucketed.use_buckets(max_rows=32, capture=False)
    answers = []
    for backbone in (plain, bucketed):
        model = build_model(
            "ipos", backbone, seed=3, variant="instance_position", labels=["n", "p"]
        )
        encoded = backbone.tokenize(sst2_sentences[:20])
        results, _ = classify_rows(backbone, [model] * 20, encoded)
        answers.append(results)
    for a, b in zip(*answers, strict=True):
        assert (a.prompt_length, a.tokens_before) == (b.prompt_length, b.tokens_before)
        assert a.probs == pytest.approx(b.probs, abs=1e-5)
    assert bucketed.buckets.graphs, "the bucketed backbone never used its buckets"


def test_a_batch_beyond_the_largest_bucket_runs_unpadded(minilm: Backbone) -> None:
    buckets = Bucketed(minilm._hidden_states, max_rows=4, max_width=64, capture=False)
    encoded = minilm.tokenize(["a film"] * 6)
    embeds = minilm.embed(encoded.input_ids)
    with torch.inference_mode():
        out = buckets(embeds, encoded.attention_mask, None)
    assert out.shape[0] == 6 and not buckets.graphs
