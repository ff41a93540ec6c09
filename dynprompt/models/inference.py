"""Inference over rows of many models that share one backbone: the batch pipeline with
no gradient, probabilities and decisions copied to the host once.

This is what makes per-input prompt placement servable: each row is routed by its
own model, gets its own prompt length and split, and all rows still go through the
backbone together. Rows are first ordered by model (the pipeline works on contiguous
groups) and the answers put back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynprompt.models.backbone import Backbone, Encoded
from dynprompt.models.model import DynPromptModel
from dynprompt.models.pipeline import Group, forward_batch, groups_of, needs_backbone_features


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


def batch_order(models: Sequence[DynPromptModel]) -> list[int]:
    """Rows ordered so that each model's rows are one run, the models whose routers read
    the backbone first (their feature pass is then one slice), linear heads before
    verbalizers; otherwise first come, first placed."""
    first_seen: dict[int, int] = {}
    for row, model in enumerate(models):
        first_seen.setdefault(id(model), row)

    def key(row: int) -> tuple[bool, bool, int]:
        model = models[row]
        return (not needs_backbone_features(model), model.head is None, first_seen[id(model)])

    return sorted(range(len(models)), key=key)


@torch.inference_mode()
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
    order = batch_order(models)
    if order != list(range(batch)):
        encoded = encoded.select(order)
        models = [models[r] for r in order]
    groups = groups_of(models)
    assert groups is not None
    results, stats = _run(backbone, groups, encoded.to(backbone.device))
    if order != list(range(batch)):
        placed: list[RowResult | None] = [None] * batch
        for result, row in zip(results, order, strict=True):
            placed[row] = result
        results = [r for r in placed if r is not None]
    return results, stats


def _run(
    backbone: Backbone, groups: list[Group], encoded: Encoded
) -> tuple[list[RowResult], BatchStats]:
    width_bound = max(encoded.host_lengths, default=0) + max(
        g.model.config.prompt.length for g in groups
    )
    out = forward_batch(backbone, groups, encoded, seq_len=width_bound)
    # Everything the caller reads, packed into one tensor: one device-to-host copy.
    labels = max(logits.shape[1] for logits in out.logits)
    pools = [r.pool_weights for r in out.routings]
    pool_width = max((p.shape[1] for p in pools if p is not None), default=0)
    columns = [
        F.pad(F.softmax(logits, dim=-1), (0, labels - logits.shape[1])) for logits in out.logits
    ]
    probs = columns[0] if len(columns) == 1 else torch.cat(columns)
    parts = [probs, out.length[:, None].float(), out.before[:, None].float()]
    if pool_width:
        parts.append(
            torch.cat(
                [
                    F.pad(p, (0, pool_width - p.shape[1]))
                    if p is not None
                    else probs.new_zeros(g.size, pool_width)
                    for g, p in zip(groups, pools, strict=True)
                ]
            )
        )
    packed = torch.cat(parts, dim=1).cpu().tolist()
    results = []
    for g, pool in zip(groups, pools, strict=True):
        n_labels = len(g.model.config.head.labels)
        n_pool = pool.shape[1] if pool is not None else 0
        for row in packed[g.start : g.stop]:
            results.append(
                RowResult(
                    probs=row[:n_labels],
                    prompt_length=int(row[labels]),
                    tokens_before=int(row[labels + 1]),
                    pool_weights=row[labels + 2 : labels + 2 + n_pool] if n_pool else None,
                )
            )
    prompt_tokens = sum(r.prompt_length for r in results)
    stats = BatchStats(
        rows=len(results),
        padded_tokens=len(results) * out.width,
        real_tokens=sum(encoded.host_lengths) + prompt_tokens,
        prompt_tokens=prompt_tokens,
    )
    return results, stats


def predict(
    model: DynPromptModel, texts: list[str], pairs: list[str | None] | None = None
) -> list[RowResult]:
    """Offline predictions for one model: the reference the server is tested against."""
    encoded = model.backbone.tokenize(
        texts, pairs, model.config.input.max_length, model.config.input.truncation_side
    )
    results, _ = classify_rows(model.backbone, [model] * len(texts), encoded)
    return results
