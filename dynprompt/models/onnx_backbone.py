"""The ONNX Runtime compute backend: a `Backbone` whose two forwards run exported graphs.

`OnnxBackbone` keeps everything above the backbone unchanged — tokenizer,
special-token template, the input embedding matrix (`embed` stays in torch
because the embedding lookup is part of prompt assembly), config facts and the
weights' fingerprint — and overrides only `hidden_states` and
`verbalizer_logits`, which run ONNX Runtime sessions over the exported graphs
(see `onnx_export`). Assembly, routers and heads therefore run exactly the
code of the torch path.

Tensors cross into ONNX Runtime through I/O binding: inputs are bound at their
torch storage and outputs are written straight into preallocated torch
tensors, so a batch never takes a detour through numpy — and, on a GPU with the
CUDA execution provider (`onnxruntime-gpu`), never through host memory.

The backend is inference-only: ONNX Runtime has no autograd, so a forward that
would need a gradient is refused, and the `finetune` baseline (whose backbone
weights are its own, trained copy) cannot run on a fixed export of the
pretrained weights; both errors say so and point to the torch backend.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynprompt.models.backbone import Backbone, BackboneError

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")
ORT_MISSING = (
    "the ONNX backend needs onnxruntime (and onnx, onnxscript to export): "
    "pip install 'dynprompt[onnx]' (or 'dynprompt[gpu]' for the CUDA execution provider)"
)

_NUMPY_TYPES: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackboneError(ORT_MISSING) from exc
    return onnxruntime


class InOnnxRuntime(nn.Module):
    """Stands in for a torch submodule whose computation now runs in ONNX Runtime."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.replaced = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise BackboneError(
            f"torch module {self.replaced!r} of this backbone was released: it runs in ONNX "
            "Runtime; call hidden_states / verbalizer_logits, or load the torch backend"
        )


def drop_modules_except(model: nn.Module, keep: nn.Module, prefix: str = "") -> int:
    """Replace, in place, every submodule that neither is nor contains `keep` with a stub.

    Returns how many parameters were released. Weights tied to `keep` (GPT-2's and
    T5's output embedding) stay alive through `keep` itself.
    """
    kept = {id(p) for p in keep.parameters()}
    released = 0
    for name, child in list(model.named_children()):
        if child is keep:
            continue
        if any(module is keep for module in child.modules()):
            released += drop_modules_except(child, keep, f"{prefix}{name}.")
            continue
        released += sum(p.numel() for p in child.parameters() if id(p) not in kept)
        setattr(model, name, InOnnxRuntime(prefix + name))
    return released


@dataclass
class GraphSpec:
    """One exported graph as the runtime needs it: file, input and output names."""

    path: Path
    inputs: list[str]
    output: str


class OrtGraphs:
    """ONNX Runtime sessions for the hidden-states graph and (optionally) the verbalizer graph."""

    def __init__(
        self,
        hidden: GraphSpec,
        verbalizer: GraphSpec | None,
        *,
        hidden_size: int,
        vocab_size: int | None,
        dtype: torch.dtype,
        device: torch.device,
        intra_op_threads: int | None = None,
        optimization_level: str = "all",
        allow_spinning: bool | None = None,
    ) -> None:
        ort = import_onnxruntime()
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}, "
                f"got {optimization_level!r}"
            )
        if dtype not in (torch.float32, torch.float16):
            raise BackboneError(f"the ONNX backend runs float32 or float16, not {dtype}")
        self.hidden_spec, self.verbalizer_spec = hidden, verbalizer
        self.hidden_size, self.vocab_size, self.dtype = hidden_size, vocab_size, dtype
        self.device = device  # where the torch side (embeddings, results) lives
        available = ort.get_available_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" in available:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.ort_device_type, self.ort_device_id = "cuda", int(index)
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": int(index)}),
                "CPUExecutionProvider",
            ]
        else:
            if device.type != "cpu":
                log.warning(
                    "device %s requested but onnxruntime has no CUDA execution provider "
                    "(available: %s); running ONNX Runtime on the CPU. Install the 'gpu' extra "
                    "(onnxruntime-gpu) to run on the GPU.",
                    device,
                    ", ".join(available),
                )
            elif dtype == torch.float16:
                log.warning("float16 on ONNX Runtime's CPU provider is slow; use float32 on CPU")
            self.ort_device_type, self.ort_device_id = "cpu", 0
            providers = ["CPUExecutionProvider"]
        self.ort_device = (
            torch.device("cuda", self.ort_device_id)
            if self.ort_device_type == "cuda"
            else torch.device("cpu")
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "layout": getattr(
                ort.GraphOptimizationLevel,
                "ORT_ENABLE_LAYOUT",
                ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            ),
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization_level]
        if intra_op_threads is not None:
            if intra_op_threads < 0:
                raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
            options.intra_op_num_threads = intra_op_threads  # 0 = ONNX Runtime's default
        if allow_spinning is None:  # follow the policy the user set for torch's OpenMP threads
            allow_spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        self.allow_spinning = allow_spinning
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise
        self.optimization_level, self.intra_op_threads = optimization_level, intra_op_threads
        self.hidden = self._session(ort, hidden.path, options, providers)
        self.verbalizer = (
            self._session(ort, verbalizer.path, options, providers) if verbalizer else None
        )
        self.providers = list(self.hidden.get_providers())

    @staticmethod
    def _session(ort: Any, path: Path, options: Any, providers: list[Any]) -> Any:
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise BackboneError(f"{path}: ONNX Runtime cannot load this graph: {exc}") from exc

    # -- running ---------------------------------------------------------------------------
    def _run(
        self,
        session: Any,
        inputs: dict[str, Tensor],
        output: str,
        shape: tuple[int, ...],
        stay: bool = False,
    ) -> Tensor:
        """Run one graph with I/O binding; `stay` keeps the result on ONNX Runtime's device."""
        binding = session.io_binding()
        alive = []  # the bound tensors must outlive the run
        for name, tensor in inputs.items():
            tensor = tensor.to(self.ort_device).contiguous()
            alive.append(tensor)
            binding.bind_input(
                name,
                self.ort_device_type,
                self.ort_device_id,
                _NUMPY_TYPES[tensor.dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        result = torch.empty(shape, dtype=self.dtype, device=self.ort_device)
        binding.bind_output(
            output,
            self.ort_device_type,
            self.ort_device_id,
            _NUMPY_TYPES[self.dtype],
            tuple(result.shape),
            result.data_ptr(),
        )
        if self.ort_device_type == "cuda":
            # ONNX Runtime computes on its own stream: the inputs torch wrote must be ready.
            torch.cuda.current_stream(self.ort_device).synchronize()
            binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        if self.ort_device_type == "cuda":
            binding.synchronize_outputs()
        del alive
        return result if stay else result.to(self.device)

    def run_hidden(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None,
        stay: bool = False,
    ) -> Tensor:
        batch, seq = inputs_embeds.shape[:2]
        feeds = {
            "inputs_embeds": inputs_embeds.to(self.dtype),
            "attention_mask": attention_mask.to(torch.int64),
        }
        if "token_type_ids" in self.hidden_spec.inputs:
            feeds["token_type_ids"] = (
                token_type_ids.to(torch.int64)
                if token_type_ids is not None
                else torch.zeros_like(feeds["attention_mask"])
            )
        shape = (batch, seq, self.hidden_size)
        if batch == 0 or seq == 0:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self._run(self.hidden, feeds, self.hidden_spec.output, shape, stay)

    def run_verbalizer(self, last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
        assert self.verbalizer is not None and self.verbalizer_spec is not None
        assert self.vocab_size is not None
        feeds = {
            "last_hidden_state": last_hidden_state.to(self.dtype),
            "attention_mask": attention_mask.to(torch.int64),
        }
        shape = (last_hidden_state.shape[0], self.vocab_size)
        if shape[0] == 0:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self._run(self.verbalizer, feeds, self.verbalizer_spec.output, shape)


@dataclass(eq=False)
class OnnxBackbone(Backbone):
    """A `Backbone` whose encoder (and verbalizer) run in ONNX Runtime; inference only."""

    runtime: OrtGraphs | None = field(default=None, repr=False)
    export_dir: Path | None = None

    @property
    def ort(self) -> OrtGraphs:
        if self.runtime is None:
            raise BackboneError("this OnnxBackbone has no ONNX Runtime sessions attached")
        return self.runtime

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxBackbone:
        raise BackboneError(
            "the ONNX backend cannot copy its backbone: the 'finetune' baseline trains its own "
            "copy of the backbone weights, which a fixed ONNX export of the pretrained weights "
            "cannot run; serve finetune checkpoints with the torch backend"
        )

    @staticmethod
    def _inference_only(inputs_embeds: Tensor) -> None:
        if torch.is_grad_enabled() and inputs_embeds.requires_grad:
            raise BackboneError(
                "the ONNX backend is inference-only (no gradients flow through ONNX Runtime); "
                "train with the torch backend"
            )

    def hidden_states(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states (T5: the encoder's), computed by the exported graph.

        Token types reach the graph only for BERT-family models whose type vocabulary
        has more than one entry (pairs need segment ids); position ids are 0..S-1 along
        the assembled sequence, as in the torch path.
        """
        self._inference_only(inputs_embeds)
        return self.ort.run_hidden(inputs_embeds, attention_mask, token_type_ids)

    def verbalizer_logits(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        label_ids: Tensor | None = None,
    ) -> Tensor:
        """Vocabulary logits at T5's first decoder step or a decoder's last real position
        (only the `label_ids` columns, when given)."""
        self._inference_only(inputs_embeds)
        if self.family == "encoder":
            raise BackboneError("an encoder backbone has no verbalizer logits; use a linear head")
        runtime = self.ort
        if runtime.verbalizer is None:
            raise BackboneError(f"the ONNX export in {self.export_dir} has no verbalizer graph")
        hidden = runtime.run_hidden(inputs_embeds, attention_mask, None, stay=True)
        logits = runtime.run_verbalizer(hidden, attention_mask)
        return logits if label_ids is None else logits[:, label_ids.to(logits.device)]

    def label_word_log_probs(self, *args: Any, **kwargs: Any) -> Tensor:
        raise BackboneError(
            "the ONNX backend scores label words by their first token only; serve a "
            "checkpoint with head.word_score 'mean' with the torch backend"
        )

    def describe(self) -> str:
        runtime = self.ort
        return (
            f"ONNX Runtime ({', '.join(runtime.providers)}; optimisation {runtime.optimization_level}; "
            f"intra-op threads {runtime.intra_op_threads or 'default'}"
            f"{'' if runtime.allow_spinning else ', no spinning'}; {runtime.dtype}) "
            f"from {self.export_dir}"
        )
