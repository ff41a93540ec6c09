"""Whether a run folder's saved state may be continued: only with the same data and the
same settings.

Resuming with other data would continue weights trained on the old examples, judge
them on a dev set that may hold former training rows, and write a checkpoint that
claims a figure nobody measured; resuming with other settings would mix two runs.
So the run folder records a hash of the examples every task actually used (after
sampling and splitting) and every setting, and a run that differs in either is
refused before anything is loaded, naming what changed and the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynprompt.training.config import ConfigError, TrainConfig
from dynprompt.training.prepare import TaskSplits

STATE_DIR = "state"
STATE_FILE = "trainer.json"

# Settings a continued run may change: how long it goes on, how it is watched, where it
# writes and on which device or threads it runs. None of them changes what a step computes.
MAY_CHANGE = frozenset(
    {
        "max_steps",
        "quiet",
        "plots",
        "resume",
        "num_threads",
        "device",
        "log_every",
        "save_every",
        "eval_batch_size",
        "output_dir",
        "checkpoint_dir",
    }
)


class RunFolderError(ConfigError):
    """A run folder whose saved run differs from the one asked for."""


def settings_key(config: TrainConfig) -> dict[str, Any]:
    """The settings that must match for a run folder's state to be continued."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in MAY_CHANGE}


def data_record(splits: list[TaskSplits]) -> dict[str, dict[str, Any]]:
    """Per task: the hash of its examples, its sizes, and what they are, for people."""
    return {
        s.name: {
            "hash": s.data_hash(),
            "train": len(s.train),
            "select": len(s.select),
            "dev": len(s.dev),
            "description": s.describe(),
        }
        for s in splits
    }


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(saved: dict[str, Any], config: TrainConfig, splits: list[TaskSplits]) -> list[str]:
    """What differs between a saved run record and this run, in words; empty if nothing."""
    problems: list[str] = []
    old_data = saved.get("data")
    new_data = data_record(splits)
    if not isinstance(old_data, dict):
        problems.append("the saved run has no record of its data (saved by an older dynprompt)")
    else:
        for name in sorted(set(old_data) | set(new_data)):
            old, new = old_data.get(name), new_data.get(name)
            if old is None or new is None:
                problems.append(f"task {name!r} {'added' if old is None else 'removed'}")
            elif old.get("hash") != new["hash"]:
                sizes = ", ".join(
                    f"{part} {old.get(part, '?')} -> {new[part]}" for part in ("train", "dev")
                )
                problems.append(
                    f"the data of task {name!r} ({sizes} examples; sha256 "
                    f"{str(old.get('hash'))[:12]} -> {new['hash'][:12]})"
                )
    new_settings = settings_key(config)
    # A setting added since the run was saved: that run used what is now its default.
    defaults = {k: f.get_default() for k, f in TrainConfig.model_fields.items()}
    old_settings = {k: defaults[k] for k in new_settings} | saved.get("config", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            problems.append(
                f"{key} ({_short(old_settings.get(key))} -> {_short(new_settings.get(key))})"
            )
    return problems


def check_resume(state_dir: Path, config: TrainConfig, splits: list[TaskSplits]) -> None:
    """Raise `RunFolderError` unless the saved run in `state_dir` has this run's data and
    settings (the ones in `MAY_CHANGE` aside)."""
    path = state_dir / STATE_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(
            f"{path}: cannot read the saved run ({exc}); start afresh with --no-resume, "
            "or give another --output-dir"
        ) from exc
    problems = differences(saved, config, splits)
    if problems:
        folder = state_dir.parent
        raise RunFolderError(
            f"{folder} holds a run with other data or settings, so it cannot be resumed; "
            f"changed: {'; '.join(problems)}. Start afresh in that folder with --no-resume "
            "(its saved state is replaced), or give another --output-dir"
        )


def check_run_folder(config: TrainConfig, splits: list[TaskSplits]) -> None:
    """`check_resume` on the run's folder, if the run would resume from it."""
    state_dir = Path(config.output_dir) / STATE_DIR
    if config.resume and (state_dir / STATE_FILE).exists():
        check_resume(state_dir, config, splits)
