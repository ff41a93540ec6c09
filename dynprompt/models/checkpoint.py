"""Checkpoints: a folder with `dynprompt.json` and `weights.safetensors`, never pickle.

Loading checks everything before a single weight is used — the JSON against its
schema, the backbone's fingerprint, every tensor's name and shape — and each
refusal names the file and the field, because the person reading it is usually
deploying someone else's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from dynprompt.models.backbone import Backbone, load_backbone
from dynprompt.models.config import DynPromptConfig, TrainingInfo
from dynprompt.models.model import DynPromptModel

CONFIG_FILE = "dynprompt.json"
WEIGHTS_FILE = "weights.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and field that say why."""


def save_checkpoint(
    model: DynPromptModel, directory: str | Path, training: TrainingInfo | None = None
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if training is not None:
        config = config.model_copy(update={"training": training})
        model.config = config
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    # Write then rename, so a reader never sees half a checkpoint.
    tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt", "dynprompt": "1"})
    tmp_weights.replace(directory / WEIGHTS_FILE)
    # safetensors writes 0600 whatever the umask; a non-root server must be able to read it.
    (directory / WEIGHTS_FILE).chmod(0o644)
    tmp_config = directory / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    tmp_config.replace(directory / CONFIG_FILE)
    return directory


def read_config(directory: str | Path) -> DynPromptConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path}: file not found (a checkpoint folder needs {CONFIG_FILE})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    try:
        return DynPromptConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(top level)'}': {err['msg']}"
            for err in exc.errors()
        )
        raise CheckpointError(f"{path}: {problems}") from exc


def weights_checksum(directory: str | Path) -> str:
    """The checkpoint's version as the server reports it: a hash of its weights file."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = handle.get_tensor(key)
        return tensors
    except Exception as exc:  # safetensors raises several unrelated types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_checkpoint(
    directory: str | Path,
    backbone: Backbone | None = None,
    backbone_loader: Callable[[str], Backbone] | None = None,
) -> DynPromptModel:
    """Load and validate a checkpoint over `backbone` (or one loaded by name)."""
    directory = Path(directory)
    config = read_config(directory)
    config_path = directory / CONFIG_FILE
    if backbone is None:
        backbone = (backbone_loader or load_backbone)(config.backbone.name_or_path)
    if backbone.family != config.backbone.family:
        raise CheckpointError(
            f"{config_path}: field 'backbone.family': checkpoint wants {config.backbone.family}, "
            f"the backbone is {backbone.family}"
        )
    if backbone.fingerprint != config.backbone.fingerprint:
        raise CheckpointError(
            f"{config_path}: field 'backbone.fingerprint': checkpoint was trained on weights "
            f"{config.backbone.fingerprint}, but backbone {backbone.name_or_path!r} has "
            f"{backbone.fingerprint}; load the backbone it was trained on"
        )
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_weights(weights_path)
    model = DynPromptModel(config, backbone)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(
            f"{weights_path}: missing tensor '{missing[0]}' ({len(missing)} missing)"
        )
    if unexpected:
        raise CheckpointError(
            f"{weights_path}: unexpected tensor '{unexpected[0]}' for variant {config.variant!r}"
        )
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{weights_path}: tensor '{key}' has shape {tuple(got.shape)}, "
                f"{CONFIG_FILE} implies {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(
                f"{weights_path}: tensor '{key}' is {got.dtype}, not floating point"
            )
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{weights_path}: tensor '{key}' holds NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    return model
