"""The server's settings: one validated object, built from CLI flags with `DYNPROMPT_*` fallbacks.

Every field is one flag (`max_batch_size` -> `--max-batch-size`) and one environment
variable (`DYNPROMPT_MAX_BATCH_SIZE`); a flag beats the variable, the variable beats the
default. The parser is generated from the fields, so a new knob is one line here.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "DYNPROMPT_"
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "default_model"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Settings(BaseModel):
    """Everything `dynprompt serve` can be told; see `dynprompt serve --help`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_repository: Path | None = Field(
        None,
        description="folder of checkpoints: every folder under it holding a dynprompt.json is "
        "served under its name",
    )
    poll_s: float | None = Field(
        None,
        gt=0,
        description="rescan the model repository every this many seconds and reload what "
        "changed (a checkpoint loads once its files are unchanged between two polls); off by "
        "default: reload with POST /v1/admin/reload or SIGHUP",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="backbone weights' precision (prompts, routers, heads stay fp32)"
    )
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="compute backend of the backbone forward"
    )
    onnx_cache_dir: Path | None = Field(
        None, description="where --backend onnx keeps exported backbones"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op / ONNX Runtime threads")
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="HTTP front-end processes. 1: one process serves HTTP and runs the engine; "
        "N > 1: N HTTP processes share the port in front of one engine process (one queue, "
        "one set of metrics)",
    )
    tokenizer_threads: int = Field(
        2, ge=1, le=64, description="threads that tokenise requests off the event loop"
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="most rows in one forward")
    max_batch_tokens: int = Field(
        8192, ge=1, description="most padded tokens in one forward, prompts included"
    )
    max_wait_ms: float = Field(
        5.0, ge=0, le=60_000, description="how long a batch waits for more rows after its first"
    )
    padding_tolerance: float = Field(
        0.25,
        ge=0,
        description="a row joins a batch only if the padding it adds is at most this fraction "
        "of its own length (rows of other lengths wait for the next batch)",
    )
    max_queue_requests: int = Field(
        256, ge=1, description="requests admitted at once; beyond it the answer is 429"
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="a request not started within this time gets 503"
    )
    max_client_batch_size: int = Field(
        64, ge=1, description="most inputs in one request (more: 413)"
    )
    payload_limit_bytes: int = Field(
        1_048_576, ge=64, description="largest request body (larger: 413)"
    )
    max_input_chars: int | None = Field(
        None,
        ge=1,
        description="longest text (or text_pair) in characters (longer: 413); without it any "
        "text within the payload limit is accepted, and cut by characters before tokenising",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a new connection that has not sent a complete request head within this "
        "time is closed (slow clients)",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this time"
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="largest request head (request line and headers)"
    )
    api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer key accepted on /v1 routes; repeat the flag for several, or "
        "comma-separate them in the variable",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line; text: for people"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not key or key != key.strip() for key in value):
            raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        return value

    # -- derived -----------------------------------------------------------------------
    @property
    def repository(self) -> Path:
        return self.model_repository if self.model_repository is not None else DEFAULT_REPOSITORY

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_workers(self) -> int:
        """One process on a CPU (its cores are the model's); on a GPU, enough HTTP
        processes to keep the device fed: half the cores, at most 8."""
        if self.workers is not None:
            return self.workers
        if self.resolved_device() == "cpu":
            return 1
        return max(1, min(8, len(os.sched_getaffinity(0)) // 2))

    def __repr__(self) -> str:  # keys never reach logs
        shown = self.model_dump()
        shown["api_keys"] = f"<{len(self.api_keys)} keys>"
        return f"Settings({shown})"

    def public_dict(self) -> dict[str, Any]:
        shown = self.model_dump(mode="json")
        shown["api_keys"] = len(self.api_keys)
        return shown


# Fields whose flag or variable is not simply derived from the field name.
_FLAG_NAMES = {"api_keys": "api-key"}
# Defaults that read better in words.
_SHOWN_DEFAULTS = {
    "model_repository": "the shipped default model, dynprompt/default_model/",
    "threads": "all cores",
    "workers": "1 on a CPU; on a GPU half the cores, at most 8",
    "max_input_chars": "none",
    "api_keys": "none (no authentication)",
    "onnx_cache_dir": "$DYNPROMPT_ONNX_CACHE, else ~/.cache/dynprompt/onnx",
}


def flag_name(field: str) -> str:
    return "--" + _FLAG_NAMES.get(field, field.replace("_", "-"))


def env_name(field: str) -> str:
    return ENV_PREFIX + _FLAG_NAMES.get(field, field).replace("-", "_").upper()


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def build_parser(prog: str = "dynprompt serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model repository of dynprompt checkpoints over HTTP "
        "(POST /v1/classify, GET /v1/models, /health, /ready, /metrics). Every option is "
        "also read from the environment variable named in its help; a flag wins.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, info in Settings.model_fields.items():
        shown = _SHOWN_DEFAULTS.get(name, info.default)
        help_text = f"{info.description} [env {env_name(name)}; default: {shown}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        choices = _choices(info.annotation)
        if choices:
            kwargs["choices"] = choices
        if name == "api_keys":
            kwargs["action"] = "append"
            kwargs["metavar"] = "KEY"
        parser.add_argument(flag_name(name), **kwargs)
    return parser


class SettingsError(ValueError):
    pass


def settings_from(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then `DYNPROMPT_*` variables, then defaults; raises SettingsError naming the source."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        if name in flags:
            values[name], sources[name] = flags[name], flag_name(name)
        elif environ.get(env_name(name), "") != "":
            raw = environ[env_name(name)]
            values[name] = (
                [k.strip() for k in raw.split(",") if k.strip()] if name == "api_keys" else raw
            )
            sources[name] = env_name(name)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{sources.get(str(err['loc'][0]), str(err['loc'][0])) if err['loc'] else 'settings'}: "
            f"{err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(problems) from exc
