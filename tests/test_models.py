"""The models core against references written here, row by row, in plain Python."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynprompt.models import (
    VARIANTS,
    Backbone,
    CheckpointError,
    DynPromptModel,
    assemble,
    classify_rows,
    load_backbone,
    load_checkpoint,
    make_config,
    predict,
    save_checkpoint,
)
from dynprompt.models.assembly import assemble_arrangements
from dynprompt.models.backbone import detect_family
from dynprompt.models.model import masked_mean
from tests.tiny_models import FAMILIES, WORDS, tiny_backbone


@pytest.fixture(scope="module")
def tiny() -> dict[str, Backbone]:
    return {family: tiny_backbone(family) for family in FAMILIES}


def random_texts(rng: random.Random, n: int, vocab: list[str], max_words: int = 12) -> list[str]:
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def reference_assembly(
    backbone: Backbone, ids: list[int], types: list[int], prompt: torch.Tensor, m: int, b: int
) -> tuple[torch.Tensor, list[int]]:
    """DESIGN §2 literally: lead, p[0:b], text span, p[b:m], trail."""
    emb = backbone.embed(torch.tensor(ids))
    lead, trail = backbone.n_lead, backbone.n_trail
    n = len(ids)
    parts = [emb[:lead], prompt[:b], emb[lead : n - trail], prompt[b:m], emb[n - trail :]]
    last_type = types[-1]
    part_types = (
        types[:lead]
        + [types[0]] * b
        + types[lead : n - trail]
        + [last_type] * (m - b)
        + types[n - trail :]
    )
    return torch.cat(parts), part_types


# -- assembly -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*FAMILIES, "minilm"])
def test_assembly_equals_per_row_reference(
    family: str, tiny: dict[str, Backbone], minilm: Backbone
) -> None:
    backbone = minilm if family == "minilm" else tiny[family]
    vocab = WORDS if family != "minilm" else "the movie was great but boring acting plot".split()
    rng = random.Random(hash(family) % 1000)
    for trial in range(6):
        batch = rng.randint(1, 7)
        L = rng.randint(1, 9)
        texts = random_texts(rng, batch, vocab)
        pairs = [
            rng.choice(vocab) + " " + rng.choice(vocab) if rng.random() < 0.5 else None
            for _ in texts
        ]
        enc = backbone.tokenize(texts, pairs, max_length=64)
        m = torch.tensor([rng.randint(1 if trial % 2 else 0, L) for _ in range(batch)])
        b = torch.tensor([rng.randint(0, int(mi)) for mi in m])
        prompts = torch.randn(batch, L, backbone.hidden_size)
        pad = backbone.embed(torch.tensor([backbone.pad_id]))[0]
        out = assemble(
            backbone.embed(enc.input_ids),
            enc.token_type_ids,
            enc.lengths,
            prompts,
            m,
            b,
            pad,
            n_lead=backbone.n_lead,
            n_trail=backbone.n_trail,
        )
        width = int((enc.lengths + m).max())
        assert out.inputs_embeds.shape == (batch, width, backbone.hidden_size)
        assert torch.equal(out.position_ids[0], torch.arange(width))
        for i in range(batch):
            n = int(enc.lengths[i])
            ids = enc.input_ids[i, :n].tolist()
            types = enc.token_type_ids[i, :n].tolist()
            ref, ref_types = reference_assembly(
                backbone, ids, types, prompts[i], int(m[i]), int(b[i])
            )
            real = n + int(m[i])
            assert torch.equal(out.inputs_embeds[i, :real], ref)
            assert out.attention_mask[i].tolist() == [1] * real + [0] * (width - real)
            assert out.token_type_ids[i, :real].tolist() == ref_types
            # padding copies the pad token's embedding
            assert torch.equal(out.inputs_embeds[i, real:], pad.expand(width - real, -1))


def test_arrangements_equal_single_assemblies(tiny: dict[str, Backbone]) -> None:
    backbone = tiny["bert"]
    enc = backbone.tokenize(["a great movie", "boring"], ["fun plot", None])
    L = 4
    prompts = torch.randn(2, L, backbone.hidden_size)
    pad = backbone.embed(torch.tensor([backbone.pad_id]))[0]
    tokens = backbone.embed(enc.input_ids)
    cand_m = torch.tensor([[4, 4, 4, 4, 4], [2, 2, 2, 2, 2]])
    cand_b = torch.minimum(torch.arange(5)[None, :], cand_m)
    width = int((enc.lengths + 4).max())
    arr = assemble_arrangements(
        tokens,
        enc.token_type_ids,
        enc.lengths,
        prompts,
        cand_m,
        cand_b,
        pad,
        n_lead=1,
        n_trail=1,
        seq_len=width,
    )
    for j in range(5):
        single = assemble(
            tokens,
            enc.token_type_ids,
            enc.lengths,
            prompts,
            cand_m[:, j],
            cand_b[:, j],
            pad,
            n_lead=1,
            n_trail=1,
        )
        s = single.inputs_embeds.shape[1]
        assert torch.equal(arr[:, j, :s], single.inputs_embeds)


# -- models ---------------------------------------------------------------------------------


def build(
    backbone: Backbone,
    variant: str,
    L: int = 5,
    feature: str = "backbone",
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive", "neutral"),
) -> DynPromptModel:
    torch.manual_seed(seed)
    label_list = list(labels)
    config = make_config(
        name="m",
        variant=variant,
        backbone=backbone.spec(),
        labels=label_list,
        prompt_length=L,
        feature=feature,
    )
    model = DynPromptModel(config, backbone)
    # Spread router weights so decisions differ between rows.
    with torch.no_grad():
        for name, param in model.routers.named_parameters():
            param.normal_(0.0, 3.0 if "weight" in name else 1.0)
    model.eval()
    return model


def test_prefix_equals_manual_concatenation(minilm: Backbone) -> None:
    model = build(minilm, "prefix", L=6)
    texts = ["a gripping , funny film", "dull"]
    enc = minilm.tokenize(texts)
    logits = model(enc).logits
    assert model.prompt is not None
    for i, text in enumerate(texts):
        ids = minilm.tokenize([text]).input_ids[0]
        emb = minilm.embed(ids)
        x = torch.cat([emb[:1], model.prompt[0], emb[1:]])[None]
        mask = torch.ones(1, x.shape[1], dtype=torch.long)
        hidden = minilm.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        assert model.head is not None
        manual = model.head(hidden.mean(dim=1))[0]
        torch.testing.assert_close(logits[i], manual, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", [*FAMILIES, "minilm"])
def test_row_is_batch_independent(family: str, tiny: dict[str, Backbone], minilm: Backbone) -> None:
    backbone = minilm if family == "minilm" else tiny[family]
    vocab = WORDS if family != "minilm" else "the movie was great but boring acting plot".split()
    rng = random.Random(7)
    texts = random_texts(rng, 6, vocab, max_words=20)
    pairs: list[str | None] = [None, "fun plot", None, "was great", None, None]
    for variant in ("instance_position", "dynamic", "instance_length"):
        model = build(
            backbone, variant, L=5, feature="backbone" if variant != "dynamic" else "embeddings"
        )
        batched = model(backbone.tokenize(texts, pairs)).logits
        for i in range(len(texts)):
            alone = model(backbone.tokenize([texts[i]], [pairs[i]])).logits[0]
            torch.testing.assert_close(alone, batched[i], rtol=0, atol=1e-5)


def test_mixed_models_match_each_model_alone(minilm: Backbone, sst2_sentences: list[str]) -> None:
    models = [
        build(minilm, "instance_position", L=4, seed=1),
        build(minilm, "dynamic", L=6, feature="embeddings", seed=2),
        build(minilm, "prefix", L=3, seed=3),
        build(minilm, "linear_probe", seed=4),
    ]
    texts = sst2_sentences[:12]
    owners = [models[i % len(models)] for i in range(len(texts))]
    enc = minilm.tokenize(texts, max_length=64)
    mixed, stats = classify_rows(minilm, owners, enc)
    assert stats.rows == len(texts)
    lengths = set()
    for i, text in enumerate(texts):
        alone = predict(owners[i], [text])[0]
        assert alone.prompt_length == mixed[i].prompt_length
        assert alone.tokens_before == mixed[i].tokens_before
        torch.testing.assert_close(
            torch.tensor(alone.probs), torch.tensor(mixed[i].probs), rtol=0, atol=1e-5
        )
        lengths.add((mixed[i].prompt_length, mixed[i].tokens_before))
    assert len(lengths) > 2, "rows should have been given different placements"


def test_inference_is_deterministic(minilm: Backbone, sst2_sentences: list[str]) -> None:
    model = build(minilm, "dynamic", L=6)
    enc = minilm.tokenize(sst2_sentences[:8])
    first, second = model(enc), model(enc)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.routing.before, second.routing.before)
    assert torch.equal(first.routing.length, second.routing.length)


# -- straight-through estimator ---------------------------------------------------------------


def naive_inputs(model: DynPromptModel, enc, tau: float, seed: int):  # type: ignore[no-untyped-def]
    """Σ_j y_j·A_j over explicitly built arrangements, y = hard − sg(soft) + soft."""
    backbone = model.backbone
    tokens = backbone.embed(enc.input_ids)
    features = model.router_features(enc, tokens) if model.config.uses_router_features else None
    routing = model.routers(
        features,
        len(enc.lengths),
        tokens.device,
        tau=tau,
        generator=torch.Generator().manual_seed(seed),
    )
    prompts = model.prompt_vectors(routing, len(enc.lengths))
    m, b = routing.length, routing.before
    width = int((enc.lengths + m).max())
    rows = []
    for i in range(len(enc.lengths)):
        n = int(enc.lengths[i])
        ids, types = enc.input_ids[i, :n].tolist(), enc.token_type_ids[i, :n].tolist()

        def arrangement(
            mi: int, bi: int, i: int = i, ids: list[int] = ids, types: list[int] = types
        ) -> torch.Tensor:
            x, _ = reference_assembly(backbone, ids, types, prompts[i], mi, bi)
            pad = backbone.embed(torch.tensor([backbone.pad_id]))
            x = torch.cat([x, pad.expand(max(width - x.shape[0], 0), -1)])
            return x[:width]

        hard = arrangement(int(m[i]), int(b[i]))
        total = torch.zeros_like(hard)
        decisions = 0
        for choice, candidates in (
            (
                routing.position_choice,
                [(int(m[i]), min(j, int(m[i]))) for j in range(model.config.prompt.length + 1)],
            ),
            (
                routing.length_choice,
                [
                    (k, min(int(b[i]), k) if routing.position_choice else k)
                    for k in range(1, model.config.prompt.length + 1)
                ],
            ),
        ):
            if choice is None:
                continue
            decisions += 1
            y = torch.nn.functional.one_hot(choice.index[i], choice.soft.shape[1]).float()
            y = y - choice.soft[i].detach() + choice.soft[i]
            for j, (mj, bj) in enumerate(candidates):
                total = total + y[j] * arrangement(mj, bj)
        rows.append(total - (decisions - 1) * hard)
    x = torch.stack(rows)
    mask = (torch.arange(width)[None, :] < (enc.lengths + m)[:, None]).long()
    return x, mask, routing


@pytest.mark.parametrize(
    "variant", ["task_position", "instance_position", "instance_length", "dynamic"]
)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_straight_through_matches_naive_weighted_sum(
    variant: str, family: str, tiny: dict[str, Backbone]
) -> None:
    backbone = tiny[family]
    model = build(backbone, variant, L=4)
    model.train()
    enc = backbone.tokenize(
        ["a great movie", "terrible acting and a boring plot", "ok", "fun"],
        ["fine", None, None, "sad"],
    )
    tau, seed = 0.7, 123

    # Forward value: exactly the hard arrangement.
    out = model(enc, tau=tau, generator=torch.Generator().manual_seed(seed))
    hard = assemble(
        backbone.embed(enc.input_ids),
        enc.token_type_ids,
        enc.lengths,
        model.prompt_vectors(out.routing, 4),
        out.routing.length,
        out.routing.before,
        backbone.embed(torch.tensor([backbone.pad_id]))[0],
        n_lead=backbone.n_lead,
        n_trail=backbone.n_trail,
    )
    assert torch.equal(out.logits, model.scores(hard))

    loss = out.logits.logsumexp(dim=-1).sum() + out.logits[:, 0].sum()
    model.zero_grad()
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.routers.named_parameters() if p.grad is not None}
    assert fast, "no router received a gradient"

    model.zero_grad()
    x, mask, _ = naive_inputs(model, enc, tau, seed)
    hard.inputs_embeds = x
    hard.attention_mask = mask
    naive_logits = model.scores(hard)
    (naive_logits.logsumexp(dim=-1).sum() + naive_logits[:, 0].sum()).backward()
    for name, grad in fast.items():
        other = dict(model.routers.named_parameters())[name].grad
        assert other is not None
        torch.testing.assert_close(grad, other, rtol=1e-4, atol=1e-6)
        assert grad.abs().sum() > 0


# -- training and checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_learns_and_round_trips(
    variant: str, family: str, tiny: dict[str, Backbone], tmp_path: Path
) -> None:
    backbone = tiny[family]
    model = build(backbone, variant, L=4, labels=("negative", "positive"))
    texts = [
        "a great fun movie",
        "terrible boring plot",
        "the best film",
        "the worst acting",
        "love it",
        "hate it",
    ]
    # Skewed labels: even a prompt that can only shift a verbalizer (tiny GPT-2) can lower the loss.
    labels = torch.tensor([1, 1, 0, 1, 1, 1])
    enc = backbone.tokenize(texts)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2 if variant != "finetune" else 3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(20):
        out = model(enc, tau=1.0, generator=generator)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    before = model(enc).logits
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", backbone=backbone)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(loaded(enc).logits, before)


def test_backbone_loads_by_name_and_path(
    minilm: Backbone, tiny: dict[str, Backbone], tmp_path: Path
) -> None:
    assert minilm.family == "encoder" and minilm.n_lead == 1 and minilm.n_trail == 1
    assert minilm.hidden_size == 384
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training
    for family, backbone in tiny.items():
        folder = tmp_path / family
        backbone.model.save_pretrained(folder)
        backbone.tokenizer.save_pretrained(folder)
        again = load_backbone(str(folder))
        assert again.family == detect_family(backbone.model.config) == backbone.family
        assert again.fingerprint == backbone.fingerprint
        assert (again.n_lead, again.n_trail) == (backbone.n_lead, backbone.n_trail)


# -- refused checkpoints -------------------------------------------------------------------


@pytest.fixture()
def saved(tiny: dict[str, Backbone], tmp_path: Path) -> Path:
    model = build(tiny["bert"], "instance_position", L=4)
    return save_checkpoint(model, tmp_path / "good")


def test_missing_field_is_refused(saved: Path, tiny: dict[str, Backbone]) -> None:
    raw = json.loads((saved / "dynprompt.json").read_text())
    del raw["prompt"]["length"]
    (saved / "dynprompt.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"dynprompt\.json: field 'prompt\.length': Field required"
    ):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_inconsistent_field_is_refused(saved: Path, tiny: dict[str, Backbone]) -> None:
    raw = json.loads((saved / "dynprompt.json").read_text())
    raw["variant"] = "prefix"
    (saved / "dynprompt.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"dynprompt\.json: .*does not match variant 'prefix'"
    ):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_wrong_shape_is_refused(saved: Path, tiny: dict[str, Backbone]) -> None:
    tensors = load_file(str(saved / "weights.safetensors"))
    tensors["prompt"] = torch.zeros(1, 3, 32)
    save_file(tensors, str(saved / "weights.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"weights\.safetensors: tensor 'prompt' has shape \(1, 3, 32\)"
    ):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_missing_tensor_is_refused(saved: Path, tiny: dict[str, Backbone]) -> None:
    tensors = load_file(str(saved / "weights.safetensors"))
    del tensors["routers.position.weight"]
    save_file(tensors, str(saved / "weights.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"weights\.safetensors: missing tensor 'routers\.position\.weight'"
    ):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_truncated_file_is_refused(saved: Path, tiny: dict[str, Backbone]) -> None:
    path = saved / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=r"weights\.safetensors: not a readable safetensors file"
    ):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_other_backbone_is_refused(saved: Path) -> None:
    other = tiny_backbone("bert", seed=1)  # same architecture, different weights
    with pytest.raises(CheckpointError, match=r"dynprompt\.json: field 'backbone\.fingerprint'"):
        load_checkpoint(saved, backbone=other)


def test_bad_json_and_missing_config_are_refused(
    saved: Path, tiny: dict[str, Backbone], tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"empty[/\\]dynprompt\.json: file not found"):
        (tmp_path / "empty").mkdir()
        load_checkpoint(tmp_path / "empty", backbone=tiny["bert"])
    (saved / "dynprompt.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"dynprompt\.json: invalid JSON at line 1"):
        load_checkpoint(saved, backbone=tiny["bert"])


def test_features_are_masked_means(minilm: Backbone) -> None:
    model = build(minilm, "instance_position", L=3, feature="embeddings")
    enc = minilm.tokenize(["short", "a much longer sentence than the first"])
    tokens = minilm.embed(enc.input_ids)
    features = model.router_features(enc, tokens)
    alone = minilm.embed(minilm.tokenize(["short"]).input_ids)[0].mean(dim=0)
    torch.testing.assert_close(features[0], alone, rtol=0, atol=1e-6)
    backbone_model = build(minilm, "instance_position", L=3, feature="backbone")
    hidden = backbone_model.router_features(enc, tokens)
    ref = (
        minilm.model(**minilm.tokenizer(["short"], return_tensors="pt"))
        .last_hidden_state[0]
        .mean(dim=0)
    )
    torch.testing.assert_close(hidden[0], ref, rtol=0, atol=1e-5)
    assert masked_mean(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist() == [[1.0, 1.0]]
