"""The per-request histograms (`RequestHistogram`) render exactly as prometheus_client's
`Histogram` would, bucket edges included, so dashboards, alerts and scrapers see no
difference; and `observe_request` fills them as the records say."""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dynprompt.service.metrics import (
    DECISION_BUCKETS,
    LATENCY_BUCKETS,
    UNKNOWN_MODEL,
    RequestHistogram,
    ServiceMetrics,
)
from dynprompt.service.protocol import Record
from tests.server_util import parse_metrics, sample


def rendered(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line  # prometheus_client's creation stamps; not rendered here
    ]


def test_renders_as_prometheus_client_histograms() -> None:
    rng = random.Random(0)
    for buckets in (LATENCY_BUCKETS, DECISION_BUCKETS):
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        mine = RequestHistogram("h", "help", ("model",), buckets, ours, threading.Lock())
        reference = Histogram("h", "help", ["model"], buckets=buckets, registry=theirs)
        # Every bound exactly (a value on an edge belongs to that bucket), around them,
        # past the last one, and negative.
        values = [*buckets, *(b * 1.0001 for b in buckets), -1.0, 1e9]
        values += [rng.uniform(0, 2 * max(buckets)) for _ in range(500)]
        for value in values:
            model = rng.choice(["a", "b"])
            mine.labels(model).observe(value)
            reference.labels(model).observe(value)
        assert rendered(ours) == rendered(theirs)
    # Unlabelled: zeros from the start, as prometheus_client's.
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    RequestHistogram("q", "help", (), LATENCY_BUCKETS, ours, threading.Lock())
    Histogram("q", "help", buckets=LATENCY_BUCKETS, registry=theirs)
    assert rendered(ours) == rendered(theirs)


def test_observe_request_counts_each_record() -> None:
    metrics = ServiceMetrics()
    metrics.observe_request(Record("m", 200, 0.02, 0.004, [(12, 5, 2), (40, 7, 0)]), True)
    metrics.observe_request(Record("gone", 404, 0.001, None, []), False)
    got = parse_metrics(metrics.render().decode())
    assert sample(got, "dynprompt_requests_total", model="m", status="200") == 1
    assert sample(got, "dynprompt_requests_total", model=UNKNOWN_MODEL, status="404") == 1
    assert sample(got, "dynprompt_request_duration_seconds_bucket", model="m", le="0.025") == 1
    assert sample(got, "dynprompt_request_duration_seconds_bucket", model="m", le="0.01") == 0
    assert sample(got, "dynprompt_queue_duration_seconds_count") == 1  # 404: never queued
    assert sample(got, "dynprompt_queue_duration_seconds_sum") == 0.004
    assert sample(got, "dynprompt_input_tokens_count") == 2
    assert sample(got, "dynprompt_input_tokens_bucket", le="16.0") == 1
    assert sample(got, "dynprompt_prompt_length_sum", model="m") == 12
    assert sample(got, "dynprompt_prompt_tokens_before_bucket", model="m", le="0.0") == 1
