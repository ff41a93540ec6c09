"""`TrainConfig`: everything `dynprompt train` needs, validated once at the edge.

A run is described by one pydantic object, built from defaults, then a YAML or
TOML file, then `DYNPROMPT_TRAIN_*` environment variables, then the command line
(see `dynprompt.training.settings`). Inside the trainer only this validated
object travels.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The variant names and the name pattern of `dynprompt.models.config`, spelled out here
# because importing that module imports the `dynprompt.models` package and with it torch
# (seconds), which `dynprompt train --help` must not wait for. A test checks that the two
# copies agree.
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
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Regime = Literal["full", "fewshot", "fewshot32"]
DataFormat = Literal["tsv", "csv", "jsonl"]


class TaskData(_Strict):
    """Where one task's labelled data comes from: a preset, or train/dev files with a
    column mapping. In multitask runs each entry of `tasks` is one of these."""

    name: str | None = Field(
        default=None,
        description="task (and checkpoint) name; defaults to the preset name, or the run's `name`",
    )
    preset: str | None = Field(
        default=None,
        description="a preset over the shared data folder: sst2, sst5, trec, rte, cb, boolq, wic, wsc",
    )
    train_file: str | None = Field(default=None, description="training file (.tsv, .csv or .jsonl)")
    dev_file: str | None = Field(
        default=None,
        description="dev file; without one, `dev_fraction` of the training file is held out (seeded)",
    )
    format: DataFormat | None = Field(
        default=None, description="file format (tsv, csv, jsonl); default: from the file suffix"
    )
    has_header: bool = Field(
        default=True,
        description="TSV/CSV files have a header row (--no-header: none; columns are then "
        "named 0, 1, ...)",
    )
    text_field: str = Field(default="text", description="column or JSON key holding the text")
    pair_field: str | None = Field(
        default=None, description="column holding the second text of a pair (premise/hypothesis)"
    )
    label_field: str = Field(default="label", description="column or JSON key holding the label")
    labels: list[str] | None = Field(
        default=None,
        description="label names in head order (comma-separated); file values may be names or "
        "indices; default: inferred from the training file",
    )
    dev_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="held-out share of the training file when no dev file",
    )
    regime: Regime = Field(
        default="full",
        description="full: all training data; fewshot: `shots` examples per class (seeded); "
        "fewshot32: the FewGLUE 32-example SuperGLUE split (model selection on dev32)",
    )
    shots: int | None = Field(
        default=None, ge=1, description="examples per class for regime=fewshot"
    )
    data_dir: str | None = Field(
        default=None,
        description="shared data folder for presets (default: $DYNPROMPT_DATA_DIR, else "
        "../shared/data next to the repository)",
    )
    split_seed: int = Field(
        default=0,
        description="seed of the train/dev split for tasks that ship one file (BoolQ, WiC)",
    )
    max_train_examples: int | None = Field(
        default=None, ge=2, description="train on a seeded subset of at most this many examples"
    )
    max_length: int | None = Field(
        default=None, ge=4, description="this task's max_length (default: the run's max_length)"
    )

    @model_validator(mode="after")
    def _source(self) -> TaskData:
        if self.preset is None and self.train_file is None:
            raise ValueError(
                "give a data source: `preset`, or `train_file` (with a column mapping)"
            )
        if self.preset is not None and (self.train_file is not None or self.dev_file is not None):
            raise ValueError("give either `preset` or `train_file`/`dev_file`, not both")
        if self.preset is not None and self.labels is not None:
            raise ValueError("`labels` maps file columns; a preset has its own labels")
        if self.regime == "fewshot" and self.shots is None:
            raise ValueError("regime 'fewshot' needs `shots` (examples per class)")
        if self.regime == "fewshot32" and self.preset is None:
            raise ValueError(
                "regime 'fewshot32' needs a SuperGLUE `preset` (boolq, cb, rte, wic, wsc)"
            )
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"task name {self.name!r} must be letters, digits, '.', '_', '-'")
        return self


def _task_field(name: str) -> Any:
    """The same field (type, default, description) on `TrainConfig` as on `TaskData`."""
    return copy.copy(TaskData.model_fields[name])


# Fields of `TaskData` that may also be given at the top level of a single-task config.
TASK_FIELDS: tuple[str, ...] = tuple(n for n in TaskData.model_fields if n != "name")


class TrainConfig(_Strict):
    """One training run. Single-task runs give the data fields at the top level;
    multitask runs list them under `tasks` (shared prompt bank and routers, one head
    and one servable checkpoint per task)."""

    # -- what to train ----------------------------------------------------------------
    name: str = Field(default="model", description="checkpoint name (single-task runs)")
    variant: Variant = Field(
        default="instance_position",
        description="prefix, task_position, instance_position, instance_length, "
        "instance_prompt, dynamic, or the baselines linear_probe and finetune",
    )
    backbone: str = Field(
        default="minilm", description="backbone: 'minilm' or a local model folder"
    )
    prompt_length: int = Field(default=20, ge=1, le=512, description="maximum prompt length L")
    pool_size: int | None = Field(
        default=None, ge=2, description="prompt pool size K for instance_prompt/dynamic (default 4)"
    )
    feature: Literal["backbone", "embeddings"] = Field(
        default="backbone",
        description="router features: 'backbone' (mean of frozen last hidden states; one extra "
        "pass) or 'embeddings' (mean of input embeddings; free)",
    )
    prompt_init: Literal["vocab", "uniform"] = Field(
        default="vocab", description="prompt initialisation: sampled vocabulary rows, or uniform"
    )
    pooling: Literal["mean", "first"] = Field(
        default="mean", description="linear head pooling over the assembled sequence"
    )
    head: Literal["linear", "verbalizer"] | None = Field(
        default=None, description="head type (default: linear for encoders, verbalizer otherwise)"
    )
    label_words: list[str] | None = Field(
        default=None, description="verbalizer label words, one per label (default: the label names)"
    )
    word_score: Literal["first", "mean"] = Field(
        default="first",
        description="how the verbalizer scores a label word of several tokens: 'first' (the "
        "logit of its first token) or 'mean' (mean log-probability of all its tokens; "
        "decoder-only backbones)",
    )
    max_length: int = Field(
        default=128, ge=4, description="max tokens of the input (specials included)"
    )
    truncation_side: Literal["right", "left"] = Field(
        default="right", description="which end of a too-long text is cut"
    )

    # -- data (single task) -----------------------------------------------------------
    preset: str | None = _task_field("preset")
    train_file: str | None = _task_field("train_file")
    dev_file: str | None = _task_field("dev_file")
    format: DataFormat | None = _task_field("format")
    has_header: bool = _task_field("has_header")
    text_field: str = _task_field("text_field")
    pair_field: str | None = _task_field("pair_field")
    label_field: str = _task_field("label_field")
    labels: list[str] | None = _task_field("labels")
    dev_fraction: float = _task_field("dev_fraction")
    regime: Regime = _task_field("regime")
    shots: int | None = _task_field("shots")
    data_dir: str | None = _task_field("data_dir")
    split_seed: int = _task_field("split_seed")
    max_train_examples: int | None = _task_field("max_train_examples")
    tasks: list[TaskData] | None = Field(
        default=None,
        description="multitask: a list of task data entries (JSON or YAML); on the command "
        "line, `--preset` repeated gives one task per preset",
    )

    # -- optimisation -----------------------------------------------------------------
    optimizer: Literal["adamw", "adafactor"] = Field(default="adamw", description="optimizer")
    lr_prompt: float = Field(default=3e-2, gt=0, description="learning rate of the prompt bank")
    lr_router: float = Field(default=1e-3, gt=0, description="learning rate of the routers")
    lr_head: float = Field(default=3e-3, gt=0, description="learning rate of the head(s)")
    lr_backbone: float = Field(
        default=3e-5, gt=0, description="learning rate of the backbone (finetune baseline only)"
    )
    weight_decay: float = Field(
        default=0.01, ge=0, description="weight decay of head and backbone (never the prompt)"
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="linear", description="learning-rate decay after warmup"
    )
    warmup_steps: int = Field(default=50, ge=0, description="linear learning-rate warmup steps")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="clip the gradient norm to this (null: no clipping)"
    )
    batch_size: int = Field(default=32, ge=1, description="examples per micro-batch (per device)")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(default=1000, ge=1, description="optimizer steps")
    bucket_by_length: bool = Field(
        default=True, description="batch examples of similar length together (less padding)"
    )

    # -- temperature ------------------------------------------------------------------
    tau_start: float = Field(default=1.0, gt=0, description="Gumbel-softmax temperature at step 0")
    tau_min: float = Field(default=0.5, gt=0, description="final (minimum) temperature")
    tau_schedule: Literal["exponential", "linear", "cosine"] = Field(
        default="exponential", description="how the temperature anneals"
    )
    tau_anneal_steps: int | None = Field(
        default=None, ge=1, description="steps to reach tau_min (default: max_steps)"
    )

    # -- evaluation, checkpoints ------------------------------------------------------
    eval_every: int = Field(default=100, ge=1, description="evaluate on dev every N steps")
    eval_limit: int | None = Field(
        default=500,
        ge=1,
        description="evaluate during training on a seeded dev subset of at most N examples "
        "(the final figure always uses the whole dev set unless final_eval_limit is set)",
    )
    final_eval_limit: int | None = Field(
        default=None, ge=1, description="cap the final dev evaluation (null: the whole dev set)"
    )
    eval_batch_size: int = Field(default=64, ge=1, description="batch size for evaluation")
    metric: Literal["accuracy", "macro_f1"] = Field(
        default="accuracy", description="dev metric that selects the best checkpoint"
    )
    keep_best: bool = Field(
        default=True, description="keep the weights of the best dev evaluation (else the last)"
    )
    early_stopping: int | None = Field(
        default=None,
        ge=1,
        description="stop after this many evaluations without improvement (null: never)",
    )
    log_every: int = Field(
        default=10,
        ge=1,
        description="write a train record every N steps (and a progress line, when stderr is "
        "not a terminal)",
    )

    # -- where, how -------------------------------------------------------------------
    output_dir: str = Field(
        default="runs/model", description="run folder: metrics.jsonl, plots, resume state"
    )
    checkpoint_dir: str | None = Field(
        default=None,
        description="where checkpoints go, one folder per task name (default: <output_dir>/checkpoints)",
    )
    resume: bool = Field(
        default=True, description="continue from the run folder's saved state if there is one"
    )
    save_every: int | None = Field(
        default=None, ge=1, description="save resume state every N steps (default: eval_every)"
    )
    seed: int = Field(default=0, description="seed for initialisation, data order and Gumbel noise")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto uses the GPU when there is one"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="mixed precision through Hugging Face Accelerate"
    )
    num_threads: int | None = Field(
        default=1,
        ge=1,
        description="CPU threads for torch (null: torch's choice, one per core). One is the "
        "default because it was the fastest on a shared 2-core machine (1.3-2.2x faster "
        "than two); on a machine of your own, try its idle core count",
    )
    plots: bool = Field(default=True, description="write PNG plots at the end")
    quiet: bool = Field(
        default=False,
        description="no progress display (a bar on a terminal; otherwise a plain line every "
        "log_every steps or 30 s)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_', '-'")
        if self.tasks is not None:
            given = [f for f in TASK_FIELDS if f in self.model_fields_set and f not in _SHARED]
            if given:
                raise ValueError(
                    f"with `tasks`, give the data fields inside each task, not at the top level "
                    f"(got {', '.join(given)})"
                )
            if len(self.tasks) < 1:
                raise ValueError("`tasks` needs at least one task")
            names = [t.name for t in self.task_list()]
            if len(set(names)) != len(names):
                raise ValueError(f"task names must be unique, got {names}; set `name` per task")
            if len(self.tasks) > 1 and self.variant == "finetune":
                raise ValueError(
                    "the finetune baseline trains the backbone; it has no multitask mode"
                )
        elif self.preset is None and self.train_file is None:
            raise ValueError(
                "give a data source: `preset`, or `train_file` (with a column mapping)"
            )
        if self.tau_min > self.tau_start:
            raise ValueError("tau_min must not exceed tau_start")
        if self.tasks is None:
            try:
                self.task_list()  # the top-level data fields, checked as one task
            except ValidationError as exc:
                raise ValueError(
                    "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                ) from None
        return self

    def task_list(self) -> list[TaskData]:
        """The run's tasks, names filled in; a single-task run is a list of one."""
        if self.tasks is None:
            data = {f: getattr(self, f) for f in TASK_FIELDS if f in TaskData.model_fields}
            data["max_length"] = None
            return [TaskData.model_validate({**data, "name": self.name})]
        out = []
        for task in self.tasks:
            fill: dict[str, Any] = {}
            if task.name is None:
                fill["name"] = task.preset or Path(task.train_file or "task").stem
            for key in ("data_dir", "max_train_examples"):
                if getattr(task, key) is None and getattr(self, key) is not None:
                    fill[key] = getattr(self, key)
            if "split_seed" not in task.model_fields_set:
                fill["split_seed"] = self.split_seed
            out.append(task.model_copy(update=fill))
        return out

    @property
    def is_multitask(self) -> bool:
        return self.tasks is not None

    @property
    def checkpoints_root(self) -> Path:
        return (
            Path(self.checkpoint_dir)
            if self.checkpoint_dir
            else Path(self.output_dir) / "checkpoints"
        )


# Top-level fields allowed next to `tasks` (they act as defaults for every task).
_SHARED = frozenset({"data_dir", "max_length", "split_seed", "max_train_examples"})


# ----------------------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a plain dict."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {exc}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping of field: value")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and flow lists (`3`, `1e-2`, `null`, `[a, b]`)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def build_config(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "config",
) -> TrainConfig:
    """Defaults < file < overrides, validated; errors name the source and the field."""
    merged: dict[str, Any] = dict(file_values or {})
    for key, value in (overrides or {}).items():
        merged[key] = value
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"field '{loc}': {msg}" if loc else msg)
    return f"{source}: " + "; ".join(problems)


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (only fields that differ from defaults are implied)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
