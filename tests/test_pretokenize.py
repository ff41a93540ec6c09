"""Tokenising in the HTTP processes (`--workers N`): the front end's rows against the engine's.

The front end takes its tokenizer from a real engine core (`EngineCore.input_specs`); the
core uses rows a front end made only under its own key, and tokenises the texts itself
otherwise. Which rows ran shows in the answer: the tests give rows of one text with the
inputs of another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from dynprompt.models import Backbone, DynPromptModel, save_checkpoint
from dynprompt.service.config import Settings
from dynprompt.service.core import EngineCore
from dynprompt.service.pretokenize import Pretokenizer
from dynprompt.service.protocol import Answer, Submission
from dynprompt.service.transport import LocalCore
from dynprompt.tokenizing import RowTokenizer
from tests.server_util import Collect, build_model, offline_predictions

SHORT = "a fine film"
LONG = "a long and winding review that goes on and on about a dull film " * 6
TEXTS = [SHORT, LONG, "great", "the worst two hours of my life, and the popcorn was stale"]
_TICKETS = itertools.count(1)


def rows_of(tokenizer: RowTokenizer, texts: list[str], max_length: int) -> Any:
    rows = tokenizer.tokenize_rows(texts, None, max_length, "right")
    return [(r.input_ids, r.token_type_ids, r.truncated) for r in rows]


@pytest.fixture
def core(tmp_path: Path, minilm: Backbone) -> Any:
    settings = Settings.model_validate(
        {"model_repository": tmp_path, "device": "cpu", "max_wait_ms": 0.0}
    )
    made = EngineCore(settings, lambda name, device, dtype: minilm)
    yield made
    made.stop(30)


def write(folder: Path, backbone: Backbone, max_length: int) -> DynPromptModel:
    model = build_model(
        "m", backbone, variant="prefix", feature="embeddings", labels=["neg", "pos"],
        max_length=max_length,
    )  # fmt: skip
    save_checkpoint(model, folder / "m")
    return model


def submit(core: EngineCore, text: str, tokens: Any, key: str | None) -> Answer:
    target = Collect()
    now = time.monotonic()
    sub = Submission(
        next(_TICKETS), "t", "m", [(text, None)], True, now, now + 60, None, None, tokens, key
    )
    core.submit(sub, target)
    answer = target.wait(sub.ticket)
    assert answer.error is None, answer.message
    return answer


def test_rows_made_in_another_process_equal_the_backbones(minilm: Backbone) -> None:
    """A tokenizer rebuilt from its wire form makes the backbone's rows, pairs and both
    truncation sides included, and has the same identity."""
    own = minilm.row_tokenizer()
    assert own is not None
    copy = RowTokenizer.from_wire(own.to_wire())
    assert copy.identity == own.identity
    pairs = [None, "and its sequel", None, LONG]
    for side in ("right", "left"):
        for given in (None, pairs):
            assert copy.tokenize_rows(TEXTS, given, 24, side) == minilm.tokenize_rows(
                TEXTS, given, 24, side
            )
    assert len({own.key(24, "right"), own.key(32, "right"), own.key(24, "left")}) == 3


def test_the_core_uses_a_front_ends_rows_only_under_its_key(
    core: EngineCore, tmp_path: Path, minilm: Backbone
) -> None:
    model = write(tmp_path, minilm, 32)
    core.load(tmp_path)
    tokenizer = minilm.row_tokenizer()
    assert tokenizer is not None
    made = rows_of(tokenizer, [LONG], 32)  # rows of LONG sent with the text SHORT
    short, long = (r.probs for r in offline_predictions(model, [SHORT, LONG]))
    assert short != pytest.approx(long, abs=1e-3)
    used = submit(core, SHORT, made, tokenizer.key(32, "right"))
    assert used.rows[0].probs == pytest.approx(long, abs=1e-5)
    for key in (tokenizer.key(64, "right"), tokenizer.key(32, "left"), "another:32:right", None):
        ignored = submit(core, SHORT, made, key)
        assert ignored.rows[0].probs == pytest.approx(short, abs=1e-5), key
    # Not one row per input (a front end's bug): tokenised again, not a crash.
    ignored = submit(core, SHORT, made * 2, tokenizer.key(32, "right"))
    assert ignored.rows[0].probs == pytest.approx(short, abs=1e-5)
    registry = core.metrics.registry
    tokenized = [
        registry.get_sample_value("dynprompt_tokenized_rows_total", {"where": where})
        for where in ("http", "engine")
    ]
    assert tokenized == [1, 5]


def test_the_front_end_tokenises_as_the_core_would_and_follows_a_reload(
    core: EngineCore, tmp_path: Path, minilm: Backbone
) -> None:
    write(tmp_path, minilm, 32)
    core.load(tmp_path)
    tokenizer = minilm.row_tokenizer()
    assert tokenizer is not None

    async def run() -> None:
        front = Pretokenizer()
        handle = LocalCore(core, asyncio.get_running_loop())
        assert await front.tokens("m", [(SHORT, None)]) is None  # not known yet
        await front.refresh(handle)
        assert front.models == ["m"]
        for name in ("m", None):  # None: the only served model
            got = await front.tokens(name, [(t, None) for t in TEXTS])
            assert got == (rows_of(tokenizer, TEXTS, 32), tokenizer.key(32, "right"))
        # Calls of one turn of the event loop are tokenised together: each gets its own rows.
        calls = [[(t, None)] * (1 + i % 3) for i, t in enumerate(TEXTS)]
        together = await asyncio.gather(*(front.tokens("m", inputs) for inputs in calls))
        key = tokenizer.key(32, "right")
        assert together == [
            (rows_of(tokenizer, [t] * (1 + i % 3), 32), key) for i, t in enumerate(TEXTS)
        ]
        # Eight rows go through a thread, off the event loop: the same rows.
        got = await front.tokens("m", [(t, None) for t in TEXTS * 2])
        assert got is not None and got[0] == rows_of(tokenizer, TEXTS * 2, 32)
        left = await front.tokens("m", [(LONG, None)], "left")
        assert left is not None and left[1] == tokenizer.key(32, "left")
        assert await front.tokens("m", [(SHORT, "a pair")]) is None
        assert await front.tokens("other", [(SHORT, None)]) is None

        replacement = write(tmp_path, minilm, 48)  # a reload changes how "m" tokenises
        await handle.call("reload")
        stale = await front.tokens("m", [(LONG, None)])
        assert stale is not None and stale[1] == tokenizer.key(32, "right")
        answer = submit(core, LONG, *stale)  # the core tokenises LONG to 48 itself
        (want,) = offline_predictions(replacement, [LONG])
        assert answer.rows[0].probs == pytest.approx(want.probs, abs=1e-5)
        await front.refresh(handle)
        fresh = await front.tokens("m", [(LONG, None)])
        assert fresh == (rows_of(tokenizer, [LONG], 48), tokenizer.key(48, "right"))

    asyncio.run(run())
