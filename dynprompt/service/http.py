"""The inference route's handler and the small HTTP pieces every route shares.

`classify_handler` is the whole life of a classify request in the HTTP layer:
read the body (payload limit), parse it (400/413/422), call `Engine.classify`,
map the result onto `ClassifyResponse` (or the error onto the one error body),
send it. The engine records it (`Engine.observe`), whatever the outcome.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send

from dynprompt.service import errors
from dynprompt.service.config import Settings
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

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Generated ids: a random per-process prefix and a counter (uuid4 per request costs a syscall).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)
# Bodies larger than this are parsed off the event loop.
PARSE_INLINE_BYTES = 64 * 1024
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
    """The whole body (b"" for none); 413 when it is over `limit` bytes."""
    if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return b""
    too_large = errors.ServiceError(
        413, "payload_too_large", f"request body over the limit of {limit} bytes"
    )
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


def parse_classify(body: bytes, max_inputs: int) -> tuple[ClassifyRequest | None, str | None, Any]:
    """(request, model name hint, error): the body checked raw, then validated.

    The input count is checked on the raw JSON, before any validation, so a body of a
    quarter of a million one-character inputs is refused in one comparison.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return None, None, errors.bad_request(f"request body is not valid JSON ({exc})")
    hint = None
    if isinstance(raw, dict):
        name = raw.get("model")
        hint = name if isinstance(name, str) and _MODEL_NAME.match(name) else None
        inputs = raw.get("inputs")
        if isinstance(inputs, list) and len(inputs) > max_inputs:
            message = f"{len(inputs)} inputs; at most {max_inputs} per request"
            return None, hint, errors.ServiceError(413, "too_many_inputs", message)
    try:
        return ClassifyRequest.model_validate(raw), hint, None
    except ValidationError as exc:
        status, type_, message = errors.validation_message(exc.errors())
        return None, hint, errors.ServiceError(status, type_, message)


def to_call(request: ClassifyRequest) -> ClassifyCall:
    inputs: list[tuple[str, str | None]] = [
        (given.text, given.text_pair) if isinstance(given, PairInput) else (given, None)
        for given in request.inputs
    ]
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


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def classify_handler(settings: Settings, engine: Engine, keys: list[bytes]) -> Handler:
    limit, max_inputs = settings.payload_limit_bytes, settings.max_client_batch_size

    async def classify(scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_of(scope)
        with engine.observe(request_id, "POST", scope["path"]) as obs:
            headers = None
            try:
                authorize(scope, keys)
                body = await read_body(scope, receive, limit)
                if len(body) <= PARSE_INLINE_BYTES:
                    request, obs.model, error = parse_classify(body, max_inputs)
                else:
                    parsed = await asyncio.to_thread(parse_classify, body, max_inputs)
                    request, obs.model, error = parsed
                if error is not None:
                    raise error
                assert request is not None
                result = await engine.classify(
                    to_call(request), obs, lambda: wait_disconnect(receive)
                )
                status = 200
                payload = _RESPONSE.dump_json(to_response(request, result), exclude_none=True)
            except errors.ServiceError as exc:
                status, payload, headers = exc.status, error_json(exc), exc.headers
            except Exception:
                log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
                internal = errors.internal(request_id)
                status, payload = internal.status, error_json(internal)
            obs.status = status
            if status != 499:
                await respond(send, status, payload, request_id, headers)

    return classify
