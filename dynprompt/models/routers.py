"""Routers: the small linear maps that choose each input's prompt length, position and mix.

Training samples discrete choices with straight-through Gumbel-softmax; inference
takes the argmax with no noise, so a row's decision depends on that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprompt.models.config import RouterSpec

NEG_INF = -1e9


@dataclass
class Choice:
    """One discrete decision for a batch: the hard index and, in training, soft weights."""

    index: Tensor  # (B,) long
    soft: Tensor | None = None  # (B, C): Gumbel-softmax weights, None at inference


@dataclass
class Routing:
    length: Tensor  # (B,) long: prompt length m
    before: Tensor  # (B,) long: prompt tokens before the text b
    pool_weights: Tensor | None = None  # (B, K)
    length_choice: Choice | None = None  # over m = 1..L (index 0 means m = 1)
    position_choice: Choice | None = None  # over b = 0..L

    @property
    def after(self) -> Tensor:
        return self.length - self.before


def gumbel_choice(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Choice:
    """Sample a hard one-hot choice and keep the Gumbel-softmax weights for the backward pass."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    noisy = (logits + gumbel) / tau
    return Choice(index=noisy.argmax(dim=-1), soft=F.softmax(noisy, dim=-1))


def greedy_choice(logits: Tensor) -> Choice:
    return Choice(index=logits.argmax(dim=-1))


class Routers(nn.Module):
    """Every router a checkpoint may use; which exist follows from its `RouterSpec`."""

    def __init__(self, spec: RouterSpec, prompt_length: int, pool_size: int, dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.prompt_length = prompt_length
        self.position_logits: nn.Parameter | None = None
        self.position: nn.Linear | None = None
        self.length: nn.Linear | None = None
        self.pool: nn.Linear | None = None
        if spec.position == "task":
            self.position_logits = nn.Parameter(torch.zeros(prompt_length + 1))
        elif spec.position == "instance":
            self.position = _linear(dim, prompt_length + 1)
        if spec.length == "instance":
            self.length = _linear(dim, prompt_length)
        if spec.pool == "instance":
            self.pool = _linear(dim, pool_size)

    def forward(
        self,
        features: Tensor | None,
        batch: int,
        device: torch.device,
        *,
        tau: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Decide (m, b, β) for every row; `tau` set means training (Gumbel), else argmax."""
        L = self.prompt_length

        def choose(logits: Tensor) -> Choice:
            return greedy_choice(logits) if tau is None else gumbel_choice(logits, tau, generator)

        length_choice = None
        if self.length is not None:
            assert features is not None
            length_choice = choose(self.length(features))
            m = length_choice.index + 1
        else:
            m = torch.full((batch,), L, dtype=torch.long, device=device)

        position_choice = None
        if self.position is not None or self.position_logits is not None:
            if self.position is not None:
                assert features is not None
                logits = self.position(features)
            else:
                assert self.position_logits is not None
                logits = self.position_logits[None, :].expand(batch, -1)
            # The length is chosen first; a split beyond it does not exist.
            slots = torch.arange(L + 1, device=device)
            logits = logits.masked_fill(slots[None, :] > m[:, None], NEG_INF)
            position_choice = choose(logits)
            b = position_choice.index
        elif self.spec.position == "none":
            b = torch.zeros_like(m)
        else:
            b = m.clone()

        pool_weights = None
        if self.pool is not None:
            assert features is not None
            pool_weights = F.softmax(self.pool(features), dim=-1)
        return Routing(m, b, pool_weights, length_choice, position_choice)


def _linear(dim: int, out: int) -> nn.Linear:
    layer = nn.Linear(dim, out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer
