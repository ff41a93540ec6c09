"""Prompt assembly: one gather puts each row's prompt around its own text span.

Row i of the output is
`[leading specials] p_i[0:b_i] [text span] p_i[b_i:m_i] [trailing specials] [padding]`.
The source of the gather is, per row, the embedded tokens (with one extra pad
slot) followed by the row's `L` prompt vectors; an index tensor says, for every
output position, which source slot it copies. Computing that index is a few
comparisons against `arange`, so rows with different lengths, positions and
splits cost the same as a plain prefix, and there is no Python loop over rows
or candidate positions. Training evaluates many arrangements of one row at once
by giving the index an extra axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Assembled:
    inputs_embeds: Tensor  # (B, S, d)
    attention_mask: Tensor  # (B, S) long
    token_type_ids: Tensor  # (B, S) long
    position_ids: Tensor  # (B, S) long: 0..S-1 along the assembled sequence


def arrangement_index(
    lengths: Tensor,
    m: Tensor,
    b: Tensor,
    *,
    n_lead: int,
    n_trail: int,
    num_tokens: int,
    seq_len: int,
) -> Tensor:
    """Source slot of every output position, for any leading shape of `lengths`, `m`, `b`.

    Slots `0..num_tokens-1` are tokens, `num_tokens` is a pad slot and
    `num_tokens + 1 + k` is prompt vector `k`.
    """
    j = torch.arange(seq_len, device=lengths.device)
    n = lengths.unsqueeze(-1)
    m_ = m.unsqueeze(-1)
    b_ = b.unsqueeze(-1)
    span = n - n_lead - n_trail
    first_prompt = num_tokens + 1
    index = torch.full(j.shape, num_tokens, device=lengths.device).expand(*n.shape[:-1], seq_len)
    # Widest region first; each narrower one overrides what lies before its end.
    index = torch.where(j < n + m_, j - m_, index)  # trailing specials
    index = torch.where(j < n_lead + span + m_, first_prompt + j - n_lead - span, index)  # p[b:m]
    index = torch.where(j < n_lead + b_ + span, j - b_, index)  # text span
    index = torch.where(j < n_lead + b_, first_prompt + j - n_lead, index)  # p[0:b]
    index = torch.where(j < n_lead, j, index)  # leading specials
    return index


def _sources(
    token_embeds: Tensor,
    token_types: Tensor,
    lengths: Tensor,
    prompts: Tensor,
    b: Tensor,
    pad_embed: Tensor,
) -> tuple[Tensor, Tensor]:
    batch, _, dim = token_embeds.shape
    pad = pad_embed.to(token_embeds.dtype).expand(batch, 1, dim)
    embeds = torch.cat([token_embeds, pad, prompts.to(token_embeds.dtype)], dim=1)
    # Prompt tokens take the segment of their neighbours: before the text, the first
    # token's type; after it, the type of the last real token (segment B for pairs).
    rows = torch.arange(batch, device=lengths.device)
    first_type = token_types[:, :1]
    last_type = token_types[rows, (lengths - 1).clamp(min=0)].unsqueeze(1)
    slots = torch.arange(prompts.shape[1], device=lengths.device)
    prompt_types = torch.where(slots[None, :] < b[:, None], first_type, last_type)
    types = torch.cat([token_types, torch.zeros_like(token_types[:, :1]), prompt_types], dim=1)
    return embeds, types


def assemble(
    token_embeds: Tensor,
    token_types: Tensor,
    lengths: Tensor,
    prompts: Tensor,
    m: Tensor,
    b: Tensor,
    pad_embed: Tensor,
    *,
    n_lead: int,
    n_trail: int,
    seq_len: int | None = None,
) -> Assembled:
    """Assemble each row with its own prompt length `m` and split `b` (one gather).

    `seq_len` is the output width; by default the longest assembled row (which reads the
    decisions back from the device). A wider `seq_len` only adds padding.
    """
    batch, num_tokens, dim = token_embeds.shape
    if seq_len is None:
        seq_len = int((lengths + m).max()) if batch else 0
    source, types = _sources(token_embeds, token_types, lengths, prompts, b, pad_embed)
    index = arrangement_index(
        lengths, m, b, n_lead=n_lead, n_trail=n_trail, num_tokens=num_tokens, seq_len=seq_len
    )
    embeds = torch.gather(source, 1, index.unsqueeze(-1).expand(batch, seq_len, dim))
    positions = torch.arange(seq_len, device=lengths.device)
    mask = (positions[None, :] < (lengths + m)[:, None]).long()
    return Assembled(
        inputs_embeds=embeds,
        attention_mask=mask,
        token_type_ids=torch.gather(types, 1, index),
        position_ids=positions[None, :].expand(batch, seq_len),
    )


def assemble_arrangements(
    token_embeds: Tensor,
    token_types: Tensor,
    lengths: Tensor,
    prompts: Tensor,
    m: Tensor,
    b: Tensor,
    pad_embed: Tensor,
    *,
    n_lead: int,
    n_trail: int,
    seq_len: int,
) -> Tensor:
    """Embeddings of J candidate arrangements per row: `m`, `b` are (B, J); returns (B, J, S, d).

    Used by the straight-through estimator, which needs every candidate a decision
    could have taken; `seq_len` is the hard arrangement's, because anything beyond it
    is padding there and receives no gradient.
    """
    batch, num_tokens, dim = token_embeds.shape
    source, _ = _sources(token_embeds, token_types, lengths, prompts, b[:, 0], pad_embed)
    index = arrangement_index(
        lengths[:, None].expand_as(m),
        m,
        b,
        n_lead=n_lead,
        n_trail=n_trail,
        num_tokens=num_tokens,
        seq_len=seq_len,
    )
    rows = torch.arange(batch, device=lengths.device)[:, None, None]
    return source[rows, index]
