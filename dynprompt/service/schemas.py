"""Request and response bodies of the HTTP API (DESIGN §4); they are also the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be empty or only whitespace")
    return value


Text = Annotated[str, Field(min_length=1, strict=True), AfterValidator(_not_blank)]


# What a checkpoint may be called (`dynprompt.models.config.NAME_PATTERN`); names are only
# ever looked up in the loaded set, never used as paths.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ModelName = Annotated[
    str, Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN, strict=True)
]


class PairInput(BaseModel):
    """One input for a model that reads text pairs (e.g. premise and hypothesis)."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text | None = None


# Tags that pick one branch of an input union, so errors come from that branch alone;
# they appear in error locations, and `errors.validation_message` leaves them out.
INPUT_TAGS = ("single", "pair", "batch")


def _input_kind(value: Any) -> str:
    return "pair" if isinstance(value, dict | PairInput) else "single"


def _inputs_kind(value: Any) -> str:
    return "single" if isinstance(value, str) else "batch"


Input = Annotated[
    Annotated[Text, Tag("single")] | Annotated[PairInput, Tag("pair")],
    Discriminator(_input_kind),
]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "sst2", "inputs": ["a gripping, funny film"], "return_routing": True}
            ]
        },
    )
    model: ModelName | None = Field(
        None,
        description="name of a loaded model (see GET /v1/models); may be left out when the "
        "server serves exactly one model",
    )
    version: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="pin one version of the model (a numbered folder in the repository); "
        "by default the newest",
    )
    inputs: Annotated[
        Annotated[Text, Tag("single")] | Annotated[list[Input], Field(min_length=1), Tag("batch")],
        Discriminator(_inputs_kind),
    ] = Field(
        description="texts, or {text, text_pair} objects for pair models; at most the "
        "server's max_client_batch_size. One text may be sent as a plain string: it is "
        "answered as a list of one",
    )
    truncate: bool = Field(
        True, strict=True, description="trim inputs over the model's max_length (false: 422)"
    )
    return_routing: bool = Field(
        False, strict=True, description="include each input's router decisions"
    )
    return_all_scores: bool = Field(
        False, strict=True, description="include the probability of every label"
    )


class Routing(BaseModel):
    prompt_length: int = Field(description="prompt tokens inserted for this input")
    tokens_before: int = Field(description="prompt tokens placed before the text")
    tokens_after: int = Field(description="prompt tokens placed after the text")
    pool_weights: list[float] | None = Field(
        None, description="mixture weights over the prompt pool (pool variants only)"
    )


class Result(BaseModel):
    label: str
    score: float = Field(description="probability of `label`")
    scores: dict[str, float] | None = Field(None, description="every label's probability")
    routing: Routing | None = None
    truncated: bool = Field(description="whether the input was trimmed to max_length")


class Usage(BaseModel):
    input_tokens: int = Field(description="tokens of all inputs, special tokens included")
    prompt_tokens: int = Field(description="prompt tokens the routers inserted, summed")


class ClassifyResponse(BaseModel):
    model: str
    results: list[Result] = Field(description="one per input, in input order")
    usage: Usage


class ModelCard(BaseModel):
    name: str
    labels: list[str]
    variant: str
    prompt_length: int = Field(description="maximum prompt length L")
    pool_size: int
    router_feature: str | None = Field(
        description="what the router reads (backbone or embeddings); null when no "
        "decision is per input"
    )
    backbone: str
    version: str = Field(description="checksum of the checkpoint's weights")
    model_version: int = Field(
        description="the served version: its numbered folder (1 for an unversioned one)"
    )
    versions: list[int] = Field(description="every served version of this model")
    loaded_at: str = Field(description="when this version was loaded (ISO 8601, UTC)")
    metrics: dict[str, float | int] = Field(
        description="dev metrics recorded at training; dev_examples: how many dev examples "
        "they were measured on"
    )
    training_data: str = Field(description="what the model was trained on, with sizes")
    train_examples: int | None = Field(None, description="training examples used")
    dev_examples: int | None = Field(None, description="dev examples behind the metrics")
    max_length: int = Field(description="longest input in tokens, special tokens included")
    pair_input: bool = Field(description="whether inputs are {text, text_pair} pairs")
    backend: str = Field(description="compute backend (torch or onnx)")
    device: str = Field(description="where the model runs (cpu, cuda, cuda:N)")
    dtype: str = Field(description="the backbone's precision")


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: int


class RefusedCheckpoint(BaseModel):
    path: str = Field(description="the checkpoint folder")
    reason: str = Field(description="why it was not loaded")


class ReloadResult(BaseModel):
    loaded: list[str] = Field(description="models loaded or replaced by a new version")
    unchanged: list[str] = Field(description="models whose weights did not change")
    removed: list[str] = Field(description="models no longer in the repository")
    refused: list[RefusedCheckpoint] = Field(
        description="checkpoints that failed to load; the version served before stays"
    )
    waiting: list[str] = Field(
        default_factory=list, description="checkpoints still being written: left for later"
    )
    kept: bool = Field(
        False,
        description="the rescan found nothing to serve, so the models served before stay",
    )
