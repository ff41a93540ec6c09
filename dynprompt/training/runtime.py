"""Where work runs: device identity and loading a backbone without library noise.

`torch.device("cuda")` and `torch.device("cuda:0")` are the same GPU but compare
unequal, and Accelerate reports the first while a loaded model reports the second,
so devices are compared after filling in the index. Transformers draws a "Loading
weights" bar for every model it loads; in `train`, `eval` and `predict` that bar is
noise between the user's own progress lines, so it is switched off around the load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynprompt.models.backbone import Backbone


def normalise_device(device: torch.device | str) -> torch.device:
    """The device with its index spelled out: a bare `cuda` is the current CUDA device
    (0 when there is none), `cpu` and `meta` have no index."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return torch.device(device.type)
    if device.index is not None:
        return device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type, 0)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether `a` and `b` name the same device (`cuda` and `cuda:0` do, on GPU 0)."""
    return normalise_device(a) == normalise_device(b)


def quiet_load_backbone(name_or_path: str, device: torch.device | str = "cpu") -> Backbone:
    """`load_backbone` without transformers' "Loading weights" progress bar."""
    from transformers.utils import logging as hf_logging

    from dynprompt.models.backbone import load_backbone

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_backbone(name_or_path, device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
