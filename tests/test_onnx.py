"""The ONNX Runtime backend against the torch backend: export, cache, parity, HTTP.

MiniLM is exported once per session into a temporary cache; tiny BERT, T5 and
GPT-2 models (built from configs) cover the other families and the cache's
failure modes. Class probabilities must match the torch path within 1e-4 on
real SST-2 dev sentences, single and batched, pairs too.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX backend needs the 'onnx' extra")
pytest.importorskip("onnxscript", reason="exporting needs the 'onnx' extra")
pytest.importorskip("onnx", reason="exporting needs the 'onnx' extra")

from dynprompt.models import (  # noqa: E402
    PROMPT_VARIANTS,
    Backbone,
    BackboneError,
    DynPromptModel,
    classify_rows,
    load_checkpoint,
    make_config,
    onnx_export,
    save_checkpoint,
)
from dynprompt.models.inference import RowResult  # noqa: E402
from dynprompt.models.onnx_backbone import InOnnxRuntime, OnnxBackbone  # noqa: E402
from dynprompt.models.onnx_export import (  # noqa: E402
    HIDDEN_FILE,
    MANIFEST_FILE,
    VERBALIZER_FILE,
    OnnxExportError,
    cache_dir_for,
    export_backbone,
    export_main,
    load_onnx_backbone,
    onnx_backbone_from,
    sha256_file,
)
from tests.conftest import sst2_rows  # noqa: E402
from tests.server_util import build_model  # noqa: E402
from tests.tiny_models import WORDS, tiny_backbone  # noqa: E402

TOL = 1e-4
FEATURES = ("backbone", "embeddings")
ONNX_VARIANTS = (*PROMPT_VARIANTS, "linear_probe")
PLACED = {"instance_position", "instance_length", "dynamic"}  # per-input length / split
POOLED = {"instance_prompt", "dynamic"}  # per-input prompt mixture
# Both feature modes for every variant with a router; `prefix`, `task_position` and
# `linear_probe` have no router, so their feature field is never read (asserted below)
# and a second mode would rerun the same computation.
PARITY_CASES = [
    (variant, feature)
    for variant in ONNX_VARIANTS
    for feature in (FEATURES if variant in PLACED | POOLED else ("embeddings",))
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def minilm_onnx(onnx_cache: Path) -> Backbone:
    return load_onnx_backbone("minilm", cache_dir=onnx_cache)


@pytest.fixture(scope="session")
def sst2_dev() -> list[str]:
    return [text for text, _ in sst2_rows("dev", 48)]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved as a local model folder, so `load_onnx_backbone` can load it by path."""
    path = tmp_path_factory.mktemp("tiny-bert") / "model"
    backbone = tiny_backbone("bert")
    backbone.model.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    return path


def make_model(variant: str, feature: str, backbone: Backbone, seed: int) -> DynPromptModel:
    """A seeded random model whose decisions vary across inputs and whose head is sharp
    enough that probabilities spread over (0, 1), so a 1e-4 tolerance means something."""
    labels = ["negative", "positive"]
    model = build_model(
        f"{variant}-{feature}", backbone, seed=seed, variant=variant, feature=feature, labels=labels
    )
    if model.head is not None:
        torch.manual_seed(seed + 100)
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def reload_over(model: DynPromptModel, backbone: Backbone, folder: Path) -> DynPromptModel:
    """The model through a checkpoint, over another backbone (fingerprints must agree)."""
    save_checkpoint(model, folder)
    return load_checkpoint(folder, backbone=backbone)


def assert_same_results(got: list[RowResult], want: list[RowResult], what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.prompt_length, g.tokens_before) == (w.prompt_length, w.tokens_before), (what, i)
        diff = max(abs(a - b) for a, b in zip(g.probs, w.probs, strict=True))
        assert diff < TOL, f"{what}: row {i} probabilities differ by {diff:.3g}"
        if w.pool_weights is None:
            assert g.pool_weights is None
        else:
            assert g.pool_weights is not None
            assert (
                max(abs(a - b) for a, b in zip(g.pool_weights, w.pool_weights, strict=True)) < TOL
            )


def classify(
    backbone: Backbone,
    model: DynPromptModel,
    texts: list[str],
    pairs: list[str | None] | None = None,
) -> list[RowResult]:
    encoded = backbone.tokenize(texts, pairs, model.config.input.max_length)
    results, _ = classify_rows(backbone, [model] * len(texts), encoded)
    return results


# --------------------------------------------------------------------------- MiniLM parity
@pytest.mark.parametrize(("variant", "feature"), PARITY_CASES)
def test_minilm_probabilities_match_torch(
    variant: str,
    feature: str,
    minilm: Backbone,
    minilm_onnx: Backbone,
    sst2_dev: list[str],
    tmp_path: Path,
) -> None:
    seed = ONNX_VARIANTS.index(variant) * 2 + FEATURES.index(feature)
    model = make_model(variant, feature, minilm, seed)
    assert model.config.uses_router_features == (variant in PLACED | POOLED)
    on_torch = reload_over(model, minilm, tmp_path / "t")
    on_onnx = reload_over(model, minilm_onnx, tmp_path / "o")

    batched_torch = classify(minilm, on_torch, sst2_dev[:32])
    assert_same_results(classify(minilm_onnx, on_onnx, sst2_dev[:32]), batched_torch, "batched")
    probs = [r.probs[1] for r in batched_torch]
    assert max(probs) - min(probs) > 0.2, "the head is too flat for the test to mean anything"
    if variant in PLACED:
        decisions = {(r.prompt_length, r.tokens_before) for r in batched_torch}
        assert len(decisions) > 1, (
            "every row got the same decision: the test would not see placement"
        )
    if variant in POOLED:
        first_weights = [r.pool_weights[0] for r in batched_torch if r.pool_weights is not None]
        assert max(first_weights) - min(first_weights) > 0.05, "pool weights do not vary"

    for text in sst2_dev[32:35]:
        want = classify(minilm, on_torch, [text])
        assert_same_results(classify(minilm_onnx, on_onnx, [text]), want, "single")

    firsts, seconds = sst2_dev[35:41], sst2_dev[41:47]
    pairs_torch = classify(minilm, on_torch, firsts, list(seconds))
    assert_same_results(classify(minilm_onnx, on_onnx, firsts, list(seconds)), pairs_torch, "pairs")
    assert_same_results(
        classify(minilm_onnx, on_onnx, firsts[:1], [seconds[0]]), pairs_torch[:1], "single pair"
    )


def test_mixed_models_in_one_batch_match_torch(
    minilm: Backbone, minilm_onnx: Backbone, sst2_dev: list[str], tmp_path: Path
) -> None:
    """One `classify_rows` call over rows of every variant, as the server batches them."""
    combos = [(v, f) for v in ONNX_VARIANTS for f in FEATURES]
    models = [make_model(v, f, minilm, 50 + i) for i, (v, f) in enumerate(combos)]
    torch_models = [reload_over(m, minilm, tmp_path / f"t{i}") for i, m in enumerate(models)]
    onnx_models = [reload_over(m, minilm_onnx, tmp_path / f"o{i}") for i, m in enumerate(models)]
    texts = sst2_dev[: len(models)]
    want, _ = classify_rows(minilm, torch_models, minilm.tokenize(texts))
    got, _ = classify_rows(minilm_onnx, onnx_models, minilm_onnx.tokenize(texts))
    assert_same_results(got, want, "mixed batch")


def test_minilm_export_takes_segment_ids_and_releases_torch_layers(minilm_onnx: Backbone) -> None:
    assert isinstance(minilm_onnx, OnnxBackbone)
    runtime = minilm_onnx.ort
    assert runtime.hidden_spec.inputs == ["inputs_embeds", "attention_mask", "token_type_ids"]
    assert [i.name for i in runtime.hidden.get_inputs()] == runtime.hidden_spec.inputs
    assert runtime.verbalizer is None
    # Only the word embeddings stay in torch.
    params = sum(p.numel() for p in minilm_onnx.model.parameters())
    assert params == minilm_onnx.input_embeddings.weight.numel()
    assert isinstance(minilm_onnx.model.encoder, InOnnxRuntime)
    with pytest.raises(BackboneError, match="runs in ONNX Runtime"):
        minilm_onnx.model.encoder(torch.zeros(1, 2, 384))


def test_segment_ids_reach_the_graph(minilm: Backbone, minilm_onnx: Backbone) -> None:
    """Segment B changes MiniLM's output, and the ONNX graph changes it the same way."""
    embeds = minilm.embed(torch.randint(1000, 20000, (2, 9))).detach()
    mask = torch.ones(2, 9, dtype=torch.long)
    types = torch.zeros(2, 9, dtype=torch.long)
    types[:, 5:] = 1
    with torch.no_grad():
        want = minilm.hidden_states(embeds, mask, types)
        zero = minilm.hidden_states(embeds, mask, torch.zeros_like(types))
    got = minilm_onnx.hidden_states(embeds, mask, types)
    assert (want - zero).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4


# --------------------------------------------------------------------------- other families
def export_dir_of(cache: Path) -> Path:
    return cache_dir_for(tiny_backbone("bert").fingerprint, torch.float32, cache)


@pytest.fixture(scope="module")
def built_cache(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("built-cache")
    load_onnx_backbone(str(tiny_bert_dir), cache_dir=root)
    return root


@pytest.fixture()
def cache(built_cache: Path, tmp_path: Path) -> Path:
    """A private copy of a cache that already holds a valid tiny-BERT export."""
    return Path(shutil.copytree(built_cache, tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_pairs(
    tmp_path_factory: pytest.TempPathFactory, built_cache: Path
) -> dict[str, tuple[Backbone, OnnxBackbone]]:
    """Each tiny family as a torch reference and as an ONNX backbone (tiny BERT's export is
    the one already in `built_cache`)."""
    root = tmp_path_factory.mktemp("tiny-onnx")
    out = {}
    for family in ("bert", "t5", "gpt2"):
        reference = tiny_backbone(family)
        folder = export_dir_of(built_cache) if family == "bert" else root / family
        exported = onnx_backbone_from(tiny_backbone(family), folder)
        assert exported.fingerprint == reference.fingerprint
        out[family] = (reference, exported)
    return out


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2"])
def test_tiny_hidden_states_and_verbalizer_match(
    family: str, tiny_pairs: dict[str, tuple[Backbone, OnnxBackbone]]
) -> None:
    reference, exported = tiny_pairs[family]
    generator = torch.Generator().manual_seed(3)
    for batch, seq in [(1, 1), (1, 6), (3, 9), (5, 17), (2, 40)]:
        embeds = torch.randn(batch, seq, reference.hidden_size, generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(1, batch):
            mask[row, max(1, seq - 3 * row) :] = 0
        types = torch.zeros_like(mask)
        types[:, seq // 2 :] = 1
        with torch.no_grad():
            want = reference.hidden_states(embeds, mask, types)
        got = exported.hidden_states(embeds, mask, types)
        assert got.shape == want.shape
        assert (got - want)[mask.bool()].abs().max() < 1e-4, (batch, seq)
        if family == "bert":
            with pytest.raises(BackboneError, match="no verbalizer"):
                exported.verbalizer_logits(embeds, mask)
            continue
        with torch.no_grad():
            want_logits = reference.verbalizer_logits(embeds, mask)
        got_logits = exported.verbalizer_logits(embeds, mask)
        assert got_logits.shape == want_logits.shape == (batch, reference.model.config.vocab_size)
        assert (got_logits - want_logits).abs().max() < 1e-4, (batch, seq)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_tiny_verbalizer_models_match(
    family: str, feature: str, tiny_pairs: dict[str, tuple[Backbone, OnnxBackbone]], tmp_path: Path
) -> None:
    reference, exported = tiny_pairs[family]
    texts = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(2 + i % 9)) for i in range(12)]
    for variant in ("instance_position", "dynamic"):
        torch.manual_seed(1)
        config = make_config(
            name=f"{family}-{variant}",
            variant=variant,
            backbone=reference.spec(),
            labels=["negative", "positive"],
            label_words=["bad", "great"],
            prompt_length=5,
            feature=feature,
        )
        model = DynPromptModel(config, reference).eval()
        for layer in (model.routers.position, model.routers.length, model.routers.pool):
            if layer is not None:
                torch.nn.init.normal_(layer.weight, std=3.0)
        on_torch = reload_over(model, reference, tmp_path / f"{variant}-t")
        on_onnx = reload_over(model, exported, tmp_path / f"{variant}-o")
        want = classify(reference, on_torch, texts)
        assert_same_results(classify(exported, on_onnx, texts), want, f"{family} batched")
        assert_same_results(classify(exported, on_onnx, texts[:1]), want[:1], f"{family} single")


# --------------------------------------------------------------------------- refusals
def test_finetune_and_training_are_refused(
    tiny_pairs: dict[str, tuple[Backbone, OnnxBackbone]],
) -> None:
    reference, exported = tiny_pairs["bert"]
    config = make_config(
        name="ft", variant="finetune", backbone=reference.spec(), labels=["a", "b"]
    )
    with pytest.raises(BackboneError, match="finetune.*torch backend"):
        DynPromptModel(config, exported)
    embeds = torch.randn(1, 4, reference.hidden_size, requires_grad=True)
    with pytest.raises(BackboneError, match="inference-only"):
        exported.hidden_states(embeds, torch.ones(1, 4, dtype=torch.long))


def test_unsupported_dtype_and_level_are_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="float32 or float16"):
        load_onnx_backbone(str(tiny_bert_dir), dtype=torch.bfloat16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="optimization_level"):
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=tmp_path, optimization_level="max")


# --------------------------------------------------------------------------- cache
def test_export_is_cached_with_a_complete_manifest(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynprompt.models.onnx_export")
    first = load_onnx_backbone(str(tiny_bert_dir), cache_dir=tmp_path)
    assert "exporting backbone" in caplog.text
    folder = export_dir_of(tmp_path)
    assert isinstance(first, OnnxBackbone) and first.export_dir == folder
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["backbone"]["fingerprint"] == first.fingerprint
    assert manifest["backbone"]["family"] == "encoder"
    assert manifest["backbone"]["hidden_size"] == 32
    assert manifest["opset"] == onnx_export.DEFAULT_OPSET
    assert {"torch", "onnx", "onnxscript", "transformers"} <= set(manifest["versions"])
    assert HIDDEN_FILE in manifest["files"] and VERBALIZER_FILE not in manifest["files"]
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_file(folder / name)
    mtime = (folder / HIDDEN_FILE).stat().st_mtime_ns
    caplog.clear()
    load_onnx_backbone(str(tiny_bert_dir), cache_dir=tmp_path)
    assert "exporting" not in caplog.text and "rebuilding" not in caplog.text
    assert (folder / HIDDEN_FILE).stat().st_mtime_ns == mtime


def test_cache_root_comes_from_the_environment(
    tiny_bert_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(cache))
    backbone = load_onnx_backbone(str(tiny_bert_dir))
    assert isinstance(backbone, OnnxBackbone) and backbone.export_dir == export_dir_of(cache)


def test_stale_fingerprint_is_rebuilt_or_refused(
    tiny_bert_dir: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = export_dir_of(cache)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    real = manifest["backbone"]["fingerprint"]
    manifest["backbone"]["fingerprint"] = "0" * 32
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(OnnxExportError, match=r"manifest\.json: exported from weights 0{32}"):
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache, build=False)
    caplog.set_level(logging.WARNING, logger="dynprompt.models.onnx_export")
    backbone = load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache)
    assert "stale" in caplog.text and "0" * 32 in caplog.text
    assert json.loads(manifest_path.read_text())["backbone"]["fingerprint"] == real
    embeds = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        want = tiny_backbone("bert").hidden_states(embeds, mask)
    assert (backbone.hidden_states(embeds, mask) - want).abs().max() < 1e-4


def test_corrupt_file_is_rebuilt_or_refused_naming_it(
    tiny_bert_dir: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = export_dir_of(cache)
    graph = folder / HIDDEN_FILE
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte altered
    graph.write_bytes(bytes(data))

    with pytest.raises(OnnxExportError, match=rf"{graph}: sha256 does not match"):
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache, build=False)
    caplog.set_level(logging.WARNING, logger="dynprompt.models.onnx_export")
    load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache)
    assert "corrupt" in caplog.text and str(graph) in caplog.text
    assert (
        sha256_file(graph)
        == json.loads((folder / MANIFEST_FILE).read_text())["files"][HIDDEN_FILE]["sha256"]
    )

    graph.write_bytes(graph.read_bytes()[:100])  # truncated
    with pytest.raises(OnnxExportError, match=rf"{graph}: 100 bytes"):
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache, build=False)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(OnnxExportError, match=r"manifest\.json: unreadable manifest"):
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache, build=False)


def test_corrupt_export_that_cannot_be_rebuilt_is_a_clear_error(
    tiny_bert_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = export_dir_of(cache) / HIDDEN_FILE
    graph.unlink()

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise OSError("No space left on device")

    monkeypatch.setattr(onnx_export, "export_backbone", broken)
    with pytest.raises(OnnxExportError) as error:
        load_onnx_backbone(str(tiny_bert_dir), cache_dir=cache)
    message = str(error.value)
    assert f"{graph}: file missing" in message
    assert "rebuilding the export failed" in message and "No space left" in message


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OnnxExportError, match="not an ONNX export folder"):
        export_backbone(tiny_backbone("bert"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- CLI
def test_export_cli_writes_and_checks(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    assert export_main(["--backbone", str(tiny_bert_dir), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "hidden.onnx" in printed and "check ok" in printed
    assert (out / MANIFEST_FILE).is_file()
    (out / MANIFEST_FILE).write_text("{}")
    assert export_main(["--backbone", str(tiny_bert_dir), "--out", str(out)]) == 0  # rebuilt
    assert json.loads((out / MANIFEST_FILE).read_text())["format_version"] == 1
    assert export_main(["--backbone", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "cannot load backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        export_main(["--help"])
    assert exit_.value.code == 0
    assert "--check" in capsys.readouterr().out


def test_float16_export_runs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """fp16 is meant for the CUDA provider; on CPU it must still load and be close."""
    backbone = load_onnx_backbone(str(tiny_bert_dir), dtype=torch.float16, cache_dir=tmp_path)
    assert (cache_dir_for(backbone.fingerprint, torch.float16, tmp_path) / MANIFEST_FILE).is_file()
    embeds = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        want = tiny_backbone("bert").hidden_states(embeds, mask)
    got = backbone.hidden_states(embeds.half(), mask)
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max() < 2e-2


# --------------------------------------------------------------------------- HTTP
def test_http_answers_match_torch_backend(
    onnx_cache: Path, minilm_onnx: Backbone, tmp_path: Path
) -> None:
    """`dynprompt serve --backend onnx` answers as the torch server does, within 1e-4."""
    from tests.server_util import build_repository, start_server

    dev = [text for text, _ in sst2_rows("dev", 40)]
    repo = tmp_path / "repo"
    build_repository(repo)
    requests: list[dict[str, Any]] = [
        {"model": name, "inputs": dev[i * 6 : i * 6 + 6]}
        for i, name in enumerate(["ipos", "dyn", "pre", "ilen", "probe"])
    ]
    requests.append({"model": "ipos", "inputs": dev[30:31]})
    requests.append(
        {
            "model": "pair",
            "inputs": [
                {"text": a, "text_pair": b} for a, b in zip(dev[31:35], dev[35:39], strict=True)
            ],
        }
    )
    answers: dict[str, list[dict[str, Any]]] = {}
    common = ["--model-repository", str(repo), "--device", "cpu", "--max-wait-ms", "2"]
    for backend in ("torch", "onnx"):
        extra = (
            ["--backend", backend, "--onnx-cache-dir", str(onnx_cache)] if backend == "onnx" else []
        )
        with start_server(common + extra) as server, httpx.Client(timeout=60) as client:
            assert ("runs in ONNX Runtime" in server.logs()) == (backend == "onnx")
            answers[backend] = []
            for body in requests:
                response = client.post(
                    server.url + "/v1/classify",
                    json={**body, "return_all_scores": True, "return_routing": True},
                )
                assert response.status_code == 200, response.text
                answers[backend].append(response.json())
    for body, want, got in zip(requests, answers["torch"], answers["onnx"], strict=True):
        assert got["usage"] == want["usage"], body["model"]
        for g, w in zip(got["results"], want["results"], strict=True):
            assert g["label"] == w["label"] and g["truncated"] == w["truncated"], body["model"]
            routing, want_routing = dict(g["routing"]), dict(w["routing"])
            pool, want_pool = (
                routing.pop("pool_weights", None),
                want_routing.pop("pool_weights", None),
            )
            assert routing == want_routing, body["model"]
            assert (pool is None) == (want_pool is None)
            if pool is not None:
                assert max(abs(a - b) for a, b in zip(pool, want_pool, strict=True)) < TOL
            for label, p in w["scores"].items():
                assert abs(g["scores"][label] - p) < TOL, (body["model"], label)
