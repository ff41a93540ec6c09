"""`POST /predict`: text-embeddings-inference's sequence-classification route (DESIGN §4).

TEI clients switch to dynprompt without code changes: the request and response shapes are
TEI's (`router/src/http/types.rs`: `PredictRequest`, `PredictInput`, `PredictResponse`):

- `inputs`: one text, `[text]` or `[text, text_pair]` is one input, answered with one list of
  `{"score", "label"}` (every label, highest score first); `[[text] | [text, text_pair], ...]`
  is a batch, answered with one such list per input, in input order. As in TEI, the first
  element decides: a list that starts with a string is one input, one that starts with a
  list is a batch (so `["a", "b"]` is a pair, never a batch of two).
- `truncate`: trim inputs over the model's max_length (absent or null: true, dynprompt's
  default, where TEI uses its server's `--auto-truncate`); false answers 422 for a long input.
- `truncation_direction`: `right`/`left` (or TEI's `Right`/`Left`): which end truncation
  trims, for this request; absent means the side the checkpoint names
  (`input.truncation_side`, right unless trained otherwise).
- `raw_scores`: TEI answers the head's logits. dynprompt's engine answers probabilities, so
  raw scores here are log-probabilities: the logits shifted by one constant per input, so
  softmax over them gives back the probabilities and the order is the same. A probability
  that underflowed to 0 reads as `LOG_FLOOR` (float32's limit) instead of minus infinity,
  which JSON cannot carry.
- Unknown fields are ignored, as TEI ignores them (some clients send `parameters`).

Which model: TEI serves one model, so its clients never name one. With exactly one model
served, that model answers. With several, name it in the `model` query parameter
(`/predict?model=sst2`), the `x-dynprompt-model` header (for clients that let you set headers
but not the URL) or a `model` field of the body (a dynprompt extension, as in /v1/classify);
naming none is a 422, and so is naming two different ones.

Errors use dynprompt's one body, `{"error": {"type", "message"}}`, with the statuses of
DESIGN §4 (413 for a batch over max_client_batch_size, where TEI says 422). TEI's own error
body is `{"error", "error_type"}`; TEI clients mostly check the status, and one server with
two error shapes would be harder on everyone else. The route runs through the same handler
as `/v1/classify` (`http.inference_handler`), so admission, limits, request ids, the access
log and every metric count it like a classify request.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    ValidationError,
)
from starlette.datastructures import QueryParams
from starlette.types import Scope

from dynprompt.service import errors, http
from dynprompt.service.config import Settings
from dynprompt.service.engine import ClassifyCall, ClassifyResult, Engine
from dynprompt.service.schemas import MODEL_NAME_PATTERN, ModelName, Text

PREDICT_PATH = "/predict"
MODEL_QUERY = "model"
MODEL_HEADER = "x-dynprompt-model"
_MODEL_HEADER = MODEL_HEADER.encode()
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
# log of float32's smallest positive value: what a probability that underflowed to 0 reads as.
LOG_FLOOR = math.log(1e-45)

# One input: [text] or [text, text_pair].
Sequence = Annotated[list[Text], Field(min_length=1, max_length=2)]


def _predict_kind(value: Any) -> str:
    """TEI's rule: a string is one text; a list is a batch when its first element is a list."""
    if isinstance(value, str):
        return "single"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "batch"
    return "pair"


PredictInput = Annotated[
    Annotated[Text, Tag("single")]
    | Annotated[Sequence, Tag("pair")]
    | Annotated[list[Sequence], Field(min_length=1), Tag("batch")],
    Discriminator(_predict_kind),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"inputs": "a gripping, funny film"},
                {"inputs": [["a gripping, funny film"], ["dull"]], "raw_scores": True},
            ]
        },
    )
    model: ModelName | None = Field(
        None,
        description="which served model answers (a dynprompt extension); needed only when "
        f"the server serves several. The {MODEL_QUERY} query parameter or the "
        f"{MODEL_HEADER} header name it too",
    )
    inputs: PredictInput = Field(
        description="one input (a text, [text] or [text, text_pair]), answered with one list "
        "of predictions; or a batch [[text] | [text, text_pair], ...], answered with one "
        "list per input (at most the server's max_client_batch_size)"
    )
    truncate: bool | None = Field(
        None,
        strict=True,
        description="trim inputs over the model's max_length (absent or null: true; false: "
        "422 for a longer input)",
    )
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = Field(
        None,
        description="which end truncation trims; absent: the model's own side (its "
        "checkpoint's input.truncation_side)",
    )
    raw_scores: bool = Field(
        False,
        strict=True,
        description="log-probabilities instead of probabilities (the logits up to one "
        "constant per input; the order is the same)",
    )


class Prediction(BaseModel):
    score: float = Field(description="the label's probability (log-probability with raw_scores)")
    label: str


class PredictResponse(RootModel[list[Prediction] | list[list[Prediction]]]):
    """Every label, highest score first: one list for one input, a list of lists for a batch."""


MODEL_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": where,
        "in": kind,
        "required": False,
        "description": "which served model answers; needed only when the server serves "
        f"several (the {other} or a model field of the body name it too)",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "pattern": MODEL_NAME_PATTERN,
        },
    }
    for where, kind, other in (
        (MODEL_QUERY, "query", f"{MODEL_HEADER} header"),
        (MODEL_HEADER, "header", f"{MODEL_QUERY} query parameter"),
    )
]


@dataclass(frozen=True, slots=True)
class Predict:
    """A checked /predict request: what the engine is asked, and how to answer."""

    model: str | None
    inputs: list[tuple[str, str | None]]
    batch: bool
    truncate: bool
    truncation_side: str | None
    raw_scores: bool


def requested_model(scope: Scope, field: Any) -> str | None:
    """The model named by the query parameter, the header or the body's `model` field (not
    yet validated); None when none names one."""
    named = [] if field is None else [("the body's model field", field)]
    if scope["query_string"]:
        query = QueryParams(scope["query_string"].decode("latin-1"))
        if MODEL_QUERY in query:
            named.append((f"the {MODEL_QUERY} query parameter", query[MODEL_QUERY]))
    header = http.header(scope, _MODEL_HEADER)
    if header is not None:
        named.append((f"the {MODEL_HEADER} header", header.decode("latin-1")))
    for where, name in named:
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise errors.unprocessable(f"model: {where} is not a model name ({MODEL_NAME_PATTERN})")
    if len({name for _, name in named}) > 1:
        where = " and ".join(where for where, _ in named)
        raise errors.unprocessable(f"model: {where} name different models")
    return cast(str, named[0][1]) if named else None


def parse_predict(body: bytes, scope: Scope, max_inputs: int) -> http.Parsed[Predict]:
    """(request, model name hint, error), in the order /v1/classify checks them: JSON (400),
    the model's name (422), the input count on the raw JSON (413), the fields (422)."""
    raw = http.load_json(body)
    if isinstance(raw, errors.ServiceError):
        return None, None, raw
    try:
        model = requested_model(scope, raw.get("model") if isinstance(raw, dict) else None)
    except errors.ServiceError as exc:
        return None, None, exc
    if isinstance(raw, dict):
        given = raw.get("inputs")
        # A list over two long can only be a batch (or a malformed input): refuse it unread.
        if isinstance(given, list) and len(given) > max(max_inputs, 2):
            return None, model, http.too_many_inputs(len(given), max_inputs)
    try:
        request = PredictRequest.model_validate(raw)
    except ValidationError as exc:
        return None, model, http.invalid(exc)
    given = request.inputs
    batch = _predict_kind(given) == "batch"
    if isinstance(given, str):
        sequences = [[given]]
    else:
        sequences = cast(list[list[str]], given) if batch else [cast(list[str], given)]
    if len(sequences) > max_inputs:
        return None, model, http.too_many_inputs(len(sequences), max_inputs)
    inputs = [(seq[0], seq[1] if len(seq) == 2 else None) for seq in sequences]
    side = request.truncation_direction.lower() if request.truncation_direction else None
    truncate = True if request.truncate is None else request.truncate
    return Predict(model, inputs, batch, truncate, side, request.raw_scores), model, None


def to_call(request: Predict) -> ClassifyCall:
    return ClassifyCall(
        request.model, request.inputs, request.truncate, truncation_side=request.truncation_side
    )


def render(request: Predict, result: ClassifyResult) -> bytes:
    labels = result.labels
    answers = []
    for row in result.rows:
        scores = (
            [math.log(p) if p > 0.0 else LOG_FLOOR for p in row.probs]
            if request.raw_scores
            else row.probs
        )
        ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: pair[0], reverse=True)
        answers.append([{"score": score, "label": label} for score, label in ranked])
    return orjson.dumps(answers if request.batch else answers[0])


def predict_handler(settings: Settings, engine: Engine, keys: list[bytes]) -> http.Handler:
    max_inputs = settings.max_client_batch_size

    def parse(body: bytes, scope: Scope) -> http.Parsed[Predict]:
        return parse_predict(body, scope, max_inputs)

    return http.inference_handler(
        settings, engine, keys, http.InferenceRoute(parse, to_call, render)
    )
