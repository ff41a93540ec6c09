"""The one batch pipeline: rows of one or many models through one backbone.

Training (with Gumbel noise), evaluation and serving all run `forward_batch`;
`DynPromptModel.forward` is its one-model case and `inference.classify_rows` its
many-model, no-gradient case. The steps, for rows grouped by model (each group a
contiguous run of rows):

1. embed the prompt-free tokens once;
2. router features: the masked mean of the embeddings, or of the frozen backbone's
   last hidden states — one backbone pass over the rows whose models read it;
3. each group's routers decide (m, b, β) for its rows and give their prompt vectors;
4. one gather assembles every row with its own prompt (`assembly.assemble`), plus the
   straight-through term when training;
5. one backbone pass per head kind; then each model's head over its own rows (a
   verbalizer reads only the label words' rows of the LM head).

Groups are contiguous so that every per-model step is a slice (a view), never an
index built on the host and copied to the device. Widths come from the host-side
lengths, so nothing here reads a device tensor back: on a GPU the batch runs
without a synchronisation until its caller copies the results out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dynprompt.models.assembly import Assembled, assemble, assemble_arrangements
from dynprompt.models.backbone import Backbone, Encoded
from dynprompt.models.routers import Routing

if TYPE_CHECKING:
    from dynprompt.models.model import DynPromptModel


@dataclass
class Group:
    """Rows `start:stop` of a batch, all run by `model`."""

    model: DynPromptModel
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class BatchOutput:
    groups: list[Group]
    logits: list[Tensor]  # per group: (rows, labels) float32
    routings: list[Routing]  # per group
    length: Tensor  # (B,) long: prompt length m of every row
    before: Tensor  # (B,) long: prompt tokens before the text b
    width: int  # the assembled sequence's width


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def groups_of(models: Sequence[DynPromptModel]) -> list[Group] | None:
    """The runs of `models` (one per row) as groups; None if a model's rows are not one run."""
    groups: list[Group] = []
    seen: set[int] = set()
    for row, model in enumerate(models):
        if groups and groups[-1].model is model:
            groups[-1].stop = row + 1
            continue
        if id(model) in seen:
            return None
        seen.add(id(model))
        groups.append(Group(model, row, row + 1))
    return groups


def needs_backbone_features(model: DynPromptModel) -> bool:
    config = model.config
    return config.uses_router_features and config.router.feature == "backbone"


def frozen_features(backbone: Backbone, encoded: Encoded, token_embeds: Tensor) -> Tensor:
    """Masked mean of the frozen backbone's last hidden states over prompt-free rows.

    The router's `backbone` feature (and the linear probe's pooled input): computed in
    eval mode, without gradient, whatever mode the caller is in.
    """
    model = backbone.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = backbone.hidden_states(
                token_embeds, encoded.attention_mask, encoded.token_type_ids
            )
    finally:
        model.train(was_training)
    return masked_mean(hidden.float(), encoded.attention_mask)


def router_features(
    backbone: Backbone, groups: list[Group], encoded: Encoded, token_embeds: Tensor
) -> list[Tensor | None]:
    """u_i for every group whose routers read features (None for the others).

    Groups that read the backbone share one pass when their rows are one run (callers
    order rows so that they are); otherwise each such group gets its own pass.
    """
    out: list[Tensor | None] = [None] * len(groups)
    reading = [i for i, g in enumerate(groups) if needs_backbone_features(g.model)]
    runs: list[list[int]] = []
    for i in reading:
        if runs and groups[runs[-1][-1]].stop == groups[i].start:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        start, stop = groups[run[0]].start, groups[run[-1]].stop
        part = encoded.slice(start, stop)
        width = part.input_ids.shape[1]
        values = frozen_features(backbone, part, token_embeds[start:stop, :width])
        for i in run:
            g = groups[i]
            out[i] = values[g.start - start : g.stop - start]
    mask = encoded.attention_mask
    for i, g in enumerate(groups):
        config = g.model.config
        if config.uses_router_features and config.router.feature == "embeddings":
            rows = slice(g.start, g.stop)
            out[i] = masked_mean(token_embeds[rows].detach().float(), mask[rows])
    return out


def forward_batch(
    backbone: Backbone,
    groups: list[Group],
    encoded: Encoded,
    *,
    tau: float | None = None,
    generator: torch.Generator | None = None,
    features: Tensor | None = None,
    seq_len: int | None = None,
) -> BatchOutput:
    """Run every group's rows of `encoded` (on the backbone's device) through its model.

    `tau` given: training, straight-through Gumbel-softmax at that temperature (one group).
    `features`: router features computed earlier for these rows (one group; they depend on
    the frozen backbone only, so a trainer may cache them across epochs).
    `seq_len`: the assembled width, when the caller knows a bound without asking the
    device (longest row plus longest prompt); by default the exact width.
    """
    if (tau is not None or features is not None) and len(groups) != 1:
        raise ValueError("training and cached features run one model at a time")
    batch = encoded.input_ids.shape[0]
    if batch != (groups[-1].stop if groups else 0):
        raise ValueError(f"groups cover {groups[-1].stop if groups else 0} rows of {batch}")
    device = encoded.input_ids.device
    token_embeds = backbone.embed(encoded.input_ids)

    group_features = (
        [features]
        if features is not None
        else router_features(backbone, groups, encoded, token_embeds)
    )
    routings = [
        g.model.routers(f, g.size, device, tau=tau, generator=generator)
        for g, f in zip(groups, group_features, strict=True)
    ]
    max_prompt = max(g.model.config.prompt.length for g in groups)
    prompts = _concat(
        [
            _pad_to(g.model.prompt_vectors(r, g.size).to(token_embeds.dtype), max_prompt)
            for g, r in zip(groups, routings, strict=True)
        ]
    )
    length = _concat([r.length for r in routings])
    before = _concat([r.before for r in routings])
    pad = backbone.pad_embedding()
    assembled = assemble(
        token_embeds,
        encoded.token_type_ids,
        encoded.lengths,
        prompts,
        length,
        before,
        pad,
        n_lead=backbone.n_lead,
        n_trail=backbone.n_trail,
        seq_len=seq_len,
    )
    if tau is not None:
        correction = straight_through_correction(
            token_embeds, encoded, prompts, routings[0], pad, backbone, assembled
        )
        if correction is not None:
            assembled.inputs_embeds = assembled.inputs_embeds + correction
    return BatchOutput(
        groups,
        head_logits(backbone, groups, assembled),
        routings,
        length,
        before,
        assembled.inputs_embeds.shape[1],
    )


def head_logits(backbone: Backbone, groups: list[Group], assembled: Assembled) -> list[Tensor]:
    """Each group's class logits: one backbone pass per head kind, then the heads.

    Verbalizers come in two kinds. `first` (the default) reads the logit of each label
    word's first token at the scored position: the union of the groups' label words is
    scored once, multiplying only those rows of the LM head. `mean` (decoder-only) scores
    a word by the mean log-probability of all its tokens given the row: the union of the
    groups' words is appended after the assembled rows as branches of one batched pass
    (`Backbone.label_word_log_probs`), so a word of k tokens costs k - 1 extra positions
    per row, not another pass, and rows of every model still go through together.
    """
    linear = [i for i, g in enumerate(groups) if g.model.head is not None]
    verbal = [i for i, g in enumerate(groups) if g.model.head is None]
    mean = [i for i in verbal if groups[i].model.config.head.word_score == "mean"]
    verbal = [i for i in verbal if i not in mean]
    out: list[Tensor | None] = [None] * len(groups)
    for kind in (linear, verbal, mean):
        if not kind:
            continue
        part, offsets = _take(assembled, [groups[i] for i in kind])
        if kind is linear:
            hidden = backbone.hidden_states(
                part.inputs_embeds, part.attention_mask, part.token_type_ids
            )
            for i, (start, stop) in zip(kind, offsets, strict=True):
                model = groups[i].model
                assert model.head is not None
                if model.config.head.pooling == "first":
                    pooled = hidden[start:stop, 0].float()
                else:
                    pooled = masked_mean(
                        hidden[start:stop].float(), part.attention_mask[start:stop]
                    )
                out[i] = model.head(pooled)
            continue
        if kind is mean:
            # The union of the groups' words, each word once: models sharing label
            # words (most of them) share the branches too.
            union: dict[tuple[int, ...], int] = {}
            columns = []
            for i in kind:
                words = groups[i].model.config.head.label_words or []
                tokens = backbone.label_word_tokens(words)
                columns.append([union.setdefault(tuple(t), len(union)) for t in tokens])
            scores = backbone.label_word_log_probs(
                part.inputs_embeds, part.attention_mask, [list(t) for t in union]
            )
            for i, (start, stop), cols in zip(kind, offsets, columns, strict=True):
                out[i] = scores[start:stop][:, cols]
            continue
        # Verbalizers: score the union of the groups' label words once, then each group
        # keeps its own columns.
        label_ids = [groups[i].model.label_ids for i in kind]
        scores = backbone.verbalizer_logits(
            part.inputs_embeds,
            part.attention_mask,
            part.token_type_ids,
            label_ids=_concat([ids for ids in label_ids if ids is not None]),
        )
        column = 0
        for i, (start, stop), ids in zip(kind, offsets, label_ids, strict=True):
            assert ids is not None
            count = ids.shape[0]
            out[i] = scores[start:stop, column : column + count].float()
            column += count
    return [logits for logits in out if logits is not None]


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


def _concat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _pad_to(prompts: Tensor, length: int) -> Tensor:
    """(n, L, d) prompt vectors padded with zeros to (n, length, d); never read past L."""
    missing = length - prompts.shape[1]
    return F.pad(prompts, (0, 0, 0, missing)) if missing > 0 else prompts


def _take(assembled: Assembled, groups: list[Group]) -> tuple[Assembled, list[tuple[int, int]]]:
    """The rows of `groups` (and where each group lies in them): a view when they are
    one run of the batch, else one index_select."""
    first, last = groups[0].start, groups[-1].stop
    runs = all(a.stop == b.start for a, b in zip(groups, groups[1:], strict=False))
    if runs:
        rows: slice | Tensor = slice(first, last)
        offsets = [(g.start - first, g.stop - first) for g in groups]
    else:
        index = [r for g in groups for r in range(g.start, g.stop)]
        rows = torch.tensor(index, device=assembled.inputs_embeds.device)
        offsets, at = [], 0
        for g in groups:
            offsets.append((at, at + g.size))
            at += g.size
    return (
        Assembled(
            assembled.inputs_embeds[rows],
            assembled.attention_mask[rows],
            assembled.token_type_ids[rows],
            assembled.position_ids[rows],
        ),
        offsets,
    )
