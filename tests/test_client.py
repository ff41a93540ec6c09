"""`dynprompt.service.client` (sync and async) against real `dynprompt serve` processes.

One server holds two seeded checkpoints behind an API key: answers must equal the offline
predictions, errors must carry the server's own type and message, request ids must round-trip.
A second server admits one request at a time and holds every batch open 300 ms, so concurrent
calls really get 429: the client must retry them after `Retry-After` until all succeed, and a
client without retries must surface the 429. A closed port gives real connection errors.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel
from dynprompt.service.client import (
    AsyncClient,
    Classification,
    Client,
    DynPromptError,
    RetryEvent,
)
from dynprompt.service.schemas import ClassifyResponse
from tests.server_util import (
    TEST_MODELS,
    ServerProcess,
    assert_result_matches,
    build_repository,
    free_port,
    offline_predictions,
    start_server,
)

pytestmark = pytest.mark.timeout(300)

KEY = "client-test-key"
TEXTS = [
    "a gripping, funny and thoroughly enjoyable film",
    "dull",
    "the plot is a mess and the ending drags on forever",
]
PAIRS = [("A man is sleeping.", "A person rests."), ("It rains.", "The sun is out.")]
# Rounds of concurrent calls against the one-slot server, each until a 429 has been seen.
ROUNDS, CONCURRENT = 6, 4
HEX_ID = re.compile(r"^[0-9a-f]{32}$")

Models = dict[str, DynPromptModel]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> tuple[Path, Models]:
    path = tmp_path_factory.mktemp("client-repo")
    chosen = {name: TEST_MODELS[name] for name in ("ipos", "pair")}
    return path, build_repository(path, minilm, chosen)


@pytest.fixture(scope="module")
def server(models: tuple[Path, Models], tmp_path_factory: pytest.TempPathFactory) -> Any:
    proc = start_server(
        ["--model-repository", str(models[0]), "--api-key", KEY],
        log_dir=tmp_path_factory.mktemp("client-logs"),
    )
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


@pytest.fixture(scope="module")
def busy_server(models: tuple[Path, Models], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One request admitted at a time; each batch waits 300 ms for company before it runs."""
    proc = start_server(
        [
            "--model-repository", str(models[0]),
            "--max-queue-requests", "1",
            "--max-wait-ms", "300",
        ],
        log_dir=tmp_path_factory.mktemp("client-busy-logs"),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def check_answers(answer: Classification, model: DynPromptModel, inputs: list[Any]) -> None:
    assert isinstance(answer, ClassifyResponse)
    want = offline_predictions(
        model,
        [i if isinstance(i, str | dict) else {"text": i[0], "text_pair": i[1]} for i in inputs],
    )
    assert len(answer.results) == len(want)
    labels = model.labels
    for got, expected in zip(answer.results, want, strict=True):
        assert_result_matches(got.model_dump(exclude_none=True), expected, labels)


# --------------------------------------------------------------------------- answers


def test_sync_client_answers_equal_offline_predictions(
    server: ServerProcess, models: tuple[Path, Models]
) -> None:
    built = models[1]
    with Client(server.url, api_key=KEY, timeout=60) as client:
        answer = client.classify(TEXTS, "ipos", return_routing=True, return_all_scores=True)
        assert answer.model == "ipos"
        assert all(r.routing is not None and r.scores is not None for r in answer.results)
        check_answers(answer, built["ipos"], TEXTS)
        # Pairs as tuples and as dicts are the same inputs.
        as_dicts = [{"text": a, "text_pair": b} for a, b in PAIRS]
        by_tuple = client.classify(PAIRS, "pair", return_all_scores=True)
        by_dict = client.classify(as_dicts, "pair", return_all_scores=True)
        check_answers(by_tuple, built["pair"], as_dicts)
        assert by_tuple.results == by_dict.results

        cards = client.models()
        assert [c.name for c in cards] == ["ipos", "pair"]
        card = client.model("pair")
        assert card.pair_input is True
        assert card.labels == built["pair"].labels
        assert client.health().status == "ok"
        assert client.ready() is True
        reloaded = client.reload()
        assert sorted(reloaded.unchanged) == ["ipos", "pair"] and not reloaded.refused


def test_async_client_answers_equal_offline_predictions(
    server: ServerProcess, models: tuple[Path, Models]
) -> None:
    built = models[1]

    async def main() -> None:
        async with AsyncClient(server.url, api_key=KEY, timeout=60) as client:
            answers = await asyncio.gather(
                client.classify(TEXTS, "ipos", return_routing=True, return_all_scores=True),
                client.classify(PAIRS, "pair", return_routing=True),
            )
            check_answers(answers[0], built["ipos"], TEXTS)
            check_answers(answers[1], built["pair"], list(PAIRS))
            assert answers[0].request_id != answers[1].request_id
            assert [c.name for c in await client.models()] == ["ipos", "pair"]
            assert (await client.model("ipos")).variant == "instance_position"
            assert (await client.health()).status == "ok"
            assert await client.ready() is True
            assert sorted((await client.reload()).unchanged) == ["ipos", "pair"]

    asyncio.run(main())


# --------------------------------------------------------------------------- errors and ids


def test_errors_carry_the_servers_type_message_and_request_id(server: ServerProcess) -> None:
    events: list[RetryEvent] = []
    raw = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    with raw, Client(server.url, api_key=KEY, timeout=60, on_retry=events.append) as client:
        cases = [
            (404, {"model": "nope", "inputs": ["x"]}, lambda: client.classify(["x"], "nope", request_id="rid-404")),
            (422, {"model": "ipos", "inputs": [" "]}, lambda: client.classify([" "], "ipos", request_id="rid-422")),
        ]  # fmt: skip
        for status, body, call in cases:
            want = raw.post("/v1/classify", json=body)
            assert want.status_code == status, want.text
            with pytest.raises(DynPromptError) as caught:
                call()
            err = caught.value
            assert err.status == status
            assert (err.type, err.message) == (
                want.json()["error"]["type"],
                want.json()["error"]["message"],
            )
            assert err.request_id == f"rid-{status}"
        assert caught.value.type == "invalid_request"
        with pytest.raises(DynPromptError) as caught:
            client.model("nope")
        assert (caught.value.status, caught.value.type) == (404, "model_not_found")
        # Several models served: leaving the model out is the server's 422.
        with pytest.raises(DynPromptError) as caught:
            client.classify(["x"])
        assert caught.value.status == 422 and "model" in caught.value.message
    assert events == [], "a 4xx other than 429 must never be retried"

    with (
        Client(server.url, api_key="wrong", timeout=60) as client,
        pytest.raises(DynPromptError) as caught,
    ):
        client.models()
    assert caught.value.status == 401 and caught.value.type == "unauthorized"


def test_request_ids_round_trip(server: ServerProcess) -> None:
    with Client(server.url, api_key=KEY, timeout=60) as client:
        assert client.classify(["fine"], "ipos", request_id="trace-42").request_id == "trace-42"
        generated = client.classify(["fine"], "ipos").request_id
        assert HEX_ID.match(generated), generated
        # An id the server refuses is replaced by its own: what we expose is what it echoed.
        echoed = client.classify(["fine"], "ipos", request_id="not a valid id").request_id
        assert echoed and echoed != "not a valid id"

    async def main() -> str:
        async with AsyncClient(server.url, api_key=KEY, timeout=60) as client:
            return (await client.classify(["fine"], "ipos", request_id="trace-43")).request_id

    assert asyncio.run(main()) == "trace-43"


def test_connection_errors_are_retried_then_raised() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    events: list[RetryEvent] = []
    with (
        Client(closed, max_retries=2, backoff_s=0.01, on_retry=events.append) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.classify(["x"], "ipos", request_id="rid-conn")
    assert [e.attempt for e in events] == [1, 2]
    assert all(e.status is None and isinstance(e.error, httpx.ConnectError) for e in events)
    assert {e.request_id for e in events} == {"rid-conn"}

    # The overall deadline ends the retries long before max_retries does.
    events.clear()

    async def main() -> None:
        async with AsyncClient(
            closed, max_retries=1000, backoff_s=0.05, deadline_s=0.5, on_retry=events.append
        ) as client:
            with pytest.raises(httpx.ConnectError):
                await client.health()

    asyncio.run(main())
    assert 0 < len(events) < 1000
    assert sum(e.delay_s for e in events) < 0.5


# --------------------------------------------------------------------------- 429 back-off


def check_busy_retries(events: list[RetryEvent], answered: list[Classification]) -> None:
    busy = [e for e in events if e.status == 429]
    assert busy, f"no 429 seen in {ROUNDS} rounds of {CONCURRENT} concurrent calls"
    for event in busy:
        # Never sooner than the server asked.
        assert event.retry_after_s is not None and event.delay_s >= event.retry_after_s
    # Each call kept one id over its retries, the id its answer carries.
    assert {e.request_id for e in events} <= {a.request_id for a in answered}


def test_sync_client_backs_off_on_429_until_all_succeed(
    busy_server: ServerProcess, models: tuple[Path, Models]
) -> None:
    events: list[RetryEvent] = []
    answered: list[Classification] = []
    with (
        Client(
            busy_server.url, timeout=30, max_retries=20, deadline_s=60, on_retry=events.append
        ) as client,
        ThreadPoolExecutor(CONCURRENT) as pool,
    ):
        for _ in range(ROUNDS):
            texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(CONCURRENT)]
            answers = list(pool.map(lambda t: client.classify([t], "ipos"), texts))
            for text, answer in zip(texts, answers, strict=True):
                check_answers(answer, models[1]["ipos"], [text])
            answered.extend(answers)
            if any(e.status == 429 for e in events):
                break
    check_busy_retries(events, answered)


def test_async_client_backs_off_on_429_until_all_succeed(
    busy_server: ServerProcess, models: tuple[Path, Models]
) -> None:
    events: list[RetryEvent] = []
    answered: list[Classification] = []

    async def main() -> None:
        async with AsyncClient(
            busy_server.url, timeout=30, max_retries=20, deadline_s=60, on_retry=events.append
        ) as client:
            for _ in range(ROUNDS):
                texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(CONCURRENT)]
                answers = await asyncio.gather(*(client.classify([t], "ipos") for t in texts))
                for text, answer in zip(texts, answers, strict=True):
                    check_answers(answer, models[1]["ipos"], [text])
                answered.extend(answers)
                if any(e.status == 429 for e in events):
                    break

    asyncio.run(main())
    check_busy_retries(events, answered)


def test_without_retries_the_429_is_raised(busy_server: ServerProcess) -> None:
    refused: list[DynPromptError] = []

    async def main() -> None:
        async with AsyncClient(busy_server.url, timeout=30, max_retries=0) as client:
            for _ in range(ROUNDS):
                outcomes = await asyncio.gather(
                    *(client.classify(["fine"], "ipos") for _ in range(CONCURRENT)),
                    return_exceptions=True,
                )
                for outcome in outcomes:
                    if isinstance(outcome, DynPromptError):
                        refused.append(outcome)
                    else:
                        assert isinstance(outcome, Classification), outcome
                if refused:
                    return

    asyncio.run(main())
    assert refused, f"no 429 in {ROUNDS} rounds of {CONCURRENT} concurrent calls"
    assert {(e.status, e.type) for e in refused} == {(429, "queue_full")}
