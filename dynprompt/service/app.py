"""The HTTP front end: routes of DESIGN §4 over an `Engine`.

Inference routes (`/v1/classify`; `/predict`, TEI's shape, in `tei.py`) are plain
ASGI handlers (`http.inference_handler`) that parse the body, call
`Engine.classify` and map its result onto the response schema; they skip
FastAPI's per-request machinery (dependency solving, response validation), which
costs more than everything else a request does here. FastAPI still documents
them: each is declared as a route with its request and response models, so
`/openapi.json` and `/docs` describe exactly what the handler honours. Every
other route is an ordinary FastAPI route. `Front` is the ASGI app uvicorn runs:
it sends inference paths to their handler and the rest to FastAPI, giving each
request its id (`x-request-id`), the payload limit and an access log line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.datastructures import MutableHeaders
from starlette.types import Message, Receive, Scope, Send

from dynprompt import __version__
from dynprompt.service import errors, http, tei
from dynprompt.service.config import Settings
from dynprompt.service.engine import CoreHandle, Engine
from dynprompt.service.logs import AccessLog
from dynprompt.service.schemas import (
    MODEL_NAME_PATTERN,
    ClassifyRequest,
    ClassifyResponse,
    Health,
    ModelCard,
    ModelList,
    Ready,
    ReloadResult,
)

CLASSIFY_PATH = "/v1/classify"
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class Front:
    """The ASGI app: inference paths to their handlers, the rest to FastAPI."""

    def __init__(self, api: FastAPI, hot: dict[str, http.Handler], settings: Settings) -> None:
        self.api = api
        self.hot = hot
        self.limit = settings.payload_limit_bytes
        self.access_log = AccessLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        handler = self.hot.get(scope["path"]) if scope["method"] == "POST" else None
        if handler is not None:
            await handler(scope, receive, send)
            return
        await self._other(scope, receive, send)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = http.request_id_of(scope)
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            body = await http.read_body(scope, receive, self.limit)
            await self.api(scope, http.replay(body, receive) if body else receive, send_with_id)
        except errors.ServiceError as exc:
            if not started:
                await http.respond(send_with_id, exc.status, http.error_json(exc), request_id)
        except Exception:
            http.log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not started:
                payload = http.error_json(errors.internal(request_id))
                await http.respond(send_with_id, 500, payload, request_id)
        finally:
            self.access_log.line(
                scope["method"],
                scope["path"],
                status,
                {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                 "status": status},
            )  # fmt: skip


def documented(
    api: FastAPI,
    path: str,
    handler: http.Handler,
    request_model: type[Any],
    response_model: type[Any],
    **route: Any,
) -> None:
    """Declare `path` to FastAPI (for OpenAPI and /docs) with `handler` as what runs it."""

    async def endpoint(body: Any) -> Any:
        raise AssertionError("served by its handler")  # pragma: no cover

    endpoint.__annotations__ = {"body": request_model, "return": response_model}
    api.add_api_route(path, endpoint, methods=["POST"], response_model=response_model, **route)
    for candidate in api.router.routes:
        if isinstance(candidate, APIRoute) and candidate.path == path:
            candidate.app = handler


def create_app(
    settings: Settings,
    engine: Engine,
    connect: Callable[[], AbstractAsyncContextManager[CoreHandle]],
) -> Front:
    """The front end of `engine`; `connect` reaches its core for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with connect() as core:
            engine.core = core
            yield

    # /docs and /redoc take their scripts, styles and icon from the fastapi-offline package
    # (mounted under /static-offline-docs), never from a CDN: the docs work air-gapped. Swagger
    # UI's validator badge would fetch an image from validator.swagger.io: it is off.
    api = FastAPIOffline(
        title="dynprompt",
        version=__version__,
        description="Dynamic-prompt classifiers: each input gets its own prompt length and "
        "position from its model's router; requests from all models share batches.",
        lifespan=lifespan,
        strict_content_type=False,
        swagger_ui_parameters={"validatorUrl": None},
    )
    errors.install_handlers(api)
    keys = [k.encode() for k in settings.api_keys]
    auth: list[Any] = []
    if keys:
        bearer = HTTPBearer(auto_error=False, description="one of the server's API keys")

        async def require_key(
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        ) -> None:
            given = credentials.credentials if credentials is not None else ""
            http.check_key(given, keys)

        auth = [Depends(require_key)]
    maybe_401 = (401,) if keys else ()

    classify = http.classify_handler(settings, engine, keys)
    documented(
        api,
        CLASSIFY_PATH,
        classify,
        ClassifyRequest,
        ClassifyResponse,
        response_model_exclude_none=True,
        responses=errors.responses(400, *maybe_401, 404, 413, 422, 429, 500, 503),
        dependencies=auth,
        summary="Classify inputs with one model",
    )
    predict = tei.predict_handler(settings, engine, keys)
    documented(
        api,
        tei.PREDICT_PATH,
        predict,
        tei.PredictRequest,
        tei.PredictResponse,
        responses=errors.responses(400, *maybe_401, 404, 413, 422, 429, 500, 503),
        dependencies=auth,
        openapi_extra={"parameters": tei.MODEL_PARAMETERS},
        summary="Classify in text-embeddings-inference's shape (TEI clients work unchanged)",
        description="TEI's sequence-classification route: every label with its score, highest "
        "first; one list for one input, a list of lists for a batch. With several models "
        "served, the model query parameter, the x-dynprompt-model header or the body's model "
        "field names one. raw_scores gives log-probabilities. Errors use dynprompt's error "
        "body, not TEI's.",
    )

    @api.get(
        "/v1/models",
        response_model=ModelList,
        responses=errors.responses(*maybe_401, 500),
        dependencies=auth,
        summary="List the loaded models",
    )
    async def list_models() -> dict[str, Any]:
        return {"models": await engine.models()}

    @api.get(
        "/v1/models/{name}",
        response_model=ModelCard,
        responses=errors.responses(*maybe_401, 404, 422, 500),
        dependencies=auth,
        summary="One model's card",
    )
    async def get_model(
        name: str = PathParam(  # noqa: B008
            min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN, description="model name"
        ),
    ) -> dict[str, Any]:
        return await engine.model(name)

    @api.post(
        "/v1/admin/reload",
        response_model=ReloadResult,
        responses=errors.responses(*maybe_401, 409, 500, 503),
        dependencies=auth,
        summary="Rescan the model repository and swap in new and changed checkpoints",
    )
    async def reload() -> dict[str, Any]:
        return await engine.reload()

    @api.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/ready",
        response_model=Ready,
        responses=errors.responses(503),
        summary="Readiness: 200 once every model is loaded and warm; 503 before and while draining",
    )
    async def ready() -> dict[str, Any]:
        return {"status": "ready", "models": await engine.ready()}

    @api.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def prometheus_metrics() -> Response:
        return Response(await engine.metrics(), media_type=CONTENT_TYPE_METRICS)

    return Front(api, {CLASSIFY_PATH: classify, tei.PREDICT_PATH: predict}, settings)
