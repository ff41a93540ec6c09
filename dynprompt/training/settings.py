"""Where the settings of `dynprompt train` come from, read by pydantic-settings.

Every field of `TrainConfig` can be set, in rising order of precedence, by its
default, a YAML or TOML file (`--config FILE`), an environment variable
(`DYNPROMPT_TRAIN_<FIELD>`, e.g. `DYNPROMPT_TRAIN_MAX_STEPS=500`), a flag (one per
field, generated with its help text: `--max-steps 500`), and `--set KEY=VALUE`
(a YAML value, for anything, nested task lists included).

Two flags are spelled for the user rather than after the field: `--preset`, which
may be repeated (a multitask run: one head and checkpoint per preset), and
`--header/--no-header` for `has_header`, the same flag `eval` and `predict` take.
Their old spellings (`--task PRESET`, `--has-header/--no-has-header`) still work
and are left out of `--help`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from dynprompt.training.config import (
    ConfigError,
    TrainConfig,
    format_validation_error,
    parse_value,
    read_config_file,
)
from dynprompt.training.data import PRESETS

ENV_PREFIX = "DYNPROMPT_TRAIN_"

# Flags named for the user, not after their field; the generated name stays, hidden.
RENAMED_FLAGS = {"--has-header": "--header"}
HIDDEN = argparse.SUPPRESS


class TrainSettings(TrainConfig, BaseSettings):
    """`TrainConfig`'s fields as settings: what pydantic-settings generates flags and
    reads environment variables and files for. The values it finds are validated as
    a `TrainConfig`."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
    )


class _AddTask(argparse.Action):
    """`--task PRESET` (the old multitask flag): a preset, and the run is multitask."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        namespace.presets = [*(getattr(namespace, "presets", None) or []), values]
        namespace.multitask = True


def _add_argument(target: Any, *names: str, **kwargs: Any) -> Any:
    """pydantic-settings' call to `add_argument`, with the user-facing spellings."""
    if names == ("--preset",):
        kwargs.update(
            action="append",
            dest="presets",
            metavar="PRESET",
            help="a preset over the shared data folder: "
            + ", ".join(PRESETS)
            + "; repeat the flag for a multitask run (one head and checkpoint per preset)",
        )
        kwargs.pop("type", None)
        return target.add_argument(*names, **kwargs)
    help_text = kwargs.get("help")
    if isinstance(help_text, str) and help_text.endswith(" (default: null)"):
        # The field's own help says what an unset value means ("default: inferred ...").
        trimmed = help_text.removesuffix(" (default: null)")
        kwargs["help"] = trimmed if "default" in trimmed else trimmed + " (default: unset)"
    renamed = [RENAMED_FLAGS.get(n, n) for n in names]
    action = target.add_argument(*renamed, **kwargs)
    old = [n for n in names if n in RENAMED_FLAGS]
    if old:
        target.add_argument(*old, **{**kwargs, "help": HIDDEN})
    return action


def train_parser() -> tuple[argparse.ArgumentParser, CliSettingsSource[TrainSettings]]:
    """The `dynprompt train` parser (a flag per field, generated) and its settings source."""
    parser = argparse.ArgumentParser(
        prog="dynprompt train",
        description=(
            "Train a dynamic-prompt classifier over a frozen backbone. Settings come from "
            "defaults, then --config FILE, then DYNPROMPT_TRAIN_<FIELD> environment "
            "variables, then the flags below (every config field has one), then --set. "
            "Data: a --preset over the shared data folder (repeat it for a multitask run), "
            "or --train-file/--dev-file with a column mapping (or `tasks:` in the file)."
        ),
        epilog="presets: " + "; ".join(f"{k} ({v})" for k, v in PRESETS.items()),
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) config file"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config field; VALUE is YAML (e.g. --set tasks='[{preset: rte}, {preset: cb}]')",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument("--task", action=_AddTask, metavar="PRESET", help=HIDDEN)
    source: CliSettingsSource[TrainSettings] = CliSettingsSource(
        TrainSettings,
        root_parser=parser,
        add_argument_method=_add_argument,
    )
    return parser, source


def _file_values(path: str) -> dict[str, Any]:
    """The config file's fields, read by pydantic-settings (checked first for a message
    that names the file when it is missing, malformed, or not a mapping)."""
    read_config_file(path)
    if Path(path).suffix.lower() == ".toml":
        return TomlConfigSettingsSource(TrainSettings, toml_file=path)()
    return YamlConfigSettingsSource(TrainSettings, yaml_file=path)()


def _set_values(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def resolve_train_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse `argv` and build the run's validated config; errors are `ConfigError`s
    naming where the bad value came from and the field."""
    parser, source = train_parser()
    args = parser.parse_args(argv)
    try:
        layers: list[tuple[str, dict[str, Any]]] = [
            (args.config or "", _file_values(args.config) if args.config else {}),
            (f"{ENV_PREFIX}* environment variables", EnvSettingsSource(TrainSettings)()),
            ("command line", source(parsed_args=args)()),
        ]
    except SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    flags = layers[-1][1]
    presets = list(getattr(args, "presets", None) or [])
    if getattr(args, "multitask", False) or len(presets) > 1:
        flags["tasks"] = [{"preset": p} for p in presets]
    elif presets:
        flags["preset"] = presets[0]
    sets = _set_values(args.sets)
    twice = sorted(set(sets) & set(flags))
    if twice:
        raise ConfigError(
            f"{', '.join(twice)}: given both as a flag and with --set; give each field once"
        )
    flags.update(sets)
    merged: dict[str, Any] = {}
    for _, values in layers:
        merged.update(values)
    where = [name for name, values in layers if values and name]
    source_name = " with ".join(where) or "defaults"
    try:
        return TrainConfig.model_validate(merged), args
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source_name, exc)) from exc
