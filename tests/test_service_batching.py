"""Batching, admission, authentication and the server's lifecycle, over real HTTP.

Every load loop is bounded in count and time; no assertion depends on how fast the
machine is (waits are polls with generous limits, and "slow" requests are held by a
long `--max-wait-ms`, not by racing the compute).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel
from tests.conftest import sst2_rows
from tests.server_util import (
    ServerProcess,
    assert_result_matches,
    build_repository,
    offline_predictions,
    sample,
    scrape,
    start_server,
)

Repo = tuple[Path, dict[str, DynPromptModel]]
WORDS = (
    "the film movie plot acting story ending actor director was is very quite rather "
    "great terrible boring fun funny sad dull bright charming clumsy and but not of to it "
    "this that a an best worst fine bad ok love hate"
).split()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Repo:
    path = tmp_path_factory.mktemp("repo")
    return path, build_repository(path, minilm)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def server(repo: Repo, logs: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        ["--model-repository", str(repo[0]), "--max-wait-ms", "30", "--max-batch-size", "16"],
        log_dir=logs,
    )
    yield proc
    assert proc.stop() == 0


def random_input(rng: random.Random, model: str) -> Any:
    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 6, 12, 25, 60])))

    return {"text": sentence(), "text_pair": sentence()} if model == "pair" else sentence()


async def post_all(
    url: str, bodies: list[dict[str, Any]], concurrency: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, headers=headers
    ) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await client.post("/v1/classify", json=body)

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def check_answers(
    bodies: list[dict[str, Any]], responses: list[httpx.Response], models: dict[str, DynPromptModel]
) -> int:
    """Every 200 equals the offline predictions of its own model; returns how many were 200."""
    by_model: dict[str, list[Any]] = {}
    for body, response in zip(bodies, responses, strict=True):
        if response.status_code == 200:
            by_model.setdefault(body["model"], []).extend(body["inputs"])
    want = {
        name: iter(offline_predictions(models[name], inputs)) for name, inputs in by_model.items()
    }
    ok = 0
    for body, response in zip(bodies, responses, strict=True):
        if response.status_code != 200:
            continue
        ok += 1
        data = response.json()
        assert data["model"] == body["model"] and len(data["results"]) == len(body["inputs"])
        for got in data["results"]:
            assert_result_matches(got, next(want[body["model"]]), models[body["model"]].labels)
    return ok


# --------------------------------------------------------------------------- batching


def test_answers_equal_offline_whatever_the_mix(server: ServerProcess, repo: Repo) -> None:
    models = repo[1]
    rng = random.Random(1234)
    bodies: list[dict[str, Any]] = []
    for _ in range(48):
        name = rng.choice(sorted(models))
        inputs = [random_input(rng, name) for _ in range(rng.choice([1, 1, 2, 3, 5, 8]))]
        bodies.append(
            {"model": name, "inputs": inputs, "return_routing": True, "return_all_scores": True}
        )
    before = scrape(server.url)
    responses = asyncio.run(post_all(server.url, bodies, concurrency=16))
    after = scrape(server.url)
    assert [r.status_code for r in responses] == [200] * len(bodies), [
        r.text for r in responses if r.status_code != 200
    ][:3]
    assert check_answers(bodies, responses, models) == len(bodies)
    assert any(x["truncated"] for r in responses for x in r.json()["results"])
    rows = sum(len(list(b["inputs"])) for b in bodies)
    batches = sample(after, "dynprompt_batch_size_count") - sample(
        before, "dynprompt_batch_size_count"
    )
    assert (
        sample(after, "dynprompt_batch_size_sum") - sample(before, "dynprompt_batch_size_sum")
        == rows
    )
    assert batches < len(bodies)  # requests were batched together
    assert sample(after, "dynprompt_batch_size_bucket", le="16.0") == sample(
        after, "dynprompt_batch_size_count"
    )


def test_a_25000_character_input_is_cut_or_refused(server: ServerProcess, repo: Repo) -> None:
    """With truncate (the default) any text within the payload limit is answered; it is cut
    by characters before tokenising, so its cost is that of what the model reads."""
    sentences = [text for text, _ in sst2_rows("train", 2000)]
    review, i = "", 0
    while len(review) < 25_000:
        review, i = review + sentences[i] + " ", i + 1
    model = repo[1]["ipos"]
    r = httpx.post(
        server.url + "/v1/classify",
        json={"model": "ipos", "inputs": [review], "return_routing": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (got,) = r.json()["results"]
    assert got["truncated"] is True
    (want,) = offline_predictions(model, [review])
    assert_result_matches(got, want, model.labels)
    r = httpx.post(
        server.url + "/v1/classify",
        json={"model": "ipos", "inputs": [review], "truncate": False},
        timeout=60,
    )
    assert r.status_code == 422 and r.json()["error"]["type"] == "input_too_long", r.text


def test_two_checkpoints_on_one_backbone_share_batches(server: ServerProcess, repo: Repo) -> None:
    models = repo[1]
    texts = [
        "a warm and witty film",
        "a cold, clumsy mess",
        "nothing to write home about",
        "bright and fun",
    ]
    shared = 0.0
    for _ in range(3):  # bounded: concurrent requests share a batch in the first round in practice
        bodies = [
            {"model": name, "inputs": [text], "return_routing": True}
            for text in texts
            for name in ("ipos", "pre")
        ]
        before = scrape(server.url)
        responses = asyncio.run(post_all(server.url, bodies * 2, concurrency=16))
        after = scrape(server.url)
        assert check_answers(bodies * 2, responses, models) == len(bodies) * 2
        batches = sample(after, "dynprompt_batch_models_count") - sample(
            before, "dynprompt_batch_models_count"
        )
        single = sample(after, "dynprompt_batch_models_bucket", le="1.0") - sample(
            before, "dynprompt_batch_models_bucket", le="1.0"
        )
        per_backbone = sample(
            after, "dynprompt_inference_duration_seconds_count", backbone="minilm"
        ) - sample(before, "dynprompt_inference_duration_seconds_count", backbone="minilm")
        assert per_backbone == batches  # one scheduler: every batch ran on the shared backbone
        shared = batches - single
        if shared > 0:
            break
    assert shared > 0, "no batch held rows of both models"
    # The same text answered by both models: each request got its own model's answer.
    by_model = {name: client_answer(server, name, texts[0]) for name in ("ipos", "pre")}
    assert by_model["ipos"]["score"] != pytest.approx(by_model["pre"]["score"], abs=1e-6)


def client_answer(server: ServerProcess, model: str, text: str) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/classify", json={"model": model, "inputs": [text]}, timeout=60)
    assert r.status_code == 200
    return dict(r.json()["results"][0])


# --------------------------------------------------------------------------- admission and keys


@pytest.fixture(scope="module")
def tight(repo: Repo, logs: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        [
            "--model-repository", str(repo[0]), "--max-queue-requests", "2", "--max-batch-size", "2",
            "--max-wait-ms", "50", "--api-key", "key-one", "--api-key", "key-two",
        ],
        log_dir=logs,
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0


def test_burst_beyond_the_queue_gets_429_never_5xx(tight: ServerProcess, repo: Repo) -> None:
    models = repo[1]
    rng = random.Random(7)
    bodies: list[dict[str, Any]] = []
    for _ in range(40):
        name = rng.choice(["ipos", "dyn", "pre", "ilen"])
        bodies.append(
            {
                "model": name,
                "inputs": [random_input(rng, name) for _ in range(rng.choice([1, 2, 3]))],
            }
        )
    before = scrape(tight.url)
    responses = asyncio.run(
        post_all(tight.url, bodies, concurrency=40, headers={"Authorization": "Bearer key-one"})
    )
    after = scrape(tight.url)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused, "40 simultaneous requests against a queue of 2 should be refused in part"
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "queue_full"
    accepted = check_answers(bodies, responses, models)
    assert accepted == statuses.count(200) and accepted >= 2
    for status, count in (("200", accepted), ("429", len(refused))):
        moved = sum(
            sample(after, "dynprompt_requests_total", model=m, status=status)
            - sample(before, "dynprompt_requests_total", model=m, status=status)
            for m in models
        )
        assert moved == count, status


def test_api_keys_guard_inference_routes_only(tight: ServerProcess) -> None:
    body = {"model": "pre", "inputs": ["fine"]}
    with httpx.Client(base_url=tight.url, timeout=60) as client:
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic a2V5LW9uZQ=="},
        ):
            r = client.post("/v1/classify", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/models", headers=headers).status_code == 401
            assert client.get("/v1/models/pre", headers=headers).status_code == 401
        assert "key-one" not in tight.logs()
        for key in ("key-one", "key-two"):
            assert (
                client.post(
                    "/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"}
                ).status_code
                == 200
            )
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        spec = client.get("/openapi.json").json()
        assert "401" in spec["paths"]["/v1/classify"]["post"]["responses"]
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --------------------------------------------------------------------------- lifecycle


def test_ready_is_503_until_warm_and_queue_timeout_is_503(repo: Repo, logs: Path) -> None:
    proc = start_server(
        [
            "--model-repository", str(repo[0]), "--max-wait-ms", "5000", "--max-batch-size", "4",
            "--queue-timeout-s", "0.5",
        ],
        wait=False,
        log_dir=logs,
    )  # fmt: skip
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=proc.url, timeout=10) as client:
            while time.monotonic() < deadline and proc.alive():
                try:
                    status = client.get("/ready").status_code
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                seen.append(status)
                if status == 200:
                    break
                assert client.get("/health").status_code == 200
                r = client.post("/v1/classify", json={"model": "pre", "inputs": ["x"]})
                # Could be ready by now: the request then waits for its batch (5 s) past its
                # queue timeout (0.5 s), a 503 of another kind.
                if r.status_code == 503:
                    assert r.json()["error"]["type"] in ("not_ready", "queue_timeout")
                time.sleep(0.05)
            assert seen and seen[-1] == 200, proc.logs()[-2000:]
            assert seen[0] == 503 and set(seen[:-1]) == {503}

            before = scrape(proc.url)
            r = client.post("/v1/classify", json={"model": "pre", "inputs": ["waits for a batch"]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "queue_timeout", r.text
            assert int(r.headers["retry-after"]) >= 1
            full = client.post(
                "/v1/classify", json={"model": "pre", "inputs": ["one", "two", "three", "four"]}
            )
            assert full.status_code == 200  # a full batch closes at once
            after = scrape(proc.url)
            for code, count in (("503", 1), ("200", 1)):
                got = sample(after, "dynprompt_requests_total", model="pre", status=code) - sample(
                    before, "dynprompt_requests_total", model="pre", status=code
                )
                assert got == count
            assert (
                sample(after, "dynprompt_batch_size_sum")
                - sample(before, "dynprompt_batch_size_sum")
                == 4
            )
    finally:
        assert proc.stop() == 0


def test_sigterm_drains_in_flight_refuses_new_and_dropped_clients_are_skipped(
    repo: Repo, logs: Path
) -> None:
    models = repo[1]
    proc = start_server(
        ["--model-repository", str(repo[0]), "--max-wait-ms", "3000", "--max-batch-size", "64"],
        log_dir=logs,
    )
    try:
        # A client that gives up is dropped before compute.
        before = scrape(proc.url)
        sent = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                proc.url + "/v1/classify",
                json={"model": "dyn", "inputs": ["impatient"]},
                timeout=0.5,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sample(scrape(proc.url), "dynprompt_requests_total", model="dyn", status="499") == 1:
                break
            time.sleep(0.1)
        time.sleep(max(0.0, sent + 3.5 - time.monotonic()))  # past the batch's max wait
        after = scrape(proc.url)
        assert sample(after, "dynprompt_requests_total", model="dyn", status="499") == 1
        assert sample(after, "dynprompt_batch_size_count") == sample(
            before, "dynprompt_batch_size_count"
        )
        assert sample(after, "dynprompt_queue_depth") == 0

        # Requests in flight at SIGTERM are answered; new ones are refused.
        bodies = [
            {"model": name, "inputs": [f"in flight for {name}"]}
            for name in ("ipos", "dyn", "pre", "ilen")
        ]
        answers: list[httpx.Response | None] = [None] * len(bodies)

        def send(i: int) -> None:
            answers[i] = httpx.post(proc.url + "/v1/classify", json=bodies[i], timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (
            sample(scrape(proc.url), "dynprompt_queue_depth") < len(bodies)
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        proc.terminate()
        deadline = time.monotonic() + 10
        ready = httpx.get(proc.url + "/ready", timeout=10)
        while ready.status_code == 200 and time.monotonic() < deadline:  # the signal takes a moment
            time.sleep(0.02)
            ready = httpx.get(proc.url + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "draining"
        late = httpx.post(
            proc.url + "/v1/classify", json={"model": "pre", "inputs": ["too late"]}, timeout=10
        )
        assert late.status_code == 503 and late.json()["error"]["type"] == "draining"
        for t in threads:
            t.join(60)
        responses = [a for a in answers if a is not None]
        assert [r.status_code for r in responses] == [200] * len(bodies)
        assert check_answers(bodies, responses, models) == len(bodies)
        assert proc.wait(60) == 0
        messages = [rec["msg"] for rec in proc.log_records()]
        assert any("SIGTERM: draining" in m for m in messages)
        assert any("drained" in m for m in messages)
    finally:
        proc.stop()
