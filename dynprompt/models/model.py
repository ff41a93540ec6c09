"""The dynamic-prompt classifier: a frozen backbone, a prompt bank, routers and a head."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprompt.models.assembly import Assembled, assemble, assemble_arrangements
from dynprompt.models.backbone import Backbone, Encoded
from dynprompt.models.config import DynPromptConfig
from dynprompt.models.routers import Routers, Routing


@dataclass
class Output:
    logits: Tensor  # (B, C) float32
    routing: Routing

    @property
    def probs(self) -> Tensor:
        return F.softmax(self.logits, dim=-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


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
            ids = backbone.label_word_ids(config.head.label_words)
            self.register_buffer("label_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        if config.variant == "finetune":
            # The one variant that trains (and stores) the backbone itself.
            self.backbone_model = backbone.model
            backbone.model.requires_grad_(True)
        self.to(backbone.device)

    # -- set-up --------------------------------------------------------------------------
    def _init_prompt(self, pool: int, length: int, dim: int) -> Tensor:
        weight = self.backbone.input_embeddings.weight.detach().float().cpu()
        if self.config.prompt.init == "uniform":
            scale = float(weight.std())
            return torch.empty(pool, length, dim).uniform_(-scale, scale)
        vocab = weight.shape[0]
        special = set(self.backbone.tokenizer.all_special_ids)
        low = 1000 if vocab > 5000 else 0  # skip BERT's [unused*] rows: they never trained
        candidates = torch.tensor([i for i in range(low, vocab) if i not in special])
        picks = candidates[torch.randint(len(candidates), (pool * length,))]
        return weight[picks].reshape(pool, length, dim).clone()

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

    # -- the pieces (shared with the mixed-model path in `inference`) ----------------------
    def router_features(self, encoded: Encoded, token_embeds: Tensor) -> Tensor:
        """u_i: mean of the prompt-free input's embeddings or last hidden states."""
        mask = encoded.attention_mask
        if self.config.router.feature == "embeddings":
            return masked_mean(token_embeds.detach().float(), mask)
        was_training = self.backbone.model.training
        self.backbone.model.eval()
        try:
            with torch.no_grad():
                hidden = self.backbone.hidden_states(token_embeds, mask, encoded.token_type_ids)
        finally:
            self.backbone.model.train(was_training)
        return masked_mean(hidden.float(), mask)

    def prompt_vectors(self, routing: Routing, batch: int) -> Tensor:
        """p_i for each row: (B, L, d); the pool's mixture when the pool is in use."""
        if self.prompt is None:
            return torch.zeros(batch, 0, self.backbone.hidden_size, device=self.backbone.device)
        if routing.pool_weights is not None:
            return torch.einsum("bk,kld->bld", routing.pool_weights, self.prompt)
        return self.prompt[0].unsqueeze(0).expand(batch, -1, -1)

    def scores(self, assembled: Assembled) -> Tensor:
        """Class logits (float32) from the head over an assembled batch."""
        if self.head is not None:
            hidden = self.backbone.hidden_states(
                assembled.inputs_embeds, assembled.attention_mask, assembled.token_type_ids
            )
            if self.config.head.pooling == "first":
                pooled = hidden[:, 0].float()
            else:
                pooled = masked_mean(hidden.float(), assembled.attention_mask)
            return self.head(pooled)
        assert self.label_ids is not None
        logits = self.backbone.verbalizer_logits(
            assembled.inputs_embeds, assembled.attention_mask, assembled.token_type_ids
        )
        return logits[:, self.label_ids].float()

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        encoded: Encoded,
        *,
        tau: float | None = None,
        generator: torch.Generator | None = None,
        features: Tensor | None = None,
    ) -> Output:
        """`tau` given: training with straight-through Gumbel-softmax at that temperature.
        `tau` None: inference, argmax decisions that depend on each row alone.
        `features`: router features computed earlier for these rows (they depend on the
        frozen backbone only, so a trainer may cache them across epochs)."""
        backbone = self.backbone
        batch = encoded.input_ids.shape[0]
        token_embeds = backbone.embed(encoded.input_ids)
        if features is None and self.config.uses_router_features:
            features = self.router_features(encoded, token_embeds)
        routing = self.routers(features, batch, token_embeds.device, tau=tau, generator=generator)
        prompts = self.prompt_vectors(routing, batch)
        pad = backbone.embed(torch.tensor([backbone.pad_id], device=token_embeds.device))[0]
        assembled = assemble(
            token_embeds,
            encoded.token_type_ids,
            encoded.lengths,
            prompts,
            routing.length,
            routing.before,
            pad,
            n_lead=backbone.n_lead,
            n_trail=backbone.n_trail,
        )
        if tau is not None:
            correction = straight_through_correction(
                token_embeds, encoded, prompts, routing, pad, backbone, assembled
            )
            if correction is not None:
                assembled.inputs_embeds = assembled.inputs_embeds + correction
        return Output(self.scores(assembled), routing)


def straight_through_correction(
    token_embeds: Tensor,
    encoded: Encoded,
    prompts: Tensor,
    routing: Routing,
    pad: Tensor,
    backbone: Backbone,
    assembled: Assembled,
) -> Tensor | None:
    """Σ_j (y_j − sg(y_j))·A_j for each discrete decision: exactly zero in the forward
    pass (so the output is the hard arrangement bit for bit), and in the backward pass
    the gradient of Σ_j y_j·A_j with respect to the router's soft weights y.

    With two dynamic decisions, each varies around the sampled pair while the other
    stays fixed, as the design allows.
    """
    seq_len = assembled.inputs_embeds.shape[1]
    total: Tensor | None = None
    m, b = routing.length, routing.before
    candidates: list[tuple[Tensor, Tensor, Tensor]] = []
    choice = routing.position_choice
    if choice is not None and choice.soft is not None:
        slots = torch.arange(choice.soft.shape[1], device=m.device)
        cand_b = torch.minimum(slots[None, :], m[:, None])  # masked splits get weight 0
        candidates.append((choice.soft, m[:, None].expand_as(cand_b), cand_b))
    choice = routing.length_choice
    if choice is not None and choice.soft is not None:
        cand_m = torch.arange(1, choice.soft.shape[1] + 1, device=m.device)[None, :].expand(
            m.shape[0], -1
        )
        cand_b = torch.minimum(b[:, None], cand_m) if routing.position_choice else cand_m
        candidates.append((choice.soft, cand_m, cand_b))
    for soft, cand_m, cand_b in candidates:
        arrangements = assemble_arrangements(
            token_embeds,
            encoded.token_type_ids,
            encoded.lengths,
            prompts,
            cand_m,
            cand_b,
            pad,
            n_lead=backbone.n_lead,
            n_trail=backbone.n_trail,
            seq_len=seq_len,
        )
        weights = (soft - soft.detach()).to(arrangements.dtype)
        term = torch.einsum("bj,bjsd->bsd", weights, arrangements)
        total = term if total is None else total + term
    return total
