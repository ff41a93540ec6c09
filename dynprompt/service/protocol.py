"""What crosses between the HTTP front end and the engine core, in or across processes.

A front end hands the core `Submission`s and receives `Answer`s; both are plain
tuples of builtins on the wire (pickled over a local socket when the core runs in
its own process), so this module is the whole contract between the two sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Error kinds an answer may carry: (HTTP status, error type). The front end turns them
# into `errors.ServiceError`s; the core never imports the HTTP layer.
NOT_FOUND = "model_not_found"
INVALID = "invalid_request"
TOO_LONG = "input_too_long"
TOO_LARGE = "input_too_large"
QUEUE_TIMEOUT = "queue_timeout"
NOT_READY = "not_ready"
OUT_OF_MEMORY = "out_of_memory"
INTERNAL = "internal_error"
STATUS = {
    NOT_FOUND: 404,
    INVALID: 422,
    TOO_LONG: 422,
    TOO_LARGE: 413,
    QUEUE_TIMEOUT: 503,
    NOT_READY: 503,
    OUT_OF_MEMORY: 503,
    INTERNAL: 500,
}


class Submission(NamedTuple):
    """One classify request, as the core receives it."""

    ticket: int  # unique within its front end; answers and cancels name it
    request_id: str  # for logs only (clients choose it, so it need not be unique)
    model: str | None  # None: the only served model (refused when several are served)
    inputs: list[tuple[str, str | None]]
    truncate: bool
    admitted: float  # time.monotonic() at admission (one clock for every process)
    deadline: float  # monotonic time after which a request not yet computing gets 503
    version: int | None = None  # a pinned model version; None: the newest
    # "right" or "left"; None: the model's own. A side other than the model's is refused.
    truncation_side: str | None = None
    # The inputs already tokenised by the front end (`--workers N`): per input, (input ids,
    # token types, truncated), made under `tokens_key` (`RowTokenizer.key`). The core uses
    # them only if its model makes rows under the same key, and tokenises `inputs` if not.
    tokens: list[tuple[list[int], list[int], bool]] | None = None
    tokens_key: str | None = None


class RowAnswer(NamedTuple):
    probs: list[float]
    prompt_length: int
    tokens_before: int
    pool_weights: list[float] | None
    truncated: bool
    input_tokens: int


class Answer(NamedTuple):
    """The core's reply to one submission: rows, or an error kind and message."""

    ticket: int
    model: str | None  # the served model's name (None when the name matched nothing)
    labels: list[str]
    rows: list[RowAnswer]
    error: str | None = None  # one of the kinds above
    message: str = ""
    queue_s: float | None = None  # admission to the first row's batch; None if never run
    compute_s: float = 0.0


@dataclass(slots=True)
class Observation:
    """One classify request as the metrics see it, filled in while it is served."""

    request_id: str
    started: float  # time.perf_counter() when the request arrived
    model: str | None = None  # a served model's name, else None (counted as `_unknown`)
    status: int = 500
    rows: int = 0
    queue_s: float | None = None
    compute_s: float = 0.0
    answers: list[RowAnswer] = field(default_factory=list)


class Record(NamedTuple):
    """What `ServiceMetrics.observe_request` needs of a finished request."""

    model: str | None
    status: int
    seconds: float
    queue_s: float | None
    decisions: list[tuple[int, int, int]]  # per row: (input tokens, prompt length, before)


class CoreError(Exception):
    """An expected refusal of a control call (reload while loading, an unreadable folder)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
