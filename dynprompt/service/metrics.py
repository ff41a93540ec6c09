"""Prometheus metrics of DESIGN §4, in a registry of their own, owned by the engine core.

A dedicated `CollectorRegistry` (never the global one) lets tests build several
cores in one process. The core owns it whatever the number of HTTP processes, so
each request is counted once: front ends send it a `Record` per finished request
(`observe_request`), workers report each batch (`observe_batch`). Labels stay
bounded: model names of served models (anything else is `_unknown`), backbone
names, HTTP status codes. Beside them the registry carries the standard `process_*`
series of the process the core runs in.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from dynprompt.service.protocol import Record

UNKNOWN_MODEL = "_unknown"

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
INPUT_TOKEN_BUCKETS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Router decisions are small integers: one bucket per value up to 32, then coarser.
DECISION_BUCKETS = tuple(float(i) for i in range(33)) + (40, 48, 64, 96, 128, 192, 256, 384, 512)


class _Counts:
    """One label set of a `RequestHistogram`: a count per bucket, and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class RequestHistogram:
    """A histogram observed once or more per request, as prometheus_client's `Histogram`
    renders it (less its `_created` series).

    prometheus_client finds the bucket by a Python loop over the bounds and takes a lock
    for the sum and another for the bucket. A request's record makes five observations,
    on the engine core's thread, whose interpreter time bounds how many requests a device
    can be fed: `observe_request` cost 8-15 µs that way, and a third of it with these
    (a bisect, and one lock per request: the caller's, `ServiceMetrics._request_lock`,
    which a scrape takes too).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
        lock: threading.Lock,
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        self._les = [floatToGoString(b) for b in self.bounds]
        self._children: dict[tuple[str, ...], _Counts] = {}
        self._lock = lock
        if not labelnames:
            self.labels()  # unlabelled: its zeros are exported from the start
        registry.register(self)

    def labels(self, *values: str) -> _Counts:
        child = self._children.get(values)
        if child is None:
            with self._lock:  # a scrape may be iterating the label sets
                child = self._children.setdefault(values, _Counts(self.bounds))
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, list(c.counts), c.sum) for k, c in self._children.items()]
        for values, counts, total in snapshot:
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family


@dataclass
class _ModelChildren:
    duration: _Counts
    length: _Counts
    before: _Counts
    requests: dict[int, Any] = field(default_factory=dict)  # status -> counter child


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "dynprompt_"
        self.requests = Counter(
            p + "requests", "Classify requests answered, by model and HTTP status.",
            ["model", "status"], registry=r,
        )  # fmt: skip
        # Per request (`observe_request`), under one lock; the rest is per batch or rarer.
        self._request_lock = threading.Lock()
        lock = self._request_lock
        self.request_duration = RequestHistogram(
            p + "request_duration_seconds", "End-to-end classify request time.",
            ("model",), LATENCY_BUCKETS, r, lock,
        )  # fmt: skip
        self.queue_duration = RequestHistogram(
            p + "queue_duration_seconds", "Admission to the first row's batch starting, per request.",
            (), LATENCY_BUCKETS, r, lock,
        )  # fmt: skip
        self.inference_duration = Histogram(
            p + "inference_duration_seconds", "Compute time of one batch (collate, routers, forwards).",
            ["backbone"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            p + "batch_size", "Rows per batch.", buckets=ROW_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            p + "batch_tokens", "Padded tokens per batch (rows x assembled width, prompts included).",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_padding_ratio = Histogram(
            p + "batch_padding_ratio", "Share of a batch's padded tokens that are padding.",
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_models = Histogram(
            p + "batch_models", "Distinct models whose rows share one batch.",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            p + "queue_depth", "Classify requests admitted and not yet answered.", registry=r
        )
        self.compute_cpu = Counter(
            p + "compute_cpu_seconds", "CPU time of the threads running batches (launching "
            "kernels on a GPU; all of the work on a CPU).",
            ["backbone"], registry=r,
        )  # fmt: skip
        self.tokenized_rows = Counter(
            p + "tokenized_rows", "Input rows tokenised, by where: `http` (in the HTTP "
            "processes of --workers N) or `engine` (in the engine core).",
            ["where"], registry=r,
        )  # fmt: skip
        self._tokenized = {where: self.tokenized_rows.labels(where) for where in ("http", "engine")}
        self.input_tokens = RequestHistogram(
            p + "input_tokens", "Tokens per input row (specials included, prompt excluded).",
            (), INPUT_TOKEN_BUCKETS, r, lock,
        )  # fmt: skip
        self.prompt_tokens_before = RequestHistogram(
            p + "prompt_tokens_before", "Router decision: prompt tokens placed before the text.",
            ("model",), DECISION_BUCKETS, r, lock,
        )  # fmt: skip
        self.prompt_length = RequestHistogram(
            p + "prompt_length", "Router decision: prompt length per input.",
            ("model",), DECISION_BUCKETS, r, lock,
        )  # fmt: skip
        self.model_info = Gauge(
            p + "model_info",
            "Loaded models (value 1).",
            ["model", "variant", "backbone"],
            registry=r,
        )
        self.build_info = Gauge(
            p + "build_info",
            "The server's version and how it computes (value 1).",
            ["version", "backend", "device", "dtype"],
            registry=r,
        )
        # The standard `process_*` series (CPU seconds, resident memory, open files) of the
        # process the core runs in: with `--workers N` that is the engine-core process
        # alone, whose CPU per request bounds how many requests it can feed a GPU.
        ProcessCollector(registry=r)
        self._gpu_memory: Gauge | None = None
        self._children: dict[str, _ModelChildren] = {}
        self._queue, self._input_tokens = self.queue_duration.labels(), self.input_tokens.labels()

    def set_models(self, infos: list[tuple[str, str, str]]) -> None:
        """Replace the model_info series with exactly these (model, variant, backbone)."""
        self.model_info.clear()
        for model, variant, backbone in infos:
            self.model_info.labels(model, variant, backbone).set(1)

    def set_build_info(self, version: str, backend: str, device: str, dtype: str) -> None:
        self.build_info.labels(version, backend, device, dtype).set(1)

    def track_gpu_memory(self, read: Callable[[], float]) -> None:
        if self._gpu_memory is None:
            self._gpu_memory = Gauge(
                "dynprompt_gpu_memory_bytes", "GPU memory allocated by torch on the serving device.",
                registry=self.registry,
            )  # fmt: skip
            self._gpu_memory.set_function(read)

    def observe_batch(
        self,
        backbone: str,
        seconds: float,
        cpu_seconds: float,
        rows: int,
        padded: int,
        real: int,
        models: int,
    ) -> None:
        self.inference_duration.labels(backbone).observe(seconds)
        self.compute_cpu.labels(backbone).inc(cpu_seconds)
        self.batch_size.observe(rows)
        self.batch_tokens.observe(padded)
        self.batch_padding_ratio.observe(1.0 - real / padded if padded else 0.0)
        self.batch_models.observe(models)

    def observe_tokenized(self, http: int, engine: int) -> None:
        """Rows a worker took in: tokenised by the front ends, and by itself."""
        if http:
            self._tokenized["http"].inc(http)
        if engine:
            self._tokenized["engine"].inc(engine)

    def observe_request(self, record: Record, served: bool) -> None:
        """One finished classify request; `served`: its model is in the served set."""
        model = record.model if served and record.model is not None else UNKNOWN_MODEL
        children = self._children.get(model)
        if children is None:  # `labels()` costs a lock and a tuple: look each child up once
            children = self._children[model] = _ModelChildren(
                self.request_duration.labels(model),
                self.prompt_length.labels(model),
                self.prompt_tokens_before.labels(model),
            )
        counter = children.requests.get(record.status)
        if counter is None:
            counter = children.requests[record.status] = self.requests.labels(
                model, str(record.status)
            )
        counter.inc()
        with self._request_lock:
            children.duration.observe(record.seconds)
            if record.queue_s is not None:
                self._queue.observe(record.queue_s)
            for tokens, m, b in record.decisions:
                self._input_tokens.observe(tokens)
                children.length.observe(m)
                children.before.observe(b)

    def render(self) -> bytes:
        return generate_latest(self.registry)
