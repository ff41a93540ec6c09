"""The server's settings: one validated object, read by pydantic-settings.

Every field is one flag (`max_batch_size` -> `--max-batch-size`), one environment variable
(`DYNPROMPT_MAX_BATCH_SIZE`) and one key of an optional YAML or TOML file (`--config FILE`
or `DYNPROMPT_CONFIG`). A flag beats the variable, the variable beats the file, the file
beats the default. pydantic-settings generates the flags from the fields and reads the
variables and the file, so a new knob is one field here.

The settings fail closed, because a server that starts with a setting it silently ignored
is worse than one that does not start:

- a `DYNPROMPT_*` variable that nothing reads is an error naming the closest real one
  (a plural `API_KEYS` for `API_KEY` once left authentication off without a word);
  variables that other commands and the tests read are listed in `OTHER_VARIABLES`;
- a non-loopback `--host` without API keys needs `--allow-unauthenticated`;
- keys can come from a file (`--api-key-file`), which must not be readable by every
  user; `--api-key KEY` works but shows in `ps`, so the variable or the file is better;
- a missing model repository is an error before the port is bound.

`config.py` imports neither torch nor transformers: `dynprompt serve --help` parses
before anything heavy loads.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import stat
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "DYNPROMPT_"
CONFIG_ENV = "DYNPROMPT_CONFIG"
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "default_model"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# A key file is a handful of lines; anything larger is not one.
_KEY_FILE_MAX_BYTES = 65_536

# `DYNPROMPT_*` variables that something other than `serve`'s settings reads. `serve`
# refuses any other `DYNPROMPT_*` variable (a misspelt setting must not be ignored), so a
# new variable read anywhere in the project is added here, with who reads it.
OTHER_VARIABLES: dict[str, str] = {
    "DYNPROMPT_DATA_DIR": "the shared data folder of the presets (train, eval, experiment, tests)",
    "DYNPROMPT_CACHE_DIR": "where converted backbones live (dynprompt.models.gguf)",
    "DYNPROMPT_ONNX_CACHE": "the older name of DYNPROMPT_ONNX_CACHE_DIR, still read",
    "DYNPROMPT_MODELS_DIR": "docker-compose.yml: the host folder mounted at /models",
    "DYNPROMPT_SOAK_SECONDS": "tests: how long the soak test runs",
    "DYNPROMPT_SCHEMATHESIS_EXAMPLES": "tests: generated cases per operation",
    "DYNPROMPT_RSS_RELOADS": "tests: reloads of the RSS measurement",
}
# Whole families of variables read by other commands.
OTHER_PREFIXES: dict[str, str] = {
    "DYNPROMPT_TRAIN_": "dynprompt train's settings (DYNPROMPT_TRAIN_<FIELD>)",
}


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
    host: str = Field(
        "127.0.0.1",
        description="address to bind; any but a loopback address needs API keys or "
        "--allow-unauthenticated",
    )
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
    tokenizer_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="threads of the engine's fast tokenizer (Rust) that tokenise each batch "
        "(with --workers N the HTTP processes tokenise their own requests, in one thread "
        "each); on a busy CPU one costs less CPU per sentence, more are faster on idle cores",
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
    padding_budget_tokens: int | None = Field(
        None,
        ge=0,
        description="padded tokens a batch may carry beyond --padding-tolerance; unset, each "
        "backbone learns it from its batches' times: the padding that costs as much as one "
        "more batch (hundreds of tokens for a small model or on a GPU, about none for a real "
        "model on a CPU)",
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
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request body that has not fully arrived within this time after its "
        "head is answered 408 and its connection closed (slow uploads)",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections at most; one more is answered 503 and closed (the "
        "open-files limit is raised to its hard limit at start)",
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
        "comma-separate them in the variable. A flag shows in `ps`: prefer the variable or "
        "--api-key-file",
    )
    api_key_file: Path | None = Field(
        None,
        description="file of Bearer keys, one per line (blank lines and lines starting with # "
        "are skipped), added to --api-key's; read at start-up; refused if every user may read "
        "it (chmod 600)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve without API keys on a non-loopback --host (without it such a "
        "server refuses to start); only behind a network that is trusted",
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

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_api_key_file(value)  # its errors, with this field's name
        return value

    @model_validator(mode="before")
    @classmethod
    def _add_file_keys(cls, data: Any) -> Any:
        """The key file's keys join `api_keys`, so that whatever checks keys sees them all.
        A file that cannot be read adds nothing here; its own validator says why."""
        if not isinstance(data, dict) or not data.get("api_key_file"):
            return data
        given = data.get("api_keys", ())
        if not isinstance(given, list | tuple):
            return data
        try:
            keys = read_api_key_file(Path(data["api_key_file"]))
        except (ValueError, TypeError):
            return data
        return {**data, "api_keys": tuple(dict.fromkeys([*given, *keys]))}

    @model_validator(mode="after")
    def _fail_closed(self) -> Settings:
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"--host {self.host} is reachable from other machines and no API key is set: "
                "give keys (DYNPROMPT_API_KEY or --api-key-file FILE), or pass "
                "--allow-unauthenticated if the network in front of it is trusted"
            )
        return self

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

    __str__ = __repr__  # `%s` in a log line too

    def public_dict(self) -> dict[str, Any]:
        shown = self.model_dump(mode="json")
        shown["api_keys"] = len(self.api_keys)
        return shown


def is_loopback(host: str) -> bool:
    """Only this machine can connect. A host name other than `localhost` counts as
    reachable: resolving it here would be a guess about what uvicorn binds."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key_file(path: Path) -> tuple[str, ...]:
    """The keys of a key file: one per line; blank lines and lines starting with `#` are
    skipped. Errors never quote a key."""
    try:  # non-blocking, so that a FIFO put in its place cannot hang the start
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: not a regular file")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise ValueError(
                f"{path}: other users of this machine may read or change it (mode "
                f"{stat.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
            )
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(_KEY_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _KEY_FILE_MAX_BYTES:
        raise ValueError(f"{path}: larger than {_KEY_FILE_MAX_BYTES} bytes, not a key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if any(c.isspace() for c in key) or "," in key:
            raise ValueError(f"{path}, line {number}: a key has no spaces or commas")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path}: holds no keys")
    return tuple(keys)


# --------------------------------------------------------------------------- names


# Fields whose flag or variable is not simply derived from the field name.
_FLAG_NAMES = {"api_keys": "api-key"}
# Defaults that read better in words.
_SHOWN_DEFAULTS = {
    "model_repository": "the shipped default model, dynprompt/default_model/",
    "poll_s": "off",
    "threads": "all cores",
    "tokenizer_threads": "all cores",
    "workers": "1 on a CPU; on a GPU half the cores, at most 8",
    "max_input_chars": "none",
    "padding_budget_tokens": "learned from the batches run",
    "api_keys": "none",
    "api_key_file": "none",
    "allow_unauthenticated": "off",
    "onnx_cache_dir": "$DYNPROMPT_ONNX_CACHE, else ~/.cache/dynprompt/onnx",
}


def flag_name(field: str) -> str:
    return "--" + _FLAG_NAMES.get(field, field.replace("_", "-"))


def env_name(field: str) -> str:
    return ENV_PREFIX + _FLAG_NAMES.get(field, field).replace("-", "_").upper()


def serve_variables() -> set[str]:
    """Every variable `dynprompt serve` reads itself."""
    return {env_name(name) for name in Settings.model_fields} | {CONFIG_ENV}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`DYNPROMPT_*` variables in `environ` that nothing reads, each with a suggestion."""
    known = serve_variables() | set(OTHER_VARIABLES)
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if any(upper.startswith(prefix) for prefix in OTHER_PREFIXES):
            continue
        # Compared after the prefix, which every candidate shares.
        tails = {k.removeprefix(ENV_PREFIX): k for k in sorted(known)}
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), list(tails), n=1)
        hint = f" (did you mean {tails[close[0]]}?)" if close else ""
        problems.append(f"{name}{hint}")
    return problems


# --------------------------------------------------------------------------- sources


class ServeSettings(Settings, BaseSettings):
    """`Settings`' fields as settings: what pydantic-settings generates flags and reads
    variables and files for. What it finds is validated as a `Settings`."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        env_ignore_empty=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
    )


class _EnvironSource(EnvSettingsSource):
    """`DYNPROMPT_*` variables from a given mapping (the process's, or a test's), with the
    one variable not named after its field: `DYNPROMPT_API_KEY`, comma-separated keys."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(ServeSettings)
        # Case-insensitive, as the source reads; an empty variable counts as unset.
        self.env_vars = {k.lower(): v for k, v in environ.items() if v != ""}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name == "api_keys":
            return self.env_vars.get(env_name(field_name).lower()), field_name, False
        return super().get_field_value(field, field_name)

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if field_name == "api_keys" and isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def _help(field: str) -> str:
    info = Settings.model_fields[field]
    shown = _SHOWN_DEFAULTS.get(field, info.default)
    text = f"{info.description} [env {env_name(field)}; default: {shown}]"
    return text.replace("%", "%%")


def _add_argument(target: Any, *names: str, **kwargs: Any) -> Any:
    """pydantic-settings' call to `add_argument`, with this server's spellings: `--api-key`
    (repeatable), each option's variable and default in its help, metavars in capitals."""
    field = kwargs.get("dest")
    if field not in Settings.model_fields:
        return target.add_argument(*names, **kwargs)
    kwargs["help"] = _help(field)
    if field == "api_keys":
        names = (flag_name(field),)
        kwargs["metavar"] = "KEY"
    elif isinstance(kwargs.get("metavar"), str) and not kwargs["metavar"].startswith("{"):
        kwargs["metavar"] = "FILE" if field == "api_key_file" else field.upper()
    return target.add_argument(*names, **kwargs)


class _Formatter(argparse.HelpFormatter):
    """argparse's help, without line breaks inside flag and variable names."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


def _parser(prog: str) -> tuple[argparse.ArgumentParser, CliSettingsSource[ServeSettings]]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model repository of dynprompt checkpoints over HTTP "
        "(POST /v1/classify, GET /v1/models, /health, /ready, /metrics). Every option is "
        "also read from the environment variable named in its help, and from a YAML or TOML "
        "file (--config; its keys are the options' names with underscores, e.g. "
        "max_batch_size: 64, and api_keys for --api-key); a flag beats the variable, the "
        "variable beats the file, the file beats the default.",
        formatter_class=_Formatter,
        epilog="Fail closed: an unknown DYNPROMPT_* variable, a non-loopback --host without "
        "API keys (unless --allow-unauthenticated), a key file every user may read, or a "
        "missing --model-repository stops the server before it binds its port (exit 2).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML (.yaml/.yml) or TOML (.toml) file of settings [env {CONFIG_ENV}; "
        "default: none]",
    )
    source: CliSettingsSource[ServeSettings] = CliSettingsSource(
        ServeSettings, root_parser=parser, add_argument_method=_add_argument
    )
    return parser, source


def build_parser(prog: str = "dynprompt serve") -> argparse.ArgumentParser:
    """The `dynprompt serve` parser: a flag per field, generated by pydantic-settings."""
    return _parser(prog)[0]


class SettingsError(ValueError):
    pass


def _file_values(path: str, named_by: str) -> dict[str, Any]:
    file = Path(path)
    where = f"{named_by} {path}"
    if not file.is_file():
        raise SettingsError(f"{where}: " + ("not a file" if file.exists() else "file not found"))
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            return TomlConfigSettingsSource(ServeSettings, toml_file=file)()
        if suffix in {".yaml", ".yml"}:
            top = yaml.safe_load(file.read_text(encoding="utf-8"))
            if top is not None and not isinstance(top, dict):
                raise SettingsError(f"{where}: expected a mapping of settings (key: value lines)")
            return YamlConfigSettingsSource(ServeSettings, yaml_file=file)()
    except SettingsError:
        raise
    except Exception as exc:  # the parsers' own errors, with the line they stopped at
        raise SettingsError(f"{where}: {' '.join(str(exc).split())}") from exc
    raise SettingsError(f"{where}: expected a .yaml, .yml or .toml file")


def _message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] not in {"value_error", "missing"} and isinstance(err.get("input"), str):
        msg += f" (got {err['input']!r})"
    return msg


def settings_from(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then `DYNPROMPT_*` variables, then the `--config` file, then defaults.

    Raises SettingsError naming the flag, variable or file a bad value came from, for an
    unknown `DYNPROMPT_*` variable, and for what a server cannot start without (a model
    repository that is not a folder, a usable key file, keys on a non-loopback host).
    argparse itself exits for `--help` and for an unknown flag.
    """
    environ = os.environ if environ is None else environ
    parser, cli = _parser("dynprompt serve")
    args = parser.parse_args(list(argv))
    unknown = unknown_variables(environ)
    if unknown:
        raise SettingsError(
            f"unknown environment variable {', '.join(unknown)}: `dynprompt serve --help` "
            "lists the ones it reads"
        )
    config = args.config or environ.get(CONFIG_ENV) or None
    named_by = "--config" if args.config else CONFIG_ENV
    layers: list[tuple[dict[str, Any], Callable[[str], str]]] = []
    try:
        if config:
            file_values = _file_values(config, named_by)
            layers.append((file_values, lambda name: f"{config}: {name}"))
        layers.append((_EnvironSource(environ)(), env_name))
        layers.append((cli(parsed_args=args)(), flag_name))
    except SourceError as exc:
        raise SettingsError(str(exc)) from exc
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for found, label in layers:
        for name, value in found.items():
            values[name], sources[name] = value, label(name)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, sources)) from exc
    repository = settings.model_repository
    if repository is not None and not repository.is_dir():
        where = sources["model_repository"]
        given = f"{where}={repository}" if where.startswith(ENV_PREFIX) else f"{where} {repository}"
        problem = "not a folder" if repository.exists() else "folder not found"
        raise SettingsError(f"{given}: {problem}")
    return settings


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    known = list(Settings.model_fields)
    problems = []
    for err in exc.errors():
        if not err["loc"]:  # a rule over several settings; its message names them
            problems.append(_message(err))
            continue
        name = str(err["loc"][0])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{sources.get(name, name)}: unknown setting{hint}")
            continue
        problems.append(f"{sources.get(name, name)}: {_message(err)}")
    return "; ".join(problems)
