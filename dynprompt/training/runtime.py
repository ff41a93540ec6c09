"""Where work runs: device identity.

`torch.device("cuda")` and `torch.device("cuda:0")` are the same GPU but compare
unequal, and Accelerate reports the first while a loaded model reports the second,
so devices are compared after filling in the index.
"""

from __future__ import annotations

import torch


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
