"""The checkpoint's `dynprompt.json`, validated once at the edge.

One pydantic object describes a dynamic-prompt classifier completely: the same
object is built when training starts, written next to the weights, and read back
(with every field checked) when a checkpoint is loaded.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = 1

Variant = Literal[
    "prefix",
    "task_position",
    "instance_position",
    "instance_length",
    "instance_prompt",
    "dynamic",
    "linear_probe",
    "finetune",
]
Family = Literal["encoder", "encoder_decoder", "decoder"]
PositionMode = Literal["none", "prefix", "task", "instance"]
LengthMode = Literal["fixed", "instance"]
PoolMode = Literal["single", "instance"]
Feature = Literal["backbone", "embeddings"]

PROMPT_VARIANTS: tuple[str, ...] = (
    "prefix",
    "task_position",
    "instance_position",
    "instance_length",
    "instance_prompt",
    "dynamic",
)
BASELINES: tuple[str, ...] = ("linear_probe", "finetune")
VARIANTS: tuple[str, ...] = PROMPT_VARIANTS + BASELINES

# variant -> (position, length, pool): DESIGN §2's table, the one place it is spelled out.
VARIANT_DECISIONS: dict[str, tuple[PositionMode, LengthMode, PoolMode]] = {
    "prefix": ("prefix", "fixed", "single"),
    "task_position": ("task", "fixed", "single"),
    "instance_position": ("instance", "fixed", "single"),
    "instance_length": ("prefix", "instance", "single"),
    "instance_prompt": ("prefix", "fixed", "instance"),
    "dynamic": ("instance", "instance", "instance"),
    "linear_probe": ("none", "fixed", "single"),
    "finetune": ("none", "fixed", "single"),
}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(_Strict):
    family: Family
    name_or_path: str = Field(min_length=1)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class PromptSpec(_Strict):
    length: int = Field(ge=0, le=512)
    pool_size: int = Field(default=1, ge=1, le=1024)
    init: Literal["vocab", "uniform"] = "vocab"


class RouterSpec(_Strict):
    feature: Feature = "backbone"
    position: PositionMode = "prefix"
    length: LengthMode = "fixed"
    pool: PoolMode = "single"


class HeadSpec(_Strict):
    type: Literal["linear", "verbalizer"] = "linear"
    labels: list[str] = Field(min_length=2)
    label_words: list[str] | None = None
    pooling: Literal["mean", "first"] = "mean"
    # How a verbalizer scores a label word of several tokens: "first", the logit of its
    # first token at the scored position (what checkpoints without this field use);
    # "mean", the mean log-probability of all its tokens given the input (decoder-only).
    word_score: Literal["first", "mean"] = "first"

    @model_validator(mode="after")
    def _check(self) -> HeadSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        if any(not label for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        if self.type == "verbalizer" and (
            self.label_words is None or len(self.label_words) != len(self.labels)
        ):
            raise ValueError("a verbalizer head needs one label word per label")
        if self.word_score == "mean" and self.type != "verbalizer":
            raise ValueError("word_score 'mean' scores label words: it needs a verbalizer head")
        return self


class InputSpec(_Strict):
    """How inputs are tokenised, and how the training data held them, so that a file
    laid out like it can be read back (`eval --file`, `predict`) with no flags.

    `text_field`, `pair_field` and `label_field` are the real column names (or JSON
    keys) of the training files; `preset` names the preset whose layout they followed
    (a preset may build its text from several fields). Checkpoints written before
    these were stored carry `text`/`text_pair` here and no layout; they load as they are.
    """

    text_field: str = "text"
    pair_field: str | None = None
    label_field: str | None = None
    format: Literal["tsv", "csv", "jsonl"] | None = None
    has_header: bool = True
    preset: str | None = None
    max_length: int = Field(default=128, ge=4, le=8192)
    truncation_side: Literal["right", "left"] = "right"


class TrainingInfo(BaseModel):
    """Provenance only: read by people and shown in model cards, never trusted by code.

    `data` describes what the model was trained and judged on, with sizes; `data_hash`
    is a sha256 of exactly those examples; `metrics` carries `dev_examples`, the
    number of dev examples behind every figure in it."""

    model_config = ConfigDict(extra="allow", frozen=True)
    data: str | list[str] = ""
    data_hash: str | None = None
    train_examples: int | None = None
    dev_examples: int | None = None
    steps: int = Field(default=0, ge=0)
    seed: int = 0
    temperature: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float | int] = Field(default_factory=dict)
    date: str = ""


class DynPromptConfig(_Strict):
    format_version: Literal[1] = 1
    name: str
    variant: Variant
    backbone: BackboneSpec
    prompt: PromptSpec
    router: RouterSpec
    head: HeadSpec
    input: InputSpec = InputSpec()
    training: TrainingInfo = TrainingInfo()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"name {value!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
                "and start with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DynPromptConfig:
        position, length, pool = VARIANT_DECISIONS[self.variant]
        got = (self.router.position, self.router.length, self.router.pool)
        if got != (position, length, pool):
            raise ValueError(
                f"router {got} does not match variant {self.variant!r}, "
                f"which needs (position, length, pool) = {(position, length, pool)}"
            )
        if self.variant in BASELINES:
            if self.prompt.length != 0:
                raise ValueError(f"variant {self.variant!r} has no prompt: prompt.length must be 0")
        elif self.prompt.length < 1:
            raise ValueError(f"variant {self.variant!r} needs prompt.length >= 1")
        if pool == "instance" and self.prompt.pool_size < 2:
            raise ValueError(f"variant {self.variant!r} needs prompt.pool_size >= 2")
        if pool == "single" and self.prompt.pool_size != 1:
            raise ValueError(f"variant {self.variant!r} uses one prompt: pool_size must be 1")
        if self.head.type == "verbalizer" and self.backbone.family == "encoder":
            raise ValueError("a verbalizer head needs a T5 or decoder-only backbone")
        if self.head.word_score == "mean" and self.backbone.family != "decoder":
            raise ValueError("head.word_score 'mean' needs a decoder-only backbone")
        return self

    @property
    def uses_router_features(self) -> bool:
        return (
            self.router.position == "instance"
            or self.router.length == "instance"
            or self.router.pool == "instance"
        )


def make_config(
    *,
    name: str,
    variant: str,
    backbone: BackboneSpec,
    labels: list[str],
    prompt_length: int = 20,
    pool_size: int | None = None,
    feature: str = "backbone",
    init: str = "vocab",
    head_type: str | None = None,
    label_words: list[str] | None = None,
    pooling: str = "mean",
    word_score: str = "first",
    max_length: int = 128,
    text_field: str = "text",
    pair_field: str | None = None,
    truncation_side: str = "right",
) -> DynPromptConfig:
    """Build a validated config from the few choices a user makes; the rest follows the variant."""
    if variant not in VARIANT_DECISIONS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    position, length, pool = VARIANT_DECISIONS[variant]
    if variant in BASELINES:
        prompt_length = 0
    if pool_size is None:
        pool_size = 4 if pool == "instance" else 1
    if pool == "single":
        pool_size = 1
    if head_type is None:
        head_type = (
            "linear" if backbone.family == "encoder" or variant in BASELINES else "verbalizer"
        )
    if head_type == "verbalizer" and label_words is None:
        label_words = list(labels)
    return DynPromptConfig.model_validate(
        {
            "name": name,
            "variant": variant,
            "backbone": backbone.model_dump(),
            "prompt": {"length": prompt_length, "pool_size": pool_size, "init": init},
            "router": {"feature": feature, "position": position, "length": length, "pool": pool},
            "head": {
                "type": head_type,
                "labels": labels,
                "label_words": label_words if head_type == "verbalizer" else None,
                "pooling": pooling,
                "word_score": word_score if head_type == "verbalizer" else "first",
            },
            "input": {
                "text_field": text_field,
                "pair_field": pair_field,
                "max_length": max_length,
                "truncation_side": truncation_side,
            },
        }
    )
