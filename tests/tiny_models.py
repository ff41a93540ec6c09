"""Tiny randomly initialised BERT, T5 and GPT-2 backbones, built offline from configs.

Each gets a word-level tokenizer with the family's real special-token layout
(BERT `[CLS] a [SEP] b [SEP]`, T5 `a </s> b </s>`, GPT-2 none), so assembly and
heads are exercised exactly as with the real models, without any download.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from dynprompt.models import Backbone, backbone_from_model

WORDS = (
    "hello world good morning the a an movie film plot acting was is very great terrible "
    "boring fun funny sad dull bright and but not of to it this that positive negative neutral "
    "yes no true false story ending actor director love hate best worst fine bad ok"
).split()
FAMILIES = ("bert", "t5", "gpt2")


def _tokenizer(
    specials: list[str], single: str | None, pair: str | None, **named: str
) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if single is not None and pair is not None:
        used = [s for s in specials if s in single or s in pair]
        core.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(s, vocab[s]) for s in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, **named)


def tiny_backbone(family: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    if family == "bert":
        tok = _tokenizer(
            ["[PAD]", "<unk>", "[CLS]", "[SEP]"],
            "[CLS] $A [SEP]",
            "[CLS] $A [SEP] $B:1 [SEP]:1",
            pad_token="[PAD]",
            unk_token="<unk>",
            cls_token="[CLS]",
            sep_token="[SEP]",
        )
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
        )
        return backbone_from_model(BertModel(config), tok, "tiny-bert")
    if family == "t5":
        tok = _tokenizer(
            ["<pad>", "</s>", "<unk>"],
            "$A </s>",
            "$A </s> $B </s>",
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        config = T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        return backbone_from_model(T5ForConditionalGeneration(config), tok, "tiny-t5")
    if family == "gpt2":
        tok = _tokenizer(
            ["<|endoftext|>", "<unk>"],
            None,
            None,
            eos_token="<|endoftext|>",
            unk_token="<unk>",
            pad_token="<|endoftext|>",
        )
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
        return backbone_from_model(GPT2LMHeadModel(config), tok, "tiny-gpt2")
    raise ValueError(family)
