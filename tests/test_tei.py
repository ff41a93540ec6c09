"""`POST /predict`, text-embeddings-inference's classification route, against real servers.

Requests and answers are TEI's shapes (`router/src/http/types.rs` in
huggingface/text-embeddings-inference): one text, `[text]` or `[text, text_pair]` gets one
list of `{"score", "label"}`, a batch `[[...], ...]` a list of lists, every label, highest
score first. Every score must equal the offline prediction of the checkpoint
(`offline_predictions`). One server holds several models (the model must be named there);
another holds one, where neither route needs a model name.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel, RowResult, save_checkpoint
from dynprompt.service.client import Client
from dynprompt.service.tei import LOG_FLOOR, PredictResponse
from tests.server_util import (
    TEST_MODELS,
    ServerProcess,
    assert_result_matches,
    build_model,
    build_repository,
    offline_predictions,
    sample,
    scrape,
    start_server,
)

pytestmark = pytest.mark.timeout(300)

MAX_INPUTS = 8
TEXTS = [
    "a gripping, funny and thoroughly enjoyable film",
    "dull",
    "the plot is a mess, the acting is wooden and the ending drags on forever",
]
PAIRS = [
    ("a man is playing a guitar on stage", "someone makes music"),
    ("the cat sleeps", "a dog is barking loudly at the mailman"),
]
LONG = " ".join(f"word{i} after word{i} comes another sentence" for i in range(12))
# Two checkpoints with the same weights (same seed), truncating at opposite ends.
SIDES = ("left", "right")

Models = dict[str, DynPromptModel]


@pytest.fixture(scope="module")
def several(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("tei-repo")
    built = build_repository(path, minilm, {n: TEST_MODELS[n] for n in ("ipos", "pair")})
    for side in SIDES:
        built[side] = build_model(side, minilm, seed=5, **TEST_MODELS["ilen"], truncation_side=side)
        save_checkpoint(built[side], path / side)
    server = start_server(
        [
            "--model-repository", str(path),
            "--max-client-batch-size", str(MAX_INPUTS),
            "--max-wait-ms", "5",
        ],
        log_dir=tmp_path_factory.mktemp("tei-logs"),
    )  # fmt: skip
    yield server, built
    assert server.stop() == 0, server.logs()[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("tei-one")
    built = build_repository(path, minilm, {"ipos": TEST_MODELS["ipos"]})
    server = start_server(
        ["--model-repository", str(path), "--max-wait-ms", "5"],
        log_dir=tmp_path_factory.mktemp("tei-one-logs"),
    )
    yield server, built["ipos"]
    assert server.stop() == 0, server.logs()[-3000:]


@pytest.fixture()
def http(several: tuple[ServerProcess, Models]) -> Any:
    with httpx.Client(base_url=several[0].url, timeout=60) as client:
        yield client


def reference(model: DynPromptModel, inputs: list[tuple[str, str | None]]) -> list[RowResult]:
    return offline_predictions(
        model, [t if p is None else {"text": t, "text_pair": p} for t, p in inputs]
    )


def assert_predictions(
    got: Any, want: RowResult, labels: list[str], raw: bool = False, tol: float = 1e-4
) -> None:
    """One input's TEI answer: every label once, scores descending, each equal to the offline
    probability (log-probability for raw scores)."""
    assert isinstance(got, list) and all(set(p) == {"score", "label"} for p in got), got
    assert sorted(p["label"] for p in got) == sorted(labels)
    scores = [p["score"] for p in got]
    assert scores == sorted(scores, reverse=True), got
    for prediction in got:
        prob = want.probs[labels.index(prediction["label"])]
        expected = (math.log(prob) if prob > 0 else LOG_FLOOR) if raw else prob
        assert abs(prediction["score"] - expected) < tol, (prediction, expected)


def error_of(response: httpx.Response, status: int, type_: str | None = None) -> str:
    """dynprompt's one error body (not TEI's {"error", "error_type"}); returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return str(body["error"]["message"])


# --------------------------------------------------------------------------- shapes and answers


def test_single_text_pair_and_batches_equal_offline_predictions(
    http: httpx.Client, several: tuple[ServerProcess, Models]
) -> None:
    built = several[1]
    ipos, pair = built["ipos"], built["pair"]
    want = reference(ipos, [(TEXTS[0], None)])[0]
    for inputs in (TEXTS[0], [TEXTS[0]]):  # a string, or a list of one: one input
        r = http.post("/predict", params={"model": "ipos"}, json={"inputs": inputs})
        assert r.status_code == 200, r.text
        PredictResponse.model_validate(r.json())
        assert_predictions(r.json(), want, ipos.labels)

    premise, hypothesis = PAIRS[0]
    r = http.post("/predict", params={"model": "pair"}, json={"inputs": [premise, hypothesis]})
    assert r.status_code == 200, r.text
    assert_predictions(r.json(), reference(pair, [PAIRS[0]])[0], pair.labels)

    r = http.post("/predict", params={"model": "ipos"}, json={"inputs": [[t] for t in TEXTS]})
    assert r.status_code == 200, r.text
    body = r.json()
    PredictResponse.model_validate(body)
    assert len(body) == len(TEXTS)
    for got, expected in zip(body, reference(ipos, [(t, None) for t in TEXTS]), strict=True):
        assert_predictions(got, expected, ipos.labels)

    r = http.post("/predict", params={"model": "pair"}, json={"inputs": [list(p) for p in PAIRS]})
    assert r.status_code == 200, r.text
    assert len(r.json()) == len(PAIRS)
    for got, expected in zip(r.json(), reference(pair, list(PAIRS)), strict=True):
        assert_predictions(got, expected, pair.labels)

    # A batch of one is still a batch: a list of one list.
    r = http.post("/predict", params={"model": "ipos"}, json={"inputs": [[TEXTS[1]]]})
    assert r.status_code == 200 and len(r.json()) == 1 and isinstance(r.json()[0], list)
    assert_predictions(r.json()[0], reference(ipos, [(TEXTS[1], None)])[0], ipos.labels)


def test_raw_scores_are_log_probabilities(
    http: httpx.Client, several: tuple[ServerProcess, Models]
) -> None:
    ipos = several[1]["ipos"]
    r = http.post(
        "/predict",
        params={"model": "ipos"},
        json={"inputs": [[t] for t in TEXTS], "raw_scores": True},
    )
    assert r.status_code == 200, r.text
    for got, want in zip(r.json(), reference(ipos, [(t, None) for t in TEXTS]), strict=True):
        assert_predictions(got, want, ipos.labels, raw=True)
        assert all(p["score"] <= 0 for p in got)
        # Softmax over the raw scores gives back the probabilities, as it does for logits.
        total = sum(math.exp(p["score"]) for p in got)
        assert abs(total - 1) < 1e-4


def test_truncation_and_its_direction(
    http: httpx.Client, several: tuple[ServerProcess, Models]
) -> None:
    built = several[1]
    left, right = built["left"], built["right"]
    for name, model in (("left", left), ("right", right)):
        want = reference(model, [(LONG, None)])[0]
        # Absent, the model's own side, in either spelling TEI accepts.
        for extra in ({}, {"truncation_direction": name}, {"truncation_direction": name.title()}):
            r = http.post("/predict", params={"model": name}, json={"inputs": LONG, **extra})
            assert r.status_code == 200, r.text
            assert_predictions(r.json(), want, model.labels)
        # The other side, asked for by this request: the answer of the checkpoint that
        # truncates there (the two share their weights).
        other = "right" if name == "left" else "left"
        r = http.post(
            "/predict",
            params={"model": name},
            json={"inputs": LONG, "truncation_direction": other.title()},
        )
        assert r.status_code == 200, r.text
        assert_predictions(r.json(), reference(built[other], [(LONG, None)])[0], model.labels)
        message = error_of(
            http.post(
                "/predict", params={"model": name}, json={"inputs": [[LONG]], "truncate": False}
            ),
            422,
            "input_too_long",
        )
        assert "inputs.0" in message
        # With truncate false the direction changes nothing.
        r = http.post(
            "/predict",
            params={"model": name},
            json={"inputs": "short", "truncate": False, "truncation_direction": other},
        )
        assert r.status_code == 200, r.text
    # The two checkpoints share their weights, so the answers differ by the trimmed end only:
    # each server answer above equals its own side's, so the server honoured each side.
    lw, rw = reference(left, [(LONG, None)])[0], reference(right, [(LONG, None)])[0]
    assert max(abs(a - b) for a, b in zip(lw.probs, rw.probs, strict=True)) > 1e-3
    short = reference(left, [("short", None)])[0], reference(right, [("short", None)])[0]
    assert short[0].probs == pytest.approx(short[1].probs, abs=1e-6)


# --------------------------------------------------------------------------- which model


def test_with_several_models_one_is_named(
    http: httpx.Client, several: tuple[ServerProcess, Models]
) -> None:
    ipos = several[1]["ipos"]
    want = reference(ipos, [(TEXTS[2], None)])[0]
    for params, headers, extra in (
        ({"model": "ipos"}, {}, {}),
        ({}, {"x-dynprompt-model": "ipos"}, {}),
        ({}, {}, {"model": "ipos"}),
        ({"model": "ipos"}, {"x-dynprompt-model": "ipos"}, {"model": "ipos"}),
    ):
        r = http.post(
            "/predict", params=params, headers=headers, json={"inputs": TEXTS[2], **extra}
        )
        assert r.status_code == 200, (params, headers, extra, r.text)
        assert_predictions(r.json(), want, ipos.labels)
    message = error_of(http.post("/predict", json={"inputs": "x"}), 422, "invalid_request")
    assert message == "model is required: 4 models are served (ipos, left, pair, right)"
    message = error_of(
        http.post(
            "/predict",
            params={"model": "ipos"},
            headers={"x-dynprompt-model": "pair"},
            json={"inputs": "x"},
        ),
        422,
    )
    assert "different models" in message and "x-dynprompt-model" in message
    assert "ghost" in error_of(
        http.post("/predict", params={"model": "ghost"}, json={"inputs": "x"}),
        404,
        "model_not_found",
    )
    error_of(http.post("/predict", params={"model": "../etc"}, json={"inputs": "x"}), 422)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"inputs": ["a", "b", "c"]}, "inputs"),  # a list of strings is one input: 1 or 2
        ({"inputs": []}, "inputs"),
        ({"inputs": [["a"], "b"]}, "inputs.1"),  # a batch holds [text] or [text, text_pair]
        ({"inputs": [["a"], ["b", "c", "d"]]}, "inputs.1"),
        ({"inputs": "   "}, "inputs"),
        ({"inputs": 7}, "inputs"),
        ({"inputs": "ok", "raw_scores": "yes"}, "raw_scores"),
        ({"inputs": "ok", "truncation_direction": "middle"}, "truncation_direction"),
        ({"truncate": True}, "inputs"),
    ],
)
def test_422_invalid_requests(http: httpx.Client, body: Any, where: str) -> None:
    message = error_of(
        http.post("/predict", params={"model": "ipos"}, json=body), 422, "invalid_request"
    )
    assert message.startswith(where), message


def test_other_errors_and_tolerance(http: httpx.Client) -> None:
    r = http.post(
        "/predict",
        params={"model": "ipos"},
        content=b'{"inputs": ',
        headers={"content-type": "application/json"},
    )
    error_of(r, 400, "invalid_json")
    many = {"inputs": [["fine"]] * (MAX_INPUTS + 1)}
    assert str(MAX_INPUTS) in error_of(
        http.post("/predict", params={"model": "ipos"}, json=many), 413, "too_many_inputs"
    )
    exactly = {"inputs": [["fine"]] * MAX_INPUTS}
    r = http.post("/predict", params={"model": "ipos"}, json=exactly)
    assert r.status_code == 200 and len(r.json()) == MAX_INPUTS
    # A pair model asked for single texts, and the other way round: refused by the engine.
    assert error_of(
        http.post("/predict", params={"model": "pair"}, json={"inputs": "one text"}), 422
    ).startswith("inputs.0")
    # Fields TEI does not know are ignored, as TEI ignores them.
    r = http.post(
        "/predict",
        params={"model": "ipos"},
        json={"inputs": "fine", "parameters": {"top_k": 1}, "truncate": None},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()) == 2


def test_counted_like_classify_requests(
    http: httpx.Client, several: tuple[ServerProcess, Models]
) -> None:
    server = several[0]
    before = scrape(server.url)
    for inputs in ("one", [["two"], ["three"]]):
        assert (
            http.post("/predict", params={"model": "ipos"}, json={"inputs": inputs}).status_code
            == 200
        )
    http.post("/predict", params={"model": "nobody"}, json={"inputs": "x"})
    http.post("/predict", params={"model": "ipos"}, json={"inputs": ""})
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("dynprompt_requests_total", model="ipos", status="200") == 2
    assert delta("dynprompt_requests_total", model="_unknown", status="404") == 1
    assert delta("dynprompt_requests_total", model="ipos", status="422") == 1
    assert delta("dynprompt_prompt_length_count", model="ipos") == 3
    lines = [rec for rec in server.log_records() if rec.get("path") == "/predict"]
    assert any(rec.get("model") == "ipos" and rec.get("rows") == 2 for rec in lines), lines


def test_openapi_documents_the_route(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/PredictRequest")
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/PredictResponse")
    for status in ("400", "404", "413", "422", "429", "500", "503"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), status
    assert {(p["name"], p["in"]) for p in op["parameters"]} == {
        ("model", "query"),
        ("x-dynprompt-model", "header"),
    }
    schema = spec["components"]["schemas"]["PredictRequest"]
    assert schema["required"] == ["inputs"]
    assert {"inputs", "truncate", "truncation_direction", "raw_scores"} <= set(schema["properties"])


# --------------------------------------------------------------------------- one model served


def test_one_served_model_needs_no_name(single: tuple[ServerProcess, DynPromptModel]) -> None:
    server, model = single
    want = reference(model, [(t, None) for t in TEXTS])
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/predict", json={"inputs": TEXTS[0]})  # exactly what a TEI client sends
        assert r.status_code == 200, r.text
        assert_predictions(r.json(), want[0], model.labels)

        r = client.post("/v1/classify", json={"inputs": TEXTS, "return_all_scores": True})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "ipos"
        for got, expected in zip(r.json()["results"], want, strict=True):
            assert_result_matches(got, expected, model.labels)

        r = client.post("/v1/classify", json={"inputs": TEXTS[1]})  # one string, no model
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 1
        assert_result_matches(r.json()["results"][0], want[1], model.labels)

        assert "ghost" in error_of(
            client.post("/predict", params={"model": "ghost"}, json={"inputs": "x"}), 404
        )
    with Client(server.url, timeout=60) as typed:
        answer = typed.classify([TEXTS[2]])
        assert answer.model == "ipos"
        assert_result_matches(
            answer.results[0].model_dump(exclude_none=True), want[2], model.labels
        )


def test_with_several_models_classify_needs_the_name(http: httpx.Client) -> None:
    message = error_of(http.post("/v1/classify", json={"inputs": "x"}), 422, "invalid_request")
    assert message == "model is required: 4 models are served (ipos, left, pair, right)"
