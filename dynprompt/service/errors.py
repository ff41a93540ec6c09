"""Every error the server answers, in one shape: `{"error": {"type": str, "message": str}}`.

Code raises `ServiceError(status, type, message)`; the handlers registered by
`install_handlers` turn it, FastAPI's validation errors, Starlette's HTTP errors
and anything unexpected into that body. A stack trace never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dynprompt.service")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ServiceError(Exception):
    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message}}, status_code=status, headers=headers
    )


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "invalid_json", message)


def not_found(model: str, available: list[str]) -> ServiceError:
    shown = model if len(model) <= 80 else model[:77] + "..."
    names = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
    return ServiceError(
        404, "model_not_found", f"no model named {shown!r}; loaded: {names or 'none'}"
    )


def unprocessable(message: str, type_: str = "invalid_request") -> ServiceError:
    return ServiceError(422, type_, message)


def queue_full(retry_after_s: int) -> ServiceError:
    return ServiceError(
        429,
        "queue_full",
        "the server's request queue is full; retry later",
        {"Retry-After": str(retry_after_s)},
    )


def unavailable(type_: str, message: str, retry_after_s: int | None = None) -> ServiceError:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return ServiceError(503, type_, message, headers)


def internal(request_id: str) -> ServiceError:
    return ServiceError(
        500, "internal_error", f"internal error; quote request id {request_id} when reporting it"
    )


def _location(loc: tuple[Any, ...]) -> str:
    from dynprompt.service.schemas import INPUT_TAGS

    parts = [str(p) for p in loc if p != "body" and p not in INPUT_TAGS]
    return ".".join(parts) or "body"


def validation_message(problems: Sequence[Any]) -> tuple[int, str, str]:
    """(status, type, message) for a failed body (pydantic's `errors()`): malformed JSON
    is 400, the rest 422. The message names each field and what is wrong, never the
    submitted value."""
    if any(err.get("type") == "json_invalid" for err in problems):
        err = next(e for e in problems if e.get("type") == "json_invalid")
        detail = (err.get("ctx") or {}).get("error", "")
        return 400, "invalid_json", f"request body is not valid JSON ({detail})".replace(" ()", "")
    shown = []
    for err in problems[:10]:
        message = str(err.get("msg", "invalid"))
        if err.get("type") == "missing":
            message = "field required"
        shown.append(f"{_location(tuple(err.get('loc', ())))}: {message}")
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return 422, "invalid_request", "; ".join(shown) + more


def install_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status, type_, message = validation_message(exc.errors())
        return error_response(status, type_, message)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        types = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        type_ = types.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}"
        return error_response(exc.status_code, type_, message, dict(exc.headers or {}))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the error body."""
    described = {
        400: "malformed JSON",
        401: "missing or wrong API key (only when the server has API keys)",
        404: "unknown model",
        409: "the model repository cannot be rescanned (the served models stay)",
        413: "body over the payload limit, more inputs than max_client_batch_size, or a text "
        "over max_input_chars",
        422: "invalid fields, empty text, or an input over max_length with truncate=false",
        429: "queue full; retry after Retry-After seconds",
        500: "internal error (logged with the request id)",
        503: "not ready, draining, the request waited past its queue timeout, or an input "
        "does not fit in memory even alone",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": described[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
            }
        out[status] = entry
    return out
