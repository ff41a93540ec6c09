"""Export a backbone to ONNX, cache the export per weights fingerprint, load it into ONNX Runtime.

What is exported is exactly what `Backbone` computes after prompt assembly, so
assembly, routers and heads stay in torch and are shared with the torch path:

- `hidden.onnx`: `inputs_embeds` float [B, S, d], `attention_mask` int64 [B, S]
  and, for BERT-family models whose token-type vocabulary has more than one
  entry, `token_type_ids` int64 [B, S] (pairs need segment ids) →
  `last_hidden_state` [B, S, d] (T5: the encoder's). Batch and sequence axes are
  dynamic; position ids are 0..S-1 along the assembled sequence, as the torch
  path passes them.
- `verbalizer.onnx` (T5 and decoder-only models only): `last_hidden_state`
  [B, S, d] and `attention_mask` [B, S] → `logits` [B, V], the vocabulary logits
  the verbalizer head reads: T5's first decoder step (the decoder reads the
  encoder states), or a decoder-only model's LM head at the last real position.
  It takes the hidden graph's output rather than `inputs_embeds` so that the
  encoder / decoder stack is stored and held in memory once, not twice;
  `OnnxBackbone.verbalizer_logits` chains the two graphs (on the GPU the hidden
  states stay on the device between them).
- `manifest.json`: format version, backbone name, family, fingerprint, hidden
  size, vocabulary width, dtype, opset, exporter, the torch / transformers /
  onnx / onnxscript versions, and a sha256 and size for every file of the export.

Exports live in a cache, one folder per weights fingerprint and dtype:
`$DYNPROMPT_ONNX_CACHE_DIR/<fingerprint>/<dtype>/` (default root
`~/.cache/dynprompt/onnx`; the variable is the one behind `dynprompt serve
--onnx-cache-dir`, and the older name `DYNPROMPT_ONNX_CACHE` is still read). Before use the manifest is checked against the
backbone (a different fingerprint, dtype or format version is *stale*) and every
file against its hash (a missing or altered file is *corrupt*); either is
rebuilt with a logged reason, or — when rebuilding is disabled or fails —
refused with an error that names the file. Builds happen in a staging folder
that replaces the old export in one rename, under a file lock (`filelock`), so
concurrent processes never read half an export.

The exporter is `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript):
it keeps the batch and sequence axes symbolic through transformers' mask
construction, where the legacy TorchScript tracer bakes some shape-dependent
branches into the graph. The model's own attention implementation (sdpa by
default) is exported; eager attention gives the same numbers. Each export is
checked numerically against the torch model on a shape it was not traced with.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynprompt.models.backbone import (
    DEFAULT_BACKBONE,
    Backbone,
    BackboneError,
    load_backbone,
)
from dynprompt.models.onnx_backbone import (
    OPTIMIZATION_LEVELS,
    GraphSpec,
    OnnxBackbone,
    OrtGraphs,
    drop_modules_except,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MANIFEST_FILE = "manifest.json"
HIDDEN_FILE = "hidden.onnx"
VERBALIZER_FILE = "verbalizer.onnx"
# One name for the cache root: the variable of `dynprompt serve --onnx-cache-dir`.
CACHE_ENV = "DYNPROMPT_ONNX_CACHE_DIR"
LEGACY_CACHE_ENV = "DYNPROMPT_ONNX_CACHE"  # the name before; still read, after CACHE_ENV
EXPORTER = "torch.onnx.export(dynamo=True)"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
# Above this many bytes of weights a graph keeps them in a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30
EXPORT_MISSING = "exporting to ONNX needs onnx and onnxscript: pip install 'dynprompt[onnx]'"


class OnnxExportError(BackboneError):
    """An ONNX export that is missing, stale, corrupt, or cannot be built."""


class MissingExport(OnnxExportError):
    pass


class StaleExport(OnnxExportError):
    pass


class CorruptExport(OnnxExportError):
    pass


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise BackboneError(f"the ONNX backend exports float32 or float16, not {dtype}")


def default_cache_root() -> Path:
    """`$DYNPROMPT_ONNX_CACHE_DIR` (the variable behind `dynprompt serve
    --onnx-cache-dir`), else the older `$DYNPROMPT_ONNX_CACHE`, else
    `$XDG_CACHE_HOME/dynprompt/onnx` or `~/.cache/dynprompt/onnx`."""
    for name in (CACHE_ENV, LEGACY_CACHE_ENV):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dynprompt" / "onnx"


def cache_dir_for(
    fingerprint: str, dtype: torch.dtype = torch.float32, root: str | Path | None = None
) -> Path:
    """Where the export of the weights with this fingerprint lives in the cache."""
    base = Path(root).expanduser() if root is not None else default_cache_root()
    return base / fingerprint / dtype_name(dtype)


# -------------------------------------------------------------------------------- graphs
class HiddenGraph(nn.Module):
    """`Backbone.hidden_states` as a module with fixed inputs, for export."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.body = backbone._body()
        self.position_ids = backbone._accepts_position_ids
        self.token_types = backbone._accepts_token_types

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self.position_ids:
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            kwargs["position_ids"] = positions[None, :].expand(inputs_embeds.shape[0], -1)
        if self.token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.body(**kwargs).last_hidden_state


class VerbalizerGraph(nn.Module):
    """From last hidden states to the logits the verbalizer reads, for export."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.family = backbone.family
        self.model = backbone.model
        start = getattr(backbone.model.config, "decoder_start_token_id", None)
        self.start = int(start) if start is not None else 0  # read by T5 only

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
        if self.family == "encoder_decoder":
            decoder_ids = torch.full(
                (last_hidden_state.shape[0], 1),
                self.start,
                dtype=torch.long,
                device=last_hidden_state.device,
            )
            out = self.model(
                encoder_outputs=(last_hidden_state,),
                attention_mask=attention_mask,
                decoder_input_ids=decoder_ids,
            )
            return out.logits[:, 0, :]
        last = attention_mask.long().sum(dim=1) - 1
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        return self.model.get_output_embeddings()(last_hidden_state[rows, last])


def hidden_inputs(backbone: Backbone) -> list[str]:
    names = ["inputs_embeds", "attention_mask"]
    return names + (["token_type_ids"] if backbone._accepts_token_types else [])


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter's progress lines and warnings mean nothing to a user; errors still raise."""
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    ]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    names: list[str],
    output: str,
    path: Path,
    opset: int,
) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: seq} for name in names}
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with _quiet_export():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=[output],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
            verbose=False,
        )


def _sample(backbone: Backbone, batch: int, seq: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings of random vocabulary rows, a padded mask and two segments."""
    generator = torch.Generator().manual_seed(seed)
    vocab = backbone.input_embeddings.weight.shape[0]
    ids = torch.randint(vocab, (batch, seq), generator=generator).to(backbone.device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=backbone.device)
    mask[1:, seq // 2 + 1 :] = 0  # every row after the first is padded
    types = torch.zeros_like(mask)
    types[:, seq // 3 :] = 1 if backbone._accepts_token_types else 0
    return backbone.embed(ids).detach(), mask, types


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("onnx", "onnxscript"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


def export_backbone(
    backbone: Backbone, out_dir: str | Path, *, opset: int = DEFAULT_OPSET, check: bool = True
) -> Path:
    """Export `backbone` (a torch backbone, in its own dtype) into `out_dir`; return `out_dir`.

    `out_dir` receives `hidden.onnx`, for T5 and decoder-only models
    `verbalizer.onnx`, and `manifest.json`. An older export there is replaced in
    one rename; a folder that holds anything else is refused. With `check`, the
    graphs are run in ONNX Runtime on a shape they were not traced with and
    compared with the torch model before anything is written.
    """
    if isinstance(backbone, OnnxBackbone):
        raise OnnxExportError("export a torch backbone; this one already runs in ONNX Runtime")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise OnnxExportError(EXPORT_MISSING) from exc
    out_dir = Path(out_dir)
    _refuse_foreign_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _export_into(backbone, staging, opset, check)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _export_into(backbone: Backbone, folder: Path, opset: int, check: bool) -> None:
    model = backbone.model
    was_training = model.training
    model.eval()
    try:
        embeds, mask, types = _sample(backbone, 2, 8, seed=0)
        names = hidden_inputs(backbone)
        hidden_graph = HiddenGraph(backbone)
        args = (embeds, mask, types) if "token_type_ids" in names else (embeds, mask)
        _export_graph(hidden_graph, args, names, "last_hidden_state", folder / HIDDEN_FILE, opset)
        graphs: dict[str, Any] = {
            "hidden": {"file": HIDDEN_FILE, "inputs": names, "output": "last_hidden_state"}
        }
        vocab_size = None
        if backbone.family != "encoder":
            verbalizer = VerbalizerGraph(backbone)
            with torch.no_grad():
                hidden = hidden_graph(embeds, mask)
                vocab_size = int(verbalizer(hidden, mask).shape[-1])
            v_names = ["last_hidden_state", "attention_mask"]
            _export_graph(
                verbalizer, (hidden, mask), v_names, "logits", folder / VERBALIZER_FILE, opset
            )
            graphs["verbalizer"] = {"file": VERBALIZER_FILE, "inputs": v_names, "output": "logits"}
        manifest = {
            "format_version": FORMAT_VERSION,
            "backbone": {
                "name_or_path": backbone.name_or_path,
                "family": backbone.family,
                "fingerprint": backbone.fingerprint,
                "hidden_size": backbone.hidden_size,
                "vocab_size": vocab_size,
                "token_type_ids": "token_type_ids" in names,
            },
            "dtype": dtype_name(backbone.dtype),
            "opset": opset,
            "exporter": EXPORTER,
            "versions": _versions(),
            "graphs": graphs,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {
                path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                for path in sorted(folder.iterdir())
            },
        }
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if check:
            _check_export(backbone, folder, manifest)
    finally:
        model.train(was_training)


def _check_export(backbone: Backbone, folder: Path, manifest: dict[str, Any]) -> None:
    """Run the fresh graphs on an untraced shape; refuse an export that is numerically off."""
    runtime = _runtime(folder, manifest, torch.device("cpu"), None, "basic")
    embeds, mask, types = _sample(backbone, 3, 13, seed=1)
    embeds, mask, types = embeds.cpu(), mask.cpu(), types.cpu()
    tolerance = 1e-3 if backbone.dtype == torch.float32 else 5e-2
    with torch.no_grad():
        want = backbone.hidden_states(
            embeds.to(backbone.device), mask.to(backbone.device), types.to(backbone.device)
        ).cpu()
        got = runtime.run_hidden(embeds, mask, types)
        worst = float((got.float() - want.float())[mask.bool()].abs().max())
        what = "hidden states"
        if worst <= tolerance and runtime.verbalizer is not None:
            want = backbone.verbalizer_logits(
                embeds.to(backbone.device), mask.to(backbone.device)
            ).cpu()
            got = runtime.run_verbalizer(runtime.run_hidden(embeds, mask, None), mask)
            scale = max(1.0, float(want.float().abs().max()))
            worst = float((got.float() - want.float()).abs().max()) / scale
            what = "verbalizer logits (relative)"
    if not worst <= tolerance:  # also catches NaN
        raise OnnxExportError(
            f"the ONNX export of {backbone.name_or_path!r} does not reproduce the torch model: "
            f"{what} differ by {worst:.3g} (tolerance {tolerance:g})"
        )


def _refuse_foreign_folder(out_dir: Path) -> None:
    """Replace only an export (or an empty folder): never a folder of someone else's files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OnnxExportError(f"{out_dir}: exists and is not a folder")
    ours = {MANIFEST_FILE, HIDDEN_FILE, VERBALIZER_FILE}
    foreign = [
        p.name
        for p in out_dir.iterdir()
        if p.name not in ours and not p.name.endswith((".onnx", ".onnx.data", ".data"))
    ]
    if foreign:
        raise OnnxExportError(
            f"{out_dir}: not an ONNX export folder (it holds {foreign[0]!r}); "
            "choose a new or empty folder"
        )


def _swap_in(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------- manifest and cache
def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / MANIFEST_FILE
    if not path.exists():
        raise MissingExport(f"{path}: no ONNX export here (manifest not found)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        for key in ("format_version", "backbone", "dtype", "graphs", "files"):
            if key not in manifest:
                raise ValueError(f"field {key!r} is missing")
        manifest["backbone"]["fingerprint"]  # noqa: B018 - a KeyError here is corruption
        manifest["graphs"]["hidden"]["file"]  # noqa: B018
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptExport(f"{path}: unreadable manifest ({exc})") from exc
    return manifest


def verify_export(
    export_dir: str | Path,
    backbone: Backbone | None = None,
    *,
    hashes: bool = True,
    opset: int | None = None,
) -> dict[str, Any]:
    """Check an export against `backbone` and its own file hashes; return its manifest.

    Raises `MissingExport`, `StaleExport` (made from other weights, another dtype, an
    older format, or another opset when `opset` is given) or `CorruptExport` (a file
    missing or altered), each naming the file.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    manifest_path = export_dir / MANIFEST_FILE
    if manifest["format_version"] != FORMAT_VERSION:
        raise StaleExport(
            f"{manifest_path}: export format {manifest['format_version']}, this dynprompt "
            f"reads format {FORMAT_VERSION}"
        )
    if backbone is not None:
        made_from = manifest["backbone"]["fingerprint"]
        if made_from != backbone.fingerprint:
            raise StaleExport(
                f"{manifest_path}: exported from weights {made_from}, but backbone "
                f"{backbone.name_or_path!r} has fingerprint {backbone.fingerprint}"
            )
        if manifest["dtype"] != dtype_name(backbone.dtype):
            raise StaleExport(
                f"{manifest_path}: exported in {manifest['dtype']}, {dtype_name(backbone.dtype)} wanted"
            )
    if opset is not None and manifest.get("opset") != opset:
        raise StaleExport(f"{manifest_path}: opset {manifest.get('opset')}, opset {opset} wanted")
    files = manifest["files"]
    needed = [graph["file"] for graph in manifest["graphs"].values()]
    for name in needed + [n for n in files if n not in needed]:
        path = export_dir / name
        if name not in files:
            raise CorruptExport(f"{path}: not listed in {manifest_path}")
        if not path.is_file():
            raise CorruptExport(f"{path}: file missing from the export")
        if path.stat().st_size != files[name]["bytes"]:
            raise CorruptExport(
                f"{path}: {path.stat().st_size} bytes, the manifest says {files[name]['bytes']}"
            )
        if hashes and sha256_file(path) != files[name]["sha256"]:
            raise CorruptExport(f"{path}: sha256 does not match the manifest (file altered)")
    return manifest


def export_lock(export_dir: Path) -> Any:
    """The cross-process lock under which `export_dir` is (re)built: a `filelock` lock
    file beside it, so that processes that find the same export missing build it once."""
    from filelock import FileLock

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(export_dir.parent / f".{export_dir.name}.lock")


def ensure_export(
    backbone: Backbone,
    export_dir: str | Path,
    *,
    build: bool = True,
    force: bool = False,
    opset: int | None = None,
) -> dict[str, Any]:
    """Return the manifest of a valid export of `backbone` in `export_dir`, building it if
    it is missing, stale or corrupt (unless `build` is False: then that is an error).

    `opset` None accepts an export of any opset and builds at `DEFAULT_OPSET`; a number
    also treats an export at another opset as stale."""
    export_dir = Path(export_dir)
    try:
        if force:
            raise StaleExport(f"{export_dir}: rebuild requested")
        return verify_export(export_dir, backbone, opset=opset)
    except OnnxExportError as problem:
        if not build:
            raise OnnxExportError(
                f"{problem} — and building exports is disabled here; run "
                f"`dynprompt export-onnx --backbone {backbone.name_or_path}` to (re)build it"
            ) from problem
        first = problem
    with export_lock(export_dir):
        if not force:
            with contextlib.suppress(OnnxExportError):
                return verify_export(export_dir, backbone, opset=opset)  # built meanwhile
        if isinstance(first, MissingExport):
            log.info("exporting backbone %r to ONNX in %s", backbone.name_or_path, export_dir)
        else:
            kind = "stale" if isinstance(first, StaleExport) else "corrupt"
            log.warning(
                "rebuilding the ONNX export in %s, which is %s: %s", export_dir, kind, first
            )
        try:
            export_backbone(backbone, export_dir, opset=opset or DEFAULT_OPSET)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            if isinstance(first, MissingExport):
                raise OnnxExportError(
                    f"cannot build the ONNX export in {export_dir}: {why}"
                ) from exc
            raise OnnxExportError(f"{first} — and rebuilding the export failed: {why}") from exc
        return verify_export(export_dir, backbone)


def _runtime(
    export_dir: Path,
    manifest: dict[str, Any],
    device: torch.device,
    intra_op_threads: int | None,
    optimization_level: str,
    allow_spinning: bool | None = None,
) -> OrtGraphs:
    graphs = manifest["graphs"]

    def spec(key: str) -> GraphSpec | None:
        if key not in graphs:
            return None
        graph = graphs[key]
        return GraphSpec(export_dir / graph["file"], list(graph["inputs"]), graph["output"])

    hidden = spec("hidden")
    assert hidden is not None
    return OrtGraphs(
        hidden,
        spec("verbalizer"),
        hidden_size=int(manifest["backbone"]["hidden_size"]),
        vocab_size=manifest["backbone"].get("vocab_size"),
        dtype=DTYPES[manifest["dtype"]],
        device=device,
        intra_op_threads=intra_op_threads,
        optimization_level=optimization_level,
        allow_spinning=allow_spinning,
    )


def onnx_backbone_from(
    backbone: Backbone,
    export_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    intra_op_threads: int | None = None,
    optimization_level: str = "all",
    build: bool = True,
    release_torch_layers: bool = False,
    allow_spinning: bool | None = None,
) -> OnnxBackbone:
    """An `OnnxBackbone` over an already-loaded torch backbone and the export in `export_dir`
    (built there first if needed). It shares the torch backbone's model and tokenizer;
    `release_torch_layers` replaces every torch module except the input embedding with a
    stub (in place: only for a backbone nobody else uses)."""
    export_dir = Path(export_dir)
    manifest = ensure_export(backbone, export_dir, build=build)
    model = backbone.model
    onnx_backbone = OnnxBackbone(
        model, backbone.tokenizer, backbone.family, backbone.name_or_path, backbone.fingerprint
    )
    if release_torch_layers:
        released = drop_modules_except(model, model.get_input_embeddings())
        log.info("released %.1fM torch parameters now run by ONNX Runtime", released / 1e6)
    target = torch.device(device) if device is not None else backbone.device
    model.to(target)
    onnx_backbone.runtime = _runtime(
        export_dir, manifest, target, intra_op_threads, optimization_level, allow_spinning
    )
    onnx_backbone.export_dir = export_dir
    log.info("backbone %r runs in %s", backbone.name_or_path, onnx_backbone.describe())
    return onnx_backbone


def load_onnx_backbone(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
    intra_op_threads: int | None = None,
    optimization_level: str = "all",
    build: bool = True,
    allow_spinning: bool | None = None,
) -> Backbone:
    """Load a backbone whose encoder (and verbalizer) run in ONNX Runtime.

    The torch backbone is loaded for its tokenizer, embedding matrix, config and
    weights fingerprint; the export is found in (or built into) the cache
    (`cache_dir`, else `$DYNPROMPT_ONNX_CACHE_DIR`, else `~/.cache/dynprompt/onnx`) under
    `<fingerprint>/<dtype>/` and verified first. The torch transformer layers are then
    released — ONNX Runtime holds its own copy of them, and keeping both would double
    the backbone's memory in a server — so only the input embedding (which assembly
    needs) stays in torch, on `device`. On a CUDA device the CUDA execution provider is
    used when `onnxruntime-gpu` is installed, else the CPU provider (with a warning).
    `optimization_level` is ONNX Runtime's graph optimisation level (one of
    disable, basic, extended, layout, all); `intra_op_threads` None or 0 lets ONNX
    Runtime choose. `allow_spinning` lets idle intra-op threads busy-wait (faster on an
    idle machine, much slower on a CPU shared with other work); None follows
    `OMP_WAIT_POLICY` (PASSIVE: no spinning), the knob that does the same for torch.
    `build=False` refuses, instead of building, a missing, stale or
    corrupt export (for read-only deployments with a prebuilt cache).
    """
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}, "
            f"got {optimization_level!r}"
        )
    dtype_name(dtype)  # refuse an unsupported dtype before loading anything
    torch_backbone = load_backbone(name_or_path, "cpu", dtype)
    export_dir = cache_dir_for(torch_backbone.fingerprint, dtype, cache_dir)
    return onnx_backbone_from(
        torch_backbone,
        export_dir,
        device=device,
        intra_op_threads=intra_op_threads,
        optimization_level=optimization_level,
        build=build,
        release_torch_layers=True,
        allow_spinning=allow_spinning,
    )


# ------------------------------------------------------------------------------------ CLI
CHECK_INPUTS: list[tuple[str, str | None]] = [
    ("it 's a charming and often affecting journey .", None),
    ("unflinchingly bleak and desperate", None),
    ("the acting , costumes , music , cinematography and sound are all astounding .", None),
    ("a gorgeous , witty , seductive movie .", "it is not a film you will forget soon ."),
    ("too long", None),
]


def check_parity(torch_backbone: Backbone, onnx_backbone: OnnxBackbone) -> dict[str, float]:
    """Largest differences between the two backbones on a few sentences (and a pair),
    batched and one at a time, with a random 8-token prompt prefix in front of the text."""
    texts = [t for t, _ in CHECK_INPUTS]
    pairs = [p for _, p in CHECK_INPUTS]
    generator = torch.Generator().manual_seed(0)
    result: dict[str, float] = {}
    for label, rows in (("batched", list(range(len(texts)))), ("single", [0])):
        encoded = torch_backbone.tokenize([texts[r] for r in rows], [pairs[r] for r in rows], 64)
        embeds = torch_backbone.embed(encoded.input_ids).detach()
        vocab = torch_backbone.input_embeddings.weight.detach()
        low = 1000 if vocab.shape[0] > 5000 else 0  # real words, past BERT's [unused*] rows
        prompt = vocab[torch.randint(low, vocab.shape[0], (8,), generator=generator)]
        embeds = torch.cat([prompt[None].expand(len(rows), -1, -1), embeds], dim=1)
        mask = torch.cat(
            [torch.ones(len(rows), 8, dtype=torch.long), encoded.attention_mask], dim=1
        )
        types = torch.cat([torch.zeros(len(rows), 8, dtype=torch.long), encoded.token_type_ids], 1)
        with torch.no_grad():
            want = torch_backbone.hidden_states(embeds, mask, types).float()
            got = onnx_backbone.hidden_states(embeds, mask, types).float().to(want.device)
        result[f"hidden states, {label}"] = float((got - want)[mask.bool()].abs().max())
        if torch_backbone.family != "encoder":
            with torch.no_grad():
                want = torch_backbone.verbalizer_logits(embeds, mask).float()
                got = onnx_backbone.verbalizer_logits(embeds, mask).float().to(want.device)
            result[f"verbalizer logits, {label}"] = float((got - want).abs().max())
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynprompt export-onnx",
        description=(
            "Export a backbone to ONNX for `dynprompt serve --backend onnx`: a graph from "
            "assembled input embeddings (and attention mask, and segment ids for BERT-family "
            "models) to the last hidden states, plus, for T5 and decoder-only models, a graph "
            "to the verbalizer's vocabulary logits. Prompt assembly, routers and heads stay in "
            "torch. Without --out the export goes into the cache the server reads, "
            "<cache>/<fingerprint>/<dtype>/; an up-to-date export there is reused."
        ),
        epilog=(
            f"cache root: --cache-dir, else ${CACHE_ENV} (or the older ${LEGACY_CACHE_ENV}), else "
            "~/.cache/dynprompt/onnx. "
            "Exit status: 0 done, 1 --check found a difference over the tolerance, "
            "2 the backbone or export could not be used."
        ),
    )
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="backbone name or local folder (default: %(default)s)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="write the export into this folder")
    where.add_argument("--cache-dir", type=Path, help="cache root to export into")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="graph dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help="ONNX opset (default: %(default)s; 23 exports attention as the fused ONNX "
        "Attention op, a little faster on CPU, but its CUDA kernels are recent: check on "
        "your GPU before serving it)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if an up-to-date export exists"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="afterwards, compare ONNX Runtime with torch on a few sentences and a pair",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest difference --check accepts (default: 1e-4 float32, 2e-2 float16)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads for --check"
    )
    return parser


def export_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = DTYPES[args.dtype]
    try:
        backbone = load_backbone(args.backbone, "cpu", dtype)
        out = args.out or cache_dir_for(backbone.fingerprint, dtype, args.cache_dir)
        manifest = ensure_export(backbone, out, force=args.force, opset=args.opset)
        print(f"ONNX export of {args.backbone!r} ({backbone.family}, {args.dtype}) in {out}")
        for name, info in manifest["files"].items():
            print(f"  {name:<24} {info['bytes'] / 1e6:9.1f} MB  sha256 {info['sha256'][:16]}")
        if not args.check:
            return 0
        onnx_backbone = onnx_backbone_from(
            backbone, out, intra_op_threads=args.threads, optimization_level="all", build=False
        )
        tolerance = (
            args.tolerance
            if args.tolerance is not None
            else (1e-4 if dtype == torch.float32 else 2e-2)
        )
        worst = 0.0
        print(f"parity with torch ({onnx_backbone.describe()}):")
        for what, diff in check_parity(backbone, onnx_backbone).items():
            worst = max(worst, diff) if diff == diff else float("inf")
            print(f"  max |difference| {what:<28} {diff:.3g}")
        verdict = "ok" if worst <= tolerance else "FAILED"
        print(f"check {verdict} (tolerance {tolerance:g})")
        return 0 if worst <= tolerance else 1
    except BackboneError as exc:
        print(f"dynprompt export-onnx: {exc}", file=sys.stderr)
        return 2
