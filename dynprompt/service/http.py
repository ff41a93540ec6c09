"""The inference routes' handler and the small HTTP pieces every route shares.

`inference_handler` is the whole life of an inference request in the HTTP layer:
read the body (payload limit), parse it (400/413/422), call `Engine.classify`,
render the result (or the error as the one error body), send it. The engine
records it (`Engine.observe`), whatever the outcome. A route supplies only its
`InferenceRoute`: `classify_handler` here (`POST /v1/classify`), `tei.predict_handler`
(`POST /predict`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send

from dynprompt.service import errors
from dynprompt.service.config import Settings
from dynprompt.service.connections import ABORTED, on_client_gone
from dynprompt.service.engine import ClassifyCall, ClassifyResult, Engine
from dynprompt.service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    PairInput,
    Result,
    Routing,
    Usage,
)

log = logging.getLogger("dynprompt.service")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
R = TypeVar("R")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Generated ids: a random per-process prefix and a counter (uuid4 per request costs a syscall).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)
# Bodies larger than this are parsed off the event loop.
PARSE_INLINE_BYTES = 64 * 1024
# An over-limit body is read (and dropped) up to this size before the 413 is sent.
DRAIN_BYTES = 8 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]
_RESPONSE = TypeAdapter(ClassifyResponse)


def request_id_of(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


def header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


def check_key(given: str, keys: list[bytes]) -> None:
    if not any(hmac.compare_digest(given.encode(), key) for key in keys):
        raise errors.ServiceError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )


def authorize(scope: Scope, keys: list[bytes]) -> None:
    if not keys:
        return
    value = (header(scope, b"authorization") or b"").decode("latin-1")
    scheme, _, credentials = value.partition(" ")
    check_key(credentials.strip() if scheme.lower() == "bearer" else "", keys)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body (b"" for none); 413 when it is over `limit` bytes.

    An over-limit body is read to its end (up to `DRAIN_BYTES`) before the 413 goes out:
    a server that answers and closes while the client is still sending makes the client
    see a connection reset instead of the answer. A body that never completes ends in
    the status the connection's guard gave it (408 too slow, 503 shutting down), or 499.
    """
    if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return b""
    too_large = errors.ServiceError(
        413, "payload_too_large", f"request body over the limit of {limit} bytes"
    )
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_BYTES:
            await _drain(scope, receive, DRAIN_BYTES)
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _gone(scope)
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            if more:
                await _drain(scope, receive, DRAIN_BYTES - size)
            raise too_large
        chunks.append(chunk)
        if not more:
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drain(scope: Scope, receive: Receive, budget: int) -> None:
    """Read and drop the rest of a body, up to `budget` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _gone(scope)
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _gone(scope: Scope) -> errors.ServiceError:
    """Why the body stopped: the connection guard's reason, or the client left."""
    aborted = scope.get(ABORTED)
    if aborted is not None:
        status, type_, message = aborted
        return errors.ServiceError(status, type_, message)
    return errors.ServiceError(499, "client_closed_request", "the client went away")


def replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then the real channel (for http.disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def error_json(exc: errors.ServiceError) -> bytes:
    return orjson.dumps({"error": {"type": exc.type, "message": exc.message}})


async def respond(
    send: Send,
    status: int,
    payload: bytes,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> None:
    raw = [
        *_JSON,
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if headers:
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


Parsed = tuple[R | None, str | None, errors.ServiceError | None]


def load_json(body: bytes) -> Any:
    """The body as JSON; a `ServiceError` (400) when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return errors.bad_request(f"request body is not valid JSON ({exc})")


def model_hint(name: Any) -> str | None:
    """A model name fit to label metrics before the request is validated, else None."""
    return name if isinstance(name, str) and _MODEL_NAME.match(name) else None


def too_many_inputs(count: int, max_inputs: int) -> errors.ServiceError:
    message = f"{count} inputs; at most {max_inputs} per request"
    return errors.ServiceError(413, "too_many_inputs", message)


def invalid(exc: ValidationError) -> errors.ServiceError:
    status, type_, message = errors.validation_message(exc.errors())
    return errors.ServiceError(status, type_, message)


def parse_classify(body: bytes, max_inputs: int) -> Parsed[ClassifyRequest]:
    """(request, model name hint, error): the body checked raw, then validated.

    The input count is checked on the raw JSON, before any validation, so a body of a
    quarter of a million one-character inputs is refused in one comparison.
    """
    raw = load_json(body)
    if isinstance(raw, errors.ServiceError):
        return None, None, raw
    hint = None
    if isinstance(raw, dict):
        hint = model_hint(raw.get("model"))
        inputs = raw.get("inputs")
        if isinstance(inputs, list) and len(inputs) > max_inputs:
            return None, hint, too_many_inputs(len(inputs), max_inputs)
    try:
        return ClassifyRequest.model_validate(raw), hint, None
    except ValidationError as exc:
        return None, hint, invalid(exc)


def to_call(request: ClassifyRequest) -> ClassifyCall:
    given = request.inputs
    inputs: list[tuple[str, str | None]] = (
        [(given, None)]
        if isinstance(given, str)
        else [
            (item.text, item.text_pair) if isinstance(item, PairInput) else (item, None)
            for item in given
        ]
    )
    return ClassifyCall(request.model, inputs, request.truncate, request.version)


def to_response(request: ClassifyRequest, result: ClassifyResult) -> ClassifyResponse:
    labels = result.labels
    results = []
    prompt_tokens = input_tokens = 0
    for row in result.rows:
        probs = row.probs
        best = max(range(len(probs)), key=probs.__getitem__)
        routing = None
        if request.return_routing:
            routing = Routing(
                prompt_length=row.prompt_length,
                tokens_before=row.tokens_before,
                tokens_after=row.prompt_length - row.tokens_before,
                pool_weights=row.pool_weights,
            )
        results.append(
            Result(
                label=labels[best],
                score=probs[best],
                scores=dict(zip(labels, probs, strict=True)) if request.return_all_scores else None,
                routing=routing,
                truncated=row.truncated,
            )
        )
        prompt_tokens += row.prompt_length
        input_tokens += row.input_tokens
    usage = Usage(input_tokens=input_tokens, prompt_tokens=prompt_tokens)
    return ClassifyResponse(model=result.model, results=results, usage=usage)


def render_classify(request: ClassifyRequest, result: ClassifyResult) -> bytes:
    return _RESPONSE.dump_json(to_response(request, result), exclude_none=True)


@dataclass(frozen=True, slots=True)
class InferenceRoute(Generic[R]):
    """What sets one inference route apart: how its body becomes a call, and the result
    its answer. Everything else (ids, auth, payload limit, engine, errors) is shared."""

    parse: Callable[[bytes, Scope], Parsed[R]]  # runs off the event loop for large bodies
    call: Callable[[R], ClassifyCall]
    render: Callable[[R, ClassifyResult], bytes]


def inference_handler(
    settings: Settings, engine: Engine, keys: list[bytes], route: InferenceRoute[R]
) -> Handler:
    """A plain ASGI handler running `route` through `Engine.classify`; the engine records
    every request (`Engine.observe`), whatever the outcome."""
    limit = settings.payload_limit_bytes
    parse, call, render = route.parse, route.call, route.render

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_of(scope)
        with engine.observe(request_id, "POST", scope["path"]) as obs:
            headers = None
            try:
                authorize(scope, keys)
                body = await read_body(scope, receive, limit)
                if len(body) <= PARSE_INLINE_BYTES:
                    request, obs.model, error = parse(body, scope)
                else:
                    request, obs.model, error = await asyncio.to_thread(parse, body, scope)
                if error is not None:
                    raise error
                assert request is not None
                result = await engine.classify(
                    call(request), obs, functools.partial(on_client_gone, scope)
                )
                status = 200
                payload = render(request, result)
            except errors.ServiceError as exc:
                status, payload, headers = exc.status, error_json(exc), exc.headers
            except Exception:
                log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
                internal = errors.internal(request_id)
                status, payload = internal.status, error_json(internal)
            obs.status = status
            if status != 499:
                await respond(send, status, payload, request_id, headers)

    return handle


def classify_handler(settings: Settings, engine: Engine, keys: list[bytes]) -> Handler:
    max_inputs = settings.max_client_batch_size

    def parse(body: bytes, scope: Scope) -> Parsed[ClassifyRequest]:
        return parse_classify(body, max_inputs)

    return inference_handler(
        settings, engine, keys, InferenceRoute(parse, to_call, render_classify)
    )
