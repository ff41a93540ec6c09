"""Property-based tests of the live server against its own OpenAPI document (schemathesis).

Every operation gets a bounded number of generated requests (valid and, where the schema
allows, invalid ones); each
answer must not be a 5xx, must carry a documented status, and must conform to the schema.
`DYNPROMPT_SCHEMATHESIS_EXAMPLES` raises the bound.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from dynprompt.models import Backbone
from tests.server_util import build_repository, start_server

EXAMPLES = int(os.environ.get("DYNPROMPT_SCHEMATHESIS_EXAMPLES", "25"))
MODELS = {
    "dyn": {"variant": "dynamic", "feature": "backbone", "labels": ["negative", "positive"]},
    "pair": {
        "variant": "instance_position",
        "feature": "embeddings",
        "labels": ["entailment", "not_entailment"],
        "pair_field": "hypothesis",
        "text_field": "premise",
    },
}


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("repo")
    build_repository(path, minilm, MODELS)
    server = start_server(
        [
            "--model-repository", str(path),
            "--max-client-batch-size", "8",
            "--max-input-chars", "2000",
            "--max-wait-ms", "2",
        ],
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    assert server.stop() == 0, server.logs()[-3000:]


def test_api_conforms_to_its_openapi(live_schema: Any) -> None:
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    seen = []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in live_schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.label)
        strategies = [operation.as_strategy(generation_mode=mode) for mode in modes]

        @given(case=st.one_of(strategies))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate(timeout=60, checks=checks)

        check()
    assert "POST /v1/classify" in seen and "POST /v1/admin/reload" in seen, seen
