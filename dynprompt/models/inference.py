"""Inference over rows of many models that share one backbone, in one backbone pass.

This is what makes per-input prompt placement servable: each row is routed by
its own model, gets its own prompt length and split, and all rows still go
through the backbone together. The router-feature pass (for models whose router
reads the backbone) is batched too. A single model's `forward` computes the
same numbers for the same rows; `tests/test_models.py` checks that.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dynprompt.models.assembly import Assembled, assemble
from dynprompt.models.backbone import Backbone, Encoded
from dynprompt.models.model import DynPromptModel, masked_mean


@dataclass
class RowResult:
    probs: list[float]  # over the row's model's labels
    prompt_length: int
    tokens_before: int
    pool_weights: list[float] | None


@dataclass
class BatchStats:
    rows: int
    padded_tokens: int  # rows x assembled width, prompts included
    real_tokens: int  # non-padding positions, prompts included
    prompt_tokens: int


@torch.no_grad()
def classify_rows(
    backbone: Backbone, models: Sequence[DynPromptModel], encoded: Encoded
) -> tuple[list[RowResult], BatchStats]:
    """Classify row i of `encoded` with `models[i]`; every model must use `backbone`."""
    batch = encoded.input_ids.shape[0]
    if len(models) != batch:
        raise ValueError(f"{len(models)} models for {batch} rows")
    for model in models:
        if model.backbone is not backbone:
            raise ValueError(f"model {model.name!r} does not run on this backbone instance")
    device = backbone.device
    encoded = encoded.to(device)
    token_embeds = backbone.embed(encoded.input_ids)
    mask = encoded.attention_mask

    groups: dict[int, list[int]] = defaultdict(list)
    by_id: dict[int, DynPromptModel] = {}
    for row, model in enumerate(models):
        groups[id(model)].append(row)
        by_id[id(model)] = model

    # Router features: the backbone pass runs once over every row whose model needs it.
    features = masked_mean(token_embeds.float(), mask)
    need_backbone = [
        r
        for r, m in enumerate(models)
        if m.config.uses_router_features and m.config.router.feature == "backbone"
    ]
    if need_backbone:
        sub = encoded.select(need_backbone)
        hidden = backbone.hidden_states(
            token_embeds[need_backbone, : sub.input_ids.shape[1]],
            sub.attention_mask,
            sub.token_type_ids,
        )
        features[need_backbone] = masked_mean(hidden.float(), sub.attention_mask)

    # Per model: decisions and prompt vectors, scattered into batch-wide tensors.
    max_len = max(m.config.prompt.length for m in models)
    prompts = torch.zeros(batch, max_len, backbone.hidden_size, device=device, dtype=backbone.dtype)
    m_all = torch.zeros(batch, dtype=torch.long, device=device)
    b_all = torch.zeros(batch, dtype=torch.long, device=device)
    pools: dict[int, Tensor] = {}
    for key, rows in groups.items():
        model = by_id[key]
        index = torch.tensor(rows, device=device)
        routing = model.routers(features[index], len(rows), device)
        m_all[index] = routing.length
        b_all[index] = routing.before
        vectors = model.prompt_vectors(routing, len(rows))
        prompts[index, : vectors.shape[1]] = vectors.to(prompts.dtype)
        if routing.pool_weights is not None:
            pools.update(zip(rows, routing.pool_weights, strict=True))

    pad = backbone.embed(torch.tensor([backbone.pad_id], device=device))[0]
    assembled = assemble(
        token_embeds,
        encoded.token_type_ids,
        encoded.lengths,
        prompts,
        m_all,
        b_all,
        pad,
        n_lead=backbone.n_lead,
        n_trail=backbone.n_trail,
    )

    # One backbone pass per head kind (encoders only ever have linear heads); then each
    # model's head once over all of its rows.
    probs: dict[int, Tensor] = {}
    linear_rows = [r for r, m in enumerate(models) if m.head is not None]
    verbal_rows = [r for r, m in enumerate(models) if m.head is None]
    if linear_rows:
        part = _select(assembled, linear_rows)
        hidden = backbone.hidden_states(
            part.inputs_embeds, part.attention_mask, part.token_type_ids
        )
        pooled_mean = masked_mean(hidden.float(), part.attention_mask)
        pooled_first = hidden[:, 0].float()
        for model, positions in _by_model(models, linear_rows):
            assert model.head is not None
            source = pooled_first if model.config.head.pooling == "first" else pooled_mean
            out = F.softmax(model.head(source[positions]), dim=-1)
            for i, p in enumerate(positions):
                probs[linear_rows[p]] = out[i]
    if verbal_rows:
        part = _select(assembled, verbal_rows)
        logits = backbone.verbalizer_logits(
            part.inputs_embeds, part.attention_mask, part.token_type_ids
        )
        for model, positions in _by_model(models, verbal_rows):
            assert model.label_ids is not None
            out = F.softmax(logits[positions][:, model.label_ids].float(), dim=-1)
            for i, p in enumerate(positions):
                probs[verbal_rows[p]] = out[i]

    # One device-to-host copy for everything the caller reads.
    prob_lists = [probs[r].tolist() for r in range(batch)]
    lengths, befores = m_all.tolist(), b_all.tolist()
    pool_lists = {r: w.tolist() for r, w in pools.items()}
    results = [
        RowResult(
            probs=prob_lists[r],
            prompt_length=int(lengths[r]),
            tokens_before=int(befores[r]),
            pool_weights=pool_lists.get(r),
        )
        for r in range(batch)
    ]
    width = assembled.attention_mask.shape[1]
    stats = BatchStats(
        rows=batch,
        padded_tokens=batch * width,
        real_tokens=int(assembled.attention_mask.sum()),
        prompt_tokens=int(sum(lengths)),
    )
    return results, stats


def _by_model(
    models: Sequence[DynPromptModel], rows: list[int]
) -> list[tuple[DynPromptModel, list[int]]]:
    """Group `rows` by model; positions are indices into `rows`."""
    groups: dict[int, tuple[DynPromptModel, list[int]]] = {}
    for position, row in enumerate(rows):
        groups.setdefault(id(models[row]), (models[row], []))[1].append(position)
    return list(groups.values())


def _select(assembled: Assembled, rows: list[int]) -> Assembled:
    if len(rows) == assembled.inputs_embeds.shape[0]:
        return assembled
    index = torch.tensor(rows, device=assembled.inputs_embeds.device)
    width = int(assembled.attention_mask[index].sum(dim=1).max())
    return Assembled(
        assembled.inputs_embeds[index, :width],
        assembled.attention_mask[index, :width],
        assembled.token_type_ids[index, :width],
        assembled.position_ids[index, :width],
    )


def predict(
    model: DynPromptModel, texts: list[str], pairs: list[str | None] | None = None
) -> list[RowResult]:
    """Offline predictions for one model: the reference the server is tested against."""
    encoded = model.backbone.tokenize(
        texts, pairs, model.config.input.max_length, model.config.input.truncation_side
    )
    results, _ = classify_rows(model.backbone, [model] * len(texts), encoded)
    return results
