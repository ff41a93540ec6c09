"""The dynamic-prompt classifier: a frozen backbone, a prompt bank, routers and a head."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprompt.models.assembly import Assembled
from dynprompt.models.backbone import Backbone, Encoded, prompt_init_rows
from dynprompt.models.config import DynPromptConfig
from dynprompt.models.pipeline import (
    Group,
    forward_batch,
    frozen_features,
    head_logits,
    masked_mean,
)
from dynprompt.models.routers import Routers, Routing


@dataclass
class Output:
    logits: Tensor  # (B, C) float32
    routing: Routing

    @property
    def probs(self) -> Tensor:
        return F.softmax(self.logits, dim=-1)


class DynPromptModel(nn.Module):
    """One checkpoint's trainable parts, used over a backbone it does not own.

    The backbone is deliberately not a registered submodule (except for the
    `finetune` baseline), so `parameters()` and `state_dict()` hold exactly what
    trains and what a checkpoint stores, and many models can share one backbone.
    """

    def __init__(self, config: DynPromptConfig, backbone: Backbone) -> None:
        super().__init__()
        if config.variant == "finetune":
            # Its backbone trains: give it a private copy, never one other models share.
            backbone = copy.deepcopy(backbone)
        if config.backbone.family != backbone.family:
            raise ValueError(
                f"config is for a {config.backbone.family} backbone, got {backbone.family}"
            )
        self.config = config
        self.backbone = backbone
        dim = backbone.hidden_size
        length, pool = config.prompt.length, config.prompt.pool_size
        self.prompt = nn.Parameter(self._init_prompt(pool, length, dim)) if length else None
        self.routers = Routers(config.router, length, pool, dim)
        self.head: nn.Linear | None = None
        self.label_ids: Tensor | None
        if config.head.type == "linear":
            self.head = nn.Linear(dim, len(config.head.labels))
            self.register_buffer("label_ids", None, persistent=False)
        else:
            assert config.head.label_words is not None
            ids = backbone.label_word_ids(config.head.label_words, config.head.word_score)
            self.register_buffer("label_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        if config.variant == "finetune":
            # The one variant that trains (and stores) the backbone itself.
            self.backbone_model = backbone.model
            backbone.model.requires_grad_(True)
        self.to(backbone.device)

    # -- set-up --------------------------------------------------------------------------
    def _init_prompt(self, pool: int, length: int, dim: int) -> Tensor:
        """Sampled real-word rows of the input embeddings (`prompt_init_rows` says which
        rows count as words for each kind of vocabulary), or uniform noise of their scale."""
        weight = self.backbone.input_embeddings.weight.detach()
        if self.config.prompt.init == "uniform":
            scale = float(weight.float().cpu().std())
            return torch.empty(pool, length, dim).uniform_(-scale, scale)
        candidates = prompt_init_rows(self.backbone)
        picks = candidates[torch.randint(len(candidates), (pool * length,))]
        return weight[picks.to(weight.device)].float().cpu().reshape(pool, length, dim).clone()

    @property
    def labels(self) -> list[str]:
        return list(self.config.head.labels)

    @property
    def name(self) -> str:
        return self.config.name

    def train(self, mode: bool = True) -> DynPromptModel:
        """Only `finetune` lets the backbone leave eval mode: a frozen backbone keeps
        dropout off, so training sees the same function that serving runs."""
        super().train(mode)
        self.backbone.model.train(mode and self.config.variant == "finetune")
        return self

    # -- the pieces the batch pipeline calls ----------------------------------------------
    def router_features(self, encoded: Encoded, token_embeds: Tensor) -> Tensor:
        """u_i: mean of the prompt-free input's embeddings or last hidden states."""
        if self.config.router.feature == "embeddings":
            return masked_mean(token_embeds.detach().float(), encoded.attention_mask)
        return frozen_features(self.backbone, encoded, token_embeds)

    def prompt_vectors(self, routing: Routing, batch: int) -> Tensor:
        """p_i for each row: (B, L, d); the pool's mixture when the pool is in use."""
        if self.prompt is None:
            return torch.zeros(batch, 0, self.backbone.hidden_size, device=self.backbone.device)
        if routing.pool_weights is not None:
            return torch.einsum("bk,kld->bld", routing.pool_weights, self.prompt)
        return self.prompt[0].unsqueeze(0).expand(batch, -1, -1)

    def scores(self, assembled: Assembled) -> Tensor:
        """Class logits (float32) from the head over an assembled batch."""
        rows = assembled.inputs_embeds.shape[0]
        return head_logits(self.backbone, [Group(self, 0, rows)], assembled)[0]

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        encoded: Encoded,
        *,
        tau: float | None = None,
        generator: torch.Generator | None = None,
        features: Tensor | None = None,
    ) -> Output:
        """The batch pipeline with this model on every row.

        `tau` given: training with straight-through Gumbel-softmax at that temperature.
        `tau` None: inference, argmax decisions that depend on each row alone.
        `features`: router features computed earlier for these rows (they depend on the
        frozen backbone only, so a trainer may cache them across epochs)."""
        rows = encoded.input_ids.shape[0]
        out = forward_batch(
            self.backbone,
            [Group(self, 0, rows)],
            encoded,
            tau=tau,
            generator=generator,
            features=features if self.config.uses_router_features else None,
        )
        return Output(out.logits[0], out.routings[0])
