"""The FastAPI app: routes of DESIGN §4 over an `Engine`, plus one ASGI middleware.

The middleware gives every request its id (`x-request-id`, accepted or made),
enforces the payload limit before anything parses the body, counts classify
requests in `requests_total` / `request_duration_seconds`, writes the one log
line per request, and turns anything unexpected into a 500 with the error body.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynprompt import __version__
from dynprompt.models.backbone import Backbone, load_backbone
from dynprompt.service import errors
from dynprompt.service.batcher import BatchLimits
from dynprompt.service.config import Settings
from dynprompt.service.engine import Engine
from dynprompt.service.metrics import UNKNOWN_MODEL, ServiceMetrics
from dynprompt.service.registry import BackboneLoader, Registry
from dynprompt.service.schemas import (
    MODEL_NAME_PATTERN,
    ClassifyRequest,
    ClassifyResponse,
    Health,
    ModelCard,
    ModelList,
    PairInput,
    Ready,
    ReloadResult,
)

log = logging.getLogger("dynprompt.service")
access_log = logging.getLogger("dynprompt.service.access")

CLASSIFY_PATH = "/v1/classify"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Generated ids: a random per-process prefix and a counter (uuid4 per request costs a syscall).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def backbone_loader(settings: Settings) -> BackboneLoader:
    """`load_backbone`, or the ONNX Runtime backbone for `--backend onnx` (imported lazily)."""
    if settings.backend == "torch":
        return load_backbone

    def load_onnx(name: str, device: str, dtype: torch.dtype) -> Backbone:
        try:
            from dynprompt.models.onnx_export import load_onnx_backbone
        except ImportError as exc:
            raise RuntimeError(f"--backend onnx is not available here: {exc}") from exc
        cache = str(settings.onnx_cache_dir) if settings.onnx_cache_dir is not None else None
        backbone: Backbone = load_onnx_backbone(
            name, device, dtype, cache_dir=cache, intra_op_threads=settings.threads
        )
        return backbone

    return load_onnx


# --------------------------------------------------------------------------- middleware


class RequestMiddleware:
    """Request id, payload limit, classify metrics, the access log line, last-resort 500."""

    def __init__(
        self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics, registry: Registry
    ) -> None:
        self.app = app
        self.limit = settings.payload_limit_bytes
        self.metrics = metrics
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = (
            incoming if _REQUEST_ID.match(incoming) else f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                response = errors.error_response(
                    413, "payload_too_large", f"request body over the limit of {self.limit} bytes"
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, _replay(body, receive) if body else receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not started:
                await errors.error_response(
                    500, "internal_error", f"internal error; quote request id {request_id}"
                )(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body (b"" for none), or None when it is over the limit."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return b""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        path = scope["path"]
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        if path == CLASSIFY_PATH:
            name = state.get("model_name")
            model = name if isinstance(name, str) and self.registry.get(name) else UNKNOWN_MODEL
            self.metrics.requests.labels(model, str(status)).inc()
            self.metrics.request_duration.labels(model).observe(seconds)
            fields["model"] = model
            for key in ("rows", "queue_ms", "compute_ms"):
                if key in state:
                    fields[key] = state[key]
        level = logging.INFO if path.startswith("/v1/") else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(
                level, "%s %s %d", scope["method"], path, status, extra={"fields": fields}
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then the real channel (for http.disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------- app


def create_app(
    settings: Settings,
    loader: BackboneLoader | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """An app serving `settings.repository`; models load in the background after startup."""
    metrics = ServiceMetrics()
    limits = BatchLimits(
        settings.max_batch_size,
        settings.max_batch_tokens,
        settings.max_wait_ms / 1000.0,
        settings.padding_tolerance,
    )
    registry = Registry(
        loader or backbone_loader(settings),
        settings.resolved_device(),
        settings.torch_dtype,
        limits,
        metrics,
    )
    engine = Engine(settings, metrics, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(engine.start(settings.repository, on_fatal))
        yield
        if not loading.done():
            loading.cancel()
        await engine.close()

    app = FastAPI(
        title="dynprompt",
        version=__version__,
        description="Dynamic-prompt classifiers: each input gets its own prompt length and "
        "position from its model's router; requests from all models share batches.",
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.state.engine = engine
    app.state.settings = settings
    errors.install_handlers(app)
    app.add_middleware(RequestMiddleware, settings=settings, metrics=metrics, registry=registry)

    auth: list[Any] = []
    if settings.api_keys:
        bearer = HTTPBearer(auto_error=False, description="one of the server's API keys")
        keys = [k.encode() for k in settings.api_keys]

        async def require_key(
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        ) -> None:
            given = credentials.credentials.encode() if credentials is not None else b""
            if not any(hmac.compare_digest(given, key) for key in keys):
                raise errors.ServiceError(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )

        auth = [Depends(require_key)]
    maybe_401 = (401,) if settings.api_keys else ()

    @app.post(
        CLASSIFY_PATH,
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses=errors.responses(400, *maybe_401, 404, 413, 422, 429, 500, 503),
        dependencies=auth,
        summary="Classify inputs with one model",
    )
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        state = request.state
        state.model_name = body.model
        engine.check_serving()
        if len(body.inputs) > settings.max_client_batch_size:
            raise errors.ServiceError(
                413,
                "too_many_inputs",
                f"{len(body.inputs)} inputs; at most {settings.max_client_batch_size} per request",
            )
        entry = registry.get(body.model)
        if entry is None:
            raise errors.not_found(body.model, registry.current.names)
        inputs: list[tuple[str, str | None]] = []
        for i, given in enumerate(body.inputs):
            text, pair = (
                (given.text, given.text_pair) if isinstance(given, PairInput) else (given, None)
            )
            if (pair is not None) != entry.takes_pairs:
                want = "{text, text_pair} objects" if entry.takes_pairs else "single texts"
                raise errors.unprocessable(f"inputs.{i}: model {entry.name!r} takes {want}")
            longest = max(len(text), len(pair or ""))
            if longest > settings.max_input_chars:
                raise errors.ServiceError(
                    413,
                    "input_too_large",
                    f"inputs.{i}: {longest} characters; at most {settings.max_input_chars} "
                    "per text",
                )
            inputs.append((text, pair))
        state.rows = len(inputs)
        engine.admit()
        try:
            outcome = await engine.run(
                entry,
                inputs,
                body.truncate,
                state.request_id,
                lambda: _client_gone(request.receive),
            )
        finally:
            engine.release()
        state.queue_ms = round(outcome.queue_s * 1000, 2)
        state.compute_ms = round(outcome.compute_s * 1000, 2)

        labels = entry.labels
        results, prompt_tokens = [], 0
        before_hist = metrics.prompt_tokens_before.labels(entry.name)
        length_hist = metrics.prompt_length.labels(entry.name)
        for row, res in zip(outcome.rows, outcome.results, strict=True):
            probs = res.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            item: dict[str, Any] = {"label": labels[best], "score": probs[best]}
            if body.return_all_scores:
                item["scores"] = dict(zip(labels, probs, strict=True))
            if body.return_routing:
                routing: dict[str, Any] = {
                    "prompt_length": res.prompt_length,
                    "tokens_before": res.tokens_before,
                    "tokens_after": res.prompt_length - res.tokens_before,
                }
                if res.pool_weights is not None:
                    routing["pool_weights"] = res.pool_weights
                item["routing"] = routing
            item["truncated"] = row.truncated
            results.append(item)
            prompt_tokens += res.prompt_length
            before_hist.observe(res.tokens_before)
            length_hist.observe(res.prompt_length)
            metrics.input_tokens.observe(len(row.input_ids))
        usage = {
            "input_tokens": sum(len(r.input_ids) for r in outcome.rows),
            "prompt_tokens": prompt_tokens,
        }
        return JSONResponse({"model": entry.name, "results": results, "usage": usage})

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=errors.responses(*maybe_401, 500),
        dependencies=auth,
        summary="List the loaded models",
    )
    async def list_models() -> dict[str, Any]:
        models = registry.current.models
        return {"models": [models[name].card() for name in sorted(models)]}

    @app.get(
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
        entry = registry.get(name)
        if entry is None:
            raise errors.not_found(name, registry.current.names)
        return entry.card()

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResult,
        responses=errors.responses(*maybe_401, 409, 500, 503),
        dependencies=auth,
        summary="Rescan the model repository and swap in new and changed checkpoints",
    )
    async def reload() -> dict[str, Any]:
        report = await engine.reload()
        return report.as_dict()

    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Ready,
        responses=errors.responses(503),
        summary="Readiness: 200 once every model is loaded and warm; 503 before and while draining",
    )
    async def ready() -> dict[str, Any]:
        engine.check_serving()
        return {"status": "ready", "models": len(registry.current.models)}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
