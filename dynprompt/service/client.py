"""A typed Python client for the dynprompt HTTP API (DESIGN §4), sync and async, over httpx.

    from dynprompt.service.client import Client, DynPromptError

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        answer = client.classify(["a gripping, funny film"], "sst2", return_routing=True)
        print(answer.results[0].label, answer.request_id)
        pairs = client.classify([("A man sleeps.", "A person rests.")], "rte")
        cards = client.models()

    async with AsyncClient("http://127.0.0.1:8000") as client:   # the same methods, awaited
        answer = await client.classify(["dull"], "sst2")

Results are the server's own pydantic models (`dynprompt.service.schemas`); `classify` returns
a `Classification`, which is a `ClassifyResponse` plus `request_id`, the id the server echoed in
`x-request-id` (quote it when reporting a problem). Every error answer raises `DynPromptError`
with the server's `{"error": {"type", "message"}}`, the status and the request id.

Busy servers answer 429 (queue full) or 503 (loading, draining, queue timeout), both with
`Retry-After`; those, and failures to connect, are retried with capped exponential back-off with
jitter, never sooner than `Retry-After`, at most `max_retries` times and never past `deadline_s`
for the whole call. Other 4xx answers are never retried: sending the same request again cannot
change them. One logical call keeps one request id across its retries, so the server's logs tie
the attempts together. Network failures that outlast the retries raise httpx's own exception.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import anyio
import httpx

from dynprompt.service.schemas import ClassifyResponse, Health, ModelCard, ModelList, ReloadResult

__all__ = [
    "AsyncClient",
    "Classification",
    "Client",
    "DynPromptError",
    "Input",
    "RetryEvent",
]

DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_ID_HEADER = "x-request-id"
RETRY_STATUSES = frozenset({429, 503})
# Failures where the request most likely never reached the server, or the connection dropped
# before an answer; classify has no side effects, so sending it again is safe. Read timeouts
# are not here: the server is slow, not gone, and a retry would only add to its load.
RETRY_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)

Input = str | tuple[str, str] | Mapping[str, str]


class DynPromptError(Exception):
    """An error answer of the server: its status and `{"error": {"type", "message"}}` body."""

    def __init__(self, status: int, type: str, message: str, request_id: str | None) -> None:
        super().__init__(f"{status} {type}: {message} (request id {request_id})")
        self.status = status
        self.type = type
        self.message = message
        self.request_id = request_id


class Classification(ClassifyResponse):
    """The server's `ClassifyResponse` plus the request id it echoed."""

    request_id: str


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen, as given to `on_retry` (for logs, metrics or tests)."""

    attempt: int  # 1 for the first retry
    delay_s: float  # how long the client waits before sending again
    request_id: str
    status: int | None  # 429 or 503; None after a network failure
    retry_after_s: float | None  # the server's Retry-After, when it sent one
    error: Exception | None  # the network failure, when there was one


def new_request_id() -> str:
    return uuid.uuid4().hex


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from(response: httpx.Response, request_id: str) -> DynPromptError:
    """The server's error body, or (from something in between, e.g. a proxy) the status text."""
    echoed = response.headers.get(REQUEST_ID_HEADER, request_id)
    try:
        error = response.json()["error"]
        return DynPromptError(
            response.status_code, str(error["type"]), str(error["message"]), echoed
        )
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return DynPromptError(response.status_code, "http_error", text, echoed)


def classify_body(
    inputs: Sequence[Input],
    model: str | None,
    truncate: bool,
    return_routing: bool,
    return_all_scores: bool,
) -> dict[str, Any]:
    if isinstance(inputs, str | Mapping):
        raise TypeError("inputs must be a list of texts, (text, text_pair) tuples or dicts")
    items: list[str | dict[str, str]] = []
    for item in inputs:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, tuple):
            text, text_pair = item
            items.append({"text": text, "text_pair": text_pair})
        else:
            items.append(dict(item))
    body: dict[str, Any] = {
        "inputs": items,
        "truncate": truncate,
        "return_routing": return_routing,
        "return_all_scores": return_all_scores,
    }
    if model is not None:
        body["model"] = model
    return body


class _Attempts:
    """The retry schedule of one logical call: whether and how long to wait before the next try."""

    def __init__(self, owner: _BaseClient, request_id: str) -> None:
        self.owner = owner
        self.request_id = request_id
        self.started = time.monotonic()
        self.retries = 0

    def timeout(self) -> float | None:
        """This attempt's timeout: the client's, cut to what is left of the deadline."""
        owner = self.owner
        if owner.deadline_s is None:
            return owner.timeout
        left = max(0.001, owner.deadline_s - (time.monotonic() - self.started))
        return left if owner.timeout is None else min(owner.timeout, left)

    def next_delay(
        self,
        status: int | None = None,
        retry_after_s: float | None = None,
        error: Exception | None = None,
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up (and raise)."""
        owner = self.owner
        if self.retries >= owner.max_retries:
            return None
        # Equal jitter: half the exponential step fixed, half random, so that clients turned
        # away together do not all come back together.
        step = min(owner.max_backoff_s, owner.backoff_s * 2**self.retries)
        delay = step / 2 + random.uniform(0, step / 2)
        if retry_after_s is not None:
            delay += retry_after_s
        elapsed = time.monotonic() - self.started
        if owner.deadline_s is not None and elapsed + delay >= owner.deadline_s:
            return None
        self.retries += 1
        if owner.on_retry is not None:
            owner.on_retry(
                RetryEvent(self.retries, delay, self.request_id, status, retry_after_s, error)
            )
        return delay


class _BaseClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        deadline_s: float | None,
        backoff_s: float,
        max_backoff_s: float,
        on_retry: Callable[[RetryEvent], None] | None,
    ) -> None:
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("max_retries, backoff_s and max_backoff_s must not be negative")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_retry = on_retry
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def _parse_models(self, response: httpx.Response) -> list[ModelCard]:
        return ModelList.model_validate_json(response.content).models

    def _parse_classify(self, response: httpx.Response, request_id: str) -> Classification:
        data = response.json()
        data["request_id"] = response.headers.get(REQUEST_ID_HEADER, request_id)
        return Classification.model_validate(data)


class Client(_BaseClient):
    """Blocking client; one connection pool for all calls. Safe to share between threads."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        max_retries: int = 3,
        deadline_s: float | None = 60.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout, max_retries, deadline_s, backoff_s, max_backoff_s, on_retry
        )
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry: bool = True,
        ok: frozenset[int] = frozenset(),
    ) -> tuple[httpx.Response, str]:
        rid = request_id or new_request_id()
        attempts = _Attempts(self, rid)
        while True:
            try:
                response = self._http.request(
                    method,
                    path,
                    json=json,
                    headers={REQUEST_ID_HEADER: rid},
                    timeout=attempts.timeout(),
                )
            except RETRY_ERRORS as exc:
                delay = attempts.next_delay(error=exc) if retry else None
                if delay is None:
                    raise
                time.sleep(delay)
                continue
            if response.is_success or response.status_code in ok:
                return response, rid
            if retry and response.status_code in RETRY_STATUSES:
                delay = attempts.next_delay(response.status_code, retry_after_seconds(response))
                if delay is not None:
                    time.sleep(delay)
                    continue
            raise error_from(response, rid)

    def classify(
        self,
        inputs: Sequence[Input],
        model: str | None = None,
        *,
        truncate: bool = True,
        return_routing: bool = False,
        return_all_scores: bool = False,
        request_id: str | None = None,
    ) -> Classification:
        """Classify `inputs` with `model` (None: leave it to the server, for one-model servers)."""
        body = classify_body(inputs, model, truncate, return_routing, return_all_scores)
        response, rid = self._request("POST", "/v1/classify", json=body, request_id=request_id)
        return self._parse_classify(response, rid)

    def models(self) -> list[ModelCard]:
        return self._parse_models(self._request("GET", "/v1/models")[0])

    def model(self, name: str) -> ModelCard:
        response, _ = self._request("GET", f"/v1/models/{quote(name, safe='')}")
        return ModelCard.model_validate_json(response.content)

    def health(self) -> Health:
        return Health.model_validate_json(self._request("GET", "/health")[0].content)

    def ready(self) -> bool:
        """Whether the server takes requests now (a 503 is an answer here, not retried)."""
        response, _ = self._request("GET", "/ready", retry=False, ok=frozenset({503}))
        return response.status_code == 200

    def reload(self) -> ReloadResult:
        response, _ = self._request("POST", "/v1/admin/reload")
        return ReloadResult.model_validate_json(response.content)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """The same as `Client` for asyncio (or trio); one connection pool for all calls."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        max_retries: int = 3,
        deadline_s: float | None = 60.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout, max_retries, deadline_s, backoff_s, max_backoff_s, on_retry
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry: bool = True,
        ok: frozenset[int] = frozenset(),
    ) -> tuple[httpx.Response, str]:
        rid = request_id or new_request_id()
        attempts = _Attempts(self, rid)
        while True:
            try:
                response = await self._http.request(
                    method,
                    path,
                    json=json,
                    headers={REQUEST_ID_HEADER: rid},
                    timeout=attempts.timeout(),
                )
            except RETRY_ERRORS as exc:
                delay = attempts.next_delay(error=exc) if retry else None
                if delay is None:
                    raise
                await anyio.sleep(delay)
                continue
            if response.is_success or response.status_code in ok:
                return response, rid
            if retry and response.status_code in RETRY_STATUSES:
                delay = attempts.next_delay(response.status_code, retry_after_seconds(response))
                if delay is not None:
                    await anyio.sleep(delay)
                    continue
            raise error_from(response, rid)

    async def classify(
        self,
        inputs: Sequence[Input],
        model: str | None = None,
        *,
        truncate: bool = True,
        return_routing: bool = False,
        return_all_scores: bool = False,
        request_id: str | None = None,
    ) -> Classification:
        """Classify `inputs` with `model` (None: leave it to the server, for one-model servers)."""
        body = classify_body(inputs, model, truncate, return_routing, return_all_scores)
        response, rid = await self._request(
            "POST", "/v1/classify", json=body, request_id=request_id
        )
        return self._parse_classify(response, rid)

    async def models(self) -> list[ModelCard]:
        return self._parse_models((await self._request("GET", "/v1/models"))[0])

    async def model(self, name: str) -> ModelCard:
        response, _ = await self._request("GET", f"/v1/models/{quote(name, safe='')}")
        return ModelCard.model_validate_json(response.content)

    async def health(self) -> Health:
        return Health.model_validate_json((await self._request("GET", "/health"))[0].content)

    async def ready(self) -> bool:
        """Whether the server takes requests now (a 503 is an answer here, not retried)."""
        response, _ = await self._request("GET", "/ready", retry=False, ok=frozenset({503}))
        return response.status_code == 200

    async def reload(self) -> ReloadResult:
        response, _ = await self._request("POST", "/v1/admin/reload")
        return ReloadResult.model_validate_json(response.content)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
