"""The HTTP contract of DESIGN §4 against a real `dynprompt serve` process on a loopback port.

One server (module scope) holds six seeded checkpoints over the real MiniLM backbone; a
`sitecustomize` on its PYTHONPATH makes any batch holding the word "xyzzy" raise, so a real
request can produce the 500 path. Settings and `--help` are checked in-process.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone, DynPromptModel, weights_checksum
from dynprompt.service.config import DEFAULT_REPOSITORY, SettingsError, build_parser, settings_from
from dynprompt.service.schemas import ClassifyResponse, ModelCard, ModelList
from tests.server_util import (
    ServerProcess,
    assert_result_matches,
    build_repository,
    offline_predictions,
    sample,
    scrape,
    start_server,
)

FAULT = textwrap.dedent(
    """
    import dynprompt.models.inference as _inference

    _real = _inference.classify_rows

    def classify_rows(backbone, models, encoded):
        for ids in encoded.input_ids.tolist():
            if "xyzzy" in backbone.tokenizer.decode(ids):
                raise RuntimeError("injected fault")
        return _real(backbone, models, encoded)

    _inference.classify_rows = classify_rows
    """
)
PAYLOAD_LIMIT = 20_000
MAX_INPUTS = 16


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, minilm: Backbone
) -> tuple[Path, dict[str, DynPromptModel]]:
    path = tmp_path_factory.mktemp("repo")
    return path, build_repository(path, minilm)


@pytest.fixture(scope="module")
def server(
    repo: tuple[Path, dict[str, DynPromptModel]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    fault_dir = tmp_path_factory.mktemp("fault")
    (fault_dir / "sitecustomize.py").write_text(FAULT)
    proc = start_server(
        [
            "--model-repository", str(repo[0]),
            "--max-client-batch-size", str(MAX_INPUTS),
            "--payload-limit-bytes", str(PAYLOAD_LIMIT),
            "--max-wait-ms", "20",
        ],
        env={"PYTHONPATH": str(fault_dir)},
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


@pytest.fixture()
def client(server: ServerProcess) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def error_of(response: httpx.Response, status: int, type_: str | None = None) -> str:
    """Assert the status and the error body shape; return the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return str(body["error"]["message"])


# --------------------------------------------------------------------------- answers


def test_classify_equals_offline_predictions_with_routing(
    client: httpx.Client, repo: tuple[Path, dict[str, DynPromptModel]]
) -> None:
    models = repo[1]
    texts = [
        "a gripping, funny and thoroughly enjoyable film",
        "dull",
        "the plot is a mess, the acting is wooden and the ending drags on forever and ever",
        "it was fine.",
    ]
    seen_positions = set()
    for name in ("ipos", "dyn", "pre", "ilen", "probe"):
        r = client.post(
            "/v1/classify",
            json={
                "model": name,
                "inputs": texts,
                "return_routing": True,
                "return_all_scores": True,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        ClassifyResponse.model_validate(body)
        assert body["model"] == name and len(body["results"]) == len(texts)
        want = offline_predictions(models[name], list(texts))
        for got, ref in zip(body["results"], want, strict=True):
            assert_result_matches(got, ref, models[name].labels)
            seen_positions.add(got["routing"]["tokens_before"])
        backbone = models[name].backbone
        spec = models[name].config.input
        rows = [backbone.tokenize_row(t, None, spec.max_length) for t in texts]
        assert body["usage"] == {
            "input_tokens": sum(len(row.input_ids) for row in rows),
            "prompt_tokens": sum(w.prompt_length for w in want),
        }
        assert [g["truncated"] for g in body["results"]] == [row.truncated for row in rows]
    assert len(seen_positions) > 1, "routers should place prompts differently across inputs"


def test_optional_fields_are_left_out_unless_asked(client: httpx.Client) -> None:
    r = client.post("/v1/classify", json={"model": "dyn", "inputs": ["nice"]})
    result = r.json()["results"][0]
    assert set(result) == {"label", "score", "truncated"}
    r = client.post(
        "/v1/classify", json={"model": "dyn", "inputs": ["nice"], "return_routing": True}
    )
    routing = r.json()["results"][0]["routing"]
    assert set(routing) == {"prompt_length", "tokens_before", "tokens_after", "pool_weights"}
    assert len(routing["pool_weights"]) == 4 and abs(sum(routing["pool_weights"]) - 1) < 1e-5
    r = client.post(
        "/v1/classify", json={"model": "ipos", "inputs": ["nice"], "return_routing": True}
    )
    assert "pool_weights" not in r.json()["results"][0]["routing"]


def test_one_string_is_answered_like_a_list_of_one(
    client: httpx.Client, repo: tuple[Path, dict[str, DynPromptModel]]
) -> None:
    model = repo[1]["dyn"]
    text = "a gripping, funny and thoroughly enjoyable film"
    as_list = client.post(
        "/v1/classify", json={"model": "dyn", "inputs": [text], "return_routing": True}
    )
    as_string = client.post(
        "/v1/classify", json={"model": "dyn", "inputs": text, "return_routing": True}
    )
    assert as_string.status_code == 200, as_string.text
    body = as_string.json()
    ClassifyResponse.model_validate(body)
    assert len(body["results"]) == 1
    assert_result_matches(body["results"][0], offline_predictions(model, [text])[0], model.labels)
    assert body == as_list.json()


def test_leaving_the_model_out_names_the_served_models(client: httpx.Client) -> None:
    message = error_of(client.post("/v1/classify", json={"inputs": "x"}), 422, "invalid_request")
    assert message == "model is required: 6 models are served (dyn, ilen, ipos, pair, pre, probe)"


def test_pair_inputs_and_truncation(
    client: httpx.Client, repo: tuple[Path, dict[str, DynPromptModel]]
) -> None:
    models = repo[1]
    pairs = [
        {"text": "a man is playing a guitar on stage", "text_pair": "someone makes music"},
        {"text": "the cat sleeps", "text_pair": "a dog is barking loudly at the mailman"},
    ]
    r = client.post("/v1/classify", json={"model": "pair", "inputs": pairs, "return_routing": True})
    assert r.status_code == 200, r.text
    for got, want in zip(
        r.json()["results"], offline_predictions(models["pair"], pairs), strict=True
    ):
        assert_result_matches(got, want, models["pair"].labels)

    long_text = " ".join(["a remarkably long and winding sentence about a film"] * 6)
    r = client.post("/v1/classify", json={"model": "ilen", "inputs": [long_text, "short"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["truncated"] for x in results] == [True, False]
    for got, want in zip(
        results, offline_predictions(models["ilen"], [long_text, "short"]), strict=True
    ):
        assert_result_matches(got, want, models["ilen"].labels)
    message = error_of(
        client.post(
            "/v1/classify",
            json={"model": "ilen", "inputs": ["short", long_text], "truncate": False},
        ),
        422,
        "input_too_long",
    )
    assert "inputs.1" in message and "24" in message


# --------------------------------------------------------------------------- models, probes


def test_model_cards(client: httpx.Client, repo: tuple[Path, dict[str, DynPromptModel]]) -> None:
    path, models = repo
    body = client.get("/v1/models").json()
    ModelList.model_validate(body)
    cards = {card["name"]: card for card in body["models"]}
    assert sorted(cards) == sorted(models)
    for name, model in models.items():
        card = cards[name]
        config = model.config
        assert card["labels"] == config.head.labels
        assert card["variant"] == config.variant
        assert card["prompt_length"] == config.prompt.length
        assert card["pool_size"] == config.prompt.pool_size
        assert card["backbone"] == config.backbone.name_or_path
        assert card["version"] == weights_checksum(path / name)
        assert card["pair_input"] == (name == "pair")
        one = client.get(f"/v1/models/{name}")
        assert one.status_code == 200 and one.json() == card
        ModelCard.model_validate(one.json())
    assert cards["ipos"]["router_feature"] == "backbone"
    assert cards["pre"]["router_feature"] is None  # a prefix decides nothing per input
    assert "ghost" in error_of(client.get("/v1/models/ghost"), 404, "model_not_found")


def test_health_ready_metrics_and_docs(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "models": 6}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "dynprompt_requests_total" in metrics.text
    assert client.get("/docs").status_code == 200


def test_openapi_documents_the_real_models_and_errors(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    op = spec["paths"]["/v1/classify"]["post"]
    body_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.endswith("/ClassifyRequest")
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/ClassifyResponse")
    for status in ("400", "404", "413", "422", "429", "500", "503"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), status
    assert "Retry-After" in op["responses"]["429"]["headers"]
    # model may be left out (one served model), inputs may be one string.
    assert schemas["ClassifyRequest"]["required"] == ["inputs"]
    branches = schemas["ClassifyRequest"]["properties"]["inputs"]["oneOf"]
    assert {branch["type"] for branch in branches} == {"string", "array"}
    assert {"label", "score", "truncated"} <= set(schemas["Result"]["required"])
    assert spec["paths"]["/v1/models/{name}"]["get"]["responses"]["404"]
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 shape is not used


# --------------------------------------------------------------------------- errors


def test_400_malformed_json(client: httpx.Client) -> None:
    for raw in (b'{"model": ', b"not json at all", b'{"model": "dyn", "inputs": ["a",]}'):
        r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
        error_of(r, 400, "invalid_json")


def test_404_unknown_model_and_route(client: httpx.Client) -> None:
    message = error_of(
        client.post("/v1/classify", json={"model": "nope", "inputs": ["x"]}), 404, "model_not_found"
    )
    assert "nope" in message and "ipos" in message
    error_of(client.get("/v1/nothing-here"), 404, "not_found")
    error_of(client.get("/v1/classify"), 405, "method_not_allowed")


def test_413_payload_limit_and_client_batch_size(client: httpx.Client) -> None:
    big = {"model": "dyn", "inputs": ["word " * (PAYLOAD_LIMIT // 5)]}
    error_of(client.post("/v1/classify", json=big), 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "dyn", "inputs": ["'
        for _ in range(PAYLOAD_LIMIT // 1000 + 1):
            yield b"a" * 1000
        yield b'"]}'

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, "payload_too_large")
    many = {"model": "dyn", "inputs": ["fine"] * (MAX_INPUTS + 1)}
    assert str(MAX_INPUTS) in error_of(
        client.post("/v1/classify", json=many), 413, "too_many_inputs"
    )
    exactly = {"model": "dyn", "inputs": ["fine"] * MAX_INPUTS}
    assert client.post("/v1/classify", json=exactly).status_code == 200


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"inputs": ["x"]}, "model"),
        ({"model": "dyn"}, "inputs"),
        ({"model": "dyn", "inputs": []}, "inputs"),
        ({"model": "dyn", "inputs": [""]}, "inputs.0"),
        ({"model": "dyn", "inputs": ["ok", "   "]}, "inputs.1"),
        ({"model": "dyn", "inputs": [7]}, "inputs.0"),
        ({"model": "dyn", "inputs": 7}, "inputs"),
        ({"model": "dyn", "inputs": "  "}, "inputs"),
        ({"model": "dyn", "inputs": ["ok"], "truncate": "yes"}, "truncate"),
        ({"model": "dyn", "inputs": ["ok"], "surprise": 1}, "surprise"),
        ({"model": 3, "inputs": ["ok"]}, "model"),
        ({"model": "pair", "inputs": [{"text": ""}]}, "inputs.0.text"),
        ({"model": "dyn", "inputs": [{"text": "a", "text_pair": "b"}]}, "inputs.0"),
        ({"model": "pair", "inputs": ["a single text"]}, "inputs.0"),
        ([1, 2], "body"),
    ],
)
def test_422_invalid_fields(client: httpx.Client, body: Any, where: str) -> None:
    message = error_of(client.post("/v1/classify", json=body), 422, "invalid_request")
    assert message.startswith(where), message
    assert "just a string" not in message  # the submitted text is never echoed


def test_500_is_isolated_and_logged_with_the_request_id(
    client: httpx.Client, server: ServerProcess, repo: tuple[Path, dict[str, DynPromptModel]]
) -> None:
    r = client.post(
        "/v1/classify",
        json={"model": "pre", "inputs": ["xyzzy"]},
        headers={"x-request-id": "boom-1"},
    )
    assert "boom-1" in error_of(r, 500, "internal_error")
    assert r.headers["x-request-id"] == "boom-1"
    assert "injected fault" not in r.text
    failures = [
        rec for rec in server.log_records() if rec["level"] == "error" and "boom-1" in rec["msg"]
    ]
    assert failures and "injected fault" in failures[0]["msg"]
    # The server goes on answering.
    r = client.post("/v1/classify", json={"model": "pre", "inputs": ["a fine film"]})
    assert r.status_code == 200
    want = offline_predictions(repo[1]["pre"], ["a fine film"])[0]
    assert_result_matches(r.json()["results"][0], want, repo[1]["pre"].labels)


# --------------------------------------------------------------------------- ids, logs, metrics


def test_request_id_echoed_or_generated_and_logged(
    client: httpx.Client, server: ServerProcess
) -> None:
    r = client.post(
        "/v1/classify",
        json={"model": "ipos", "inputs": ["a", "b"]},
        headers={"x-request-id": "req-42"},
    )
    assert r.headers["x-request-id"] == "req-42"
    generated = client.post("/v1/classify", json={"model": "ipos", "inputs": ["a"]}).headers[
        "x-request-id"
    ]
    assert len(generated) >= 16 and generated != "req-42"
    bad = client.get(
        "/health", headers={"x-request-id": "has spaces; and <angle> brackets"}
    ).headers["x-request-id"]
    assert " " not in bad
    assert (
        client.get("/v1/nothing", headers={"x-request-id": "err-7"}).headers["x-request-id"]
        == "err-7"
    )
    lines = [rec for rec in server.log_records() if rec.get("request_id") == "req-42"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["level"] == "info" and line["model"] == "ipos" and line["rows"] == 2
    assert line["status"] == 200 and line["path"] == "/v1/classify"
    for key in ("duration_ms", "queue_ms", "compute_ms"):
        assert isinstance(line[key], int | float) and line[key] >= 0
    starts = [
        rec["msg"]
        for rec in server.log_records()
        if rec.get("logger") == "dynprompt.service.registry"
    ]
    assert any("loaded model ipos" in m and "instance_position" in m for m in starts)
    assert any("loaded backbone minilm on cpu" in m for m in starts)


def test_metrics_move_exactly_by_the_requests_sent(
    client: httpx.Client, server: ServerProcess
) -> None:
    before = scrape(server.url)
    decisions: dict[str, list[tuple[int, int]]] = {"ipos": [], "dyn": [], "ilen": []}
    sent = {
        ("ipos", "200"): 0,
        ("dyn", "200"): 0,
        ("ilen", "200"): 0,
        ("dyn", "422"): 0,
        ("_unknown", "404"): 0,
    }
    rows = 0
    for i in range(9):
        name = ("ipos", "dyn", "ilen")[i % 3]
        inputs = [f"sentence number {i} about a movie", "another one"][: 1 + i % 2]
        r = client.post(
            "/v1/classify", json={"model": name, "inputs": inputs, "return_routing": True}
        )
        assert r.status_code == 200
        sent[(name, "200")] += 1
        rows += len(inputs)
        decisions[name] += [
            (x["routing"]["prompt_length"], x["routing"]["tokens_before"])
            for x in r.json()["results"]
        ]
    for _ in range(2):
        assert client.post("/v1/classify", json={"model": "dyn", "inputs": [""]}).status_code == 422
        sent[("dyn", "422")] += 1
    for raw_name in ("ghost-1", "ghost-2", "ghost-3"):
        assert (
            client.post("/v1/classify", json={"model": raw_name, "inputs": ["x"]}).status_code
            == 404
        )
        sent[("_unknown", "404")] += 1
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for (model, status), count in sent.items():
        assert delta("dynprompt_requests_total", model=model, status=status) == count, (
            model,
            status,
        )
    assert not any("ghost" in str(key) for key in after)  # raw names never become labels
    total = sum(sent.values())
    assert (
        sum(
            delta("dynprompt_request_duration_seconds_count", model=m)
            for m in ("ipos", "dyn", "ilen", "_unknown")
        )
        == total
    )
    assert delta("dynprompt_input_tokens_count") == rows
    for name, made in decisions.items():
        for metric, pick in (("dynprompt_prompt_length", 0), ("dynprompt_prompt_tokens_before", 1)):
            assert delta(metric + "_count", model=name) == len(made)
            assert delta(metric + "_sum", model=name) == sum(d[pick] for d in made)
            for le in range(0, 9):
                want = sum(1 for d in made if d[pick] <= le)
                assert delta(metric + "_bucket", model=name, le=f"{float(le)}") == want, (
                    name,
                    metric,
                    le,
                )
    assert delta("dynprompt_batch_size_sum") == rows  # every accepted row was computed once
    assert sample(after, "dynprompt_queue_depth") == 0
    for name, variant in (
        ("ipos", "instance_position"),
        ("pre", "prefix"),
        ("probe", "linear_probe"),
    ):
        assert (
            sample(after, "dynprompt_model_info", model=name, variant=variant, backbone="minilm")
            == 1
        )
    assert delta("dynprompt_inference_duration_seconds_count", backbone="minilm") >= 1
    assert "dynprompt_gpu_memory_bytes" not in {key[0] for key in after}  # CPU server


# --------------------------------------------------------------------------- settings and CLI


def test_settings_flags_beat_env_beat_defaults() -> None:
    env = {"DYNPROMPT_MAX_BATCH_SIZE": "7", "DYNPROMPT_PORT": "9001", "DYNPROMPT_API_KEY": "a, b"}
    s = settings_from(["--max-batch-size", "9"], env)
    assert s.max_batch_size == 9 and s.port == 9001 and s.api_keys == ("a", "b")
    assert s.max_wait_ms == 5.0 and s.repository == DEFAULT_REPOSITORY
    assert DEFAULT_REPOSITORY.parts[-2:] == ("dynprompt", "default_model")
    s = settings_from(["--api-key", "key-one", "--api-key", "key-two", "--device", "cpu"], {})
    assert s.api_keys == ("key-one", "key-two") and s.resolved_device() == "cpu"
    assert "key-one" not in repr(s) and "key-one" not in str(s.public_dict())
    with pytest.raises(SettingsError, match="DYNPROMPT_MAX_WAIT_MS"):
        settings_from([], {"DYNPROMPT_MAX_WAIT_MS": "soon"})
    with pytest.raises(SettingsError, match="--device"):
        settings_from(["--device", "tpu"], {})
    with pytest.raises(SettingsError, match="--max-batch-size"):
        settings_from(["--max-batch-size", "0"], {})


def test_empty_repository_serves_the_shipped_default_model(tmp_path: Path) -> None:
    """An empty volume (compose's default ./models) still gives a working server, loudly."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(["--model-repository", str(empty)], log_dir=tmp_path)
    try:
        names = [m["name"] for m in httpx.get(server.url + "/v1/models").json()["models"]]
        assert names == ["sst2"]
        assert "holds no checkpoints" in server.logs() and str(empty) in server.logs()
        reply = httpx.post(
            server.url + "/v1/classify", json={"model": "sst2", "inputs": ["a joyous, moving film"]}
        )
        assert reply.status_code == 200 and reply.json()["results"][0]["label"] == "positive"
    finally:
        server.stop()


def test_help_names_every_flag_its_variable_and_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag in (
        "--model-repository", "--host", "--port", "--device", "--dtype", "--backend", "--onnx-cache-dir",
        "--threads", "--max-batch-size", "--max-batch-tokens", "--max-wait-ms", "--max-queue-requests",
        "--queue-timeout-s", "--max-client-batch-size", "--payload-limit-bytes", "--api-key", "--log-level",
        "--padding-tolerance", "--padding-budget-tokens", "--drain-timeout-s", "--tokenizer-threads",
        "--log-format",
    ):  # fmt: skip
        assert flag in text, flag
        env = "DYNPROMPT_" + flag[2:].replace("-", "_").upper()
        assert env in text, env
    assert "default: 127.0.0.1" in text and "default: 8000" in text


def test_bad_repository_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    from dynprompt.service.cli import serve_main

    assert serve_main(["--port", "not-a-port"]) == 2
    missing = tmp_path / "missing"
    server = start_server(["--model-repository", str(missing)], wait=False, log_dir=tmp_path)
    assert server.wait(120) != 0
    assert "not found" in server.logs() and str(missing) in server.logs()
    broken = tmp_path / "broken" / "m"
    broken.mkdir(parents=True)
    (broken / "dynprompt.json").write_text(json.dumps({"name": "m"}))
    server = start_server(["--model-repository", str(broken.parent)], wait=False, log_dir=tmp_path)
    assert server.wait(120) != 0
    assert "dynprompt.json" in server.logs() and "variant" in server.logs()


def test_the_threads_of_one_process_are_named_by_role(client: httpx.Client, server: Any) -> None:
    """With one process, the event loop is the main thread; the worker's threads name
    themselves (and the tokenizer's pool takes its name from the thread that starts it)."""
    assert client.post("/v1/classify", json={"model": "pre", "inputs": ["a fine film"]}).is_success
    tasks = Path(f"/proc/{server.pid}/task")
    names = [(tasks / tid / "comm").read_text().strip() for tid in tasks.iterdir()]
    assert Path(f"/proc/{server.pid}/comm").read_text().strip() == "dp-loop"
    for role in ("dp-prepare", "dp-compute", "dp-tokenize"):
        assert role in names, names
