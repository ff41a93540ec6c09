"""The model set's lifecycle: identity and versions, one loader for start-up and reload,
safe reads, polling, and memory that comes back after a swap.

In-process tests drive a real `EngineCore` or `Registry` over real checkpoints on the real
MiniLM backbone; what is visible over HTTP (start-up with broken checkpoints, the empty
repository's stand-in, pinned versions, `--poll-s`, a FIFO) runs against a real
`dynprompt serve`.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dynprompt.models import Backbone, DynPromptModel, save_checkpoint, weights_checksum
from dynprompt.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from dynprompt.service import protocol, repository
from dynprompt.service.config import Settings
from dynprompt.service.core import FAILED, EngineCore
from dynprompt.service.metrics import ServiceMetrics
from dynprompt.service.protocol import Answer, Submission
from dynprompt.service.registry import Registry, RepositoryError
from dynprompt.service.scheduler import BatchLimits
from tests.server_util import Collect, build_model, offline_predictions, start_server

TEXTS = ["a gripping, funny film", "dull and far too long"]
PREFIX = {"variant": "prefix", "feature": "embeddings", "labels": ["negative", "positive"]}
_TICKETS = itertools.count(1)


def classify(core: EngineCore, model: str, version: int | None = None) -> Answer:
    target = Collect()
    now = time.monotonic()
    inputs: list[tuple[str, str | None]] = [(t, None) for t in TEXTS]
    sub = Submission(next(_TICKETS), "t", model, inputs, True, now, now + 60, version)
    core.submit(sub, target)
    return target.wait(sub.ticket)


def probs(answer: Answer) -> list[list[float]]:
    assert answer.error is None, answer.message
    return [row.probs for row in answer.rows]


def expected(model: DynPromptModel) -> list[list[float]]:
    return [r.probs for r in offline_predictions(model, TEXTS)]


def close(got: list[list[float]], want: list[list[float]]) -> bool:
    pairs = [(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)]
    return all(abs(a - b) < 1e-4 for a, b in pairs)


def write(path: Path, backbone: Backbone, seed: int, **choices: Any) -> DynPromptModel:
    model = build_model(path.name, backbone, seed=seed, **(choices or PREFIX))
    save_checkpoint(model, path)
    return model


def make_core(repo: Path, minilm: Backbone) -> EngineCore:
    settings = Settings.model_validate(
        {"model_repository": repo, "device": "cpu", "max_wait_ms": 0.0}
    )
    return EngineCore(settings, lambda name, device, dtype: minilm)


@pytest.fixture
def cores() -> Any:
    made: list[EngineCore] = []
    yield made
    for core in made:
        core.stop(30)


# --------------------------------------------------------------------------- identity


def test_versions_side_by_side_newest_by_default_and_pinned(
    tmp_path: Path, minilm: Backbone, cores: list[EngineCore]
) -> None:
    v1 = write(tmp_path / "v" / "1", minilm, seed=1)
    v2 = write(tmp_path / "v" / "2", minilm, seed=2)
    write(tmp_path / "u", minilm, seed=3)
    core = make_core(tmp_path, minilm)
    cores.append(core)
    core.load(tmp_path)

    cards = {card["name"]: card for card in core.models()}
    assert sorted(cards) == ["u", "v"]
    assert cards["v"]["model_version"] == 2 and cards["v"]["versions"] == [1, 2]
    assert cards["v"]["version"] == weights_checksum(tmp_path / "v" / "2")
    assert cards["u"]["model_version"] == 1 and cards["u"]["versions"] == [1]
    pinned = core.model("v", 1)
    assert pinned is not None and pinned["version"] == weights_checksum(tmp_path / "v" / "1")
    assert core.status()["versions"] == 3

    assert close(probs(classify(core, "v")), expected(v2))
    assert close(probs(classify(core, "v", 2)), expected(v2))
    assert close(probs(classify(core, "v", 1)), expected(v1))
    missing = classify(core, "v", 3)
    assert missing.error == protocol.NOT_FOUND
    assert missing.message == "model 'v' has no version 3; served versions: 1, 2"
    unknown = classify(core, "w")
    assert unknown.error == protocol.NOT_FOUND and "no model named 'w'" in unknown.message

    v3 = write(tmp_path / "v" / "3", minilm, seed=4)
    report = core.reload()
    assert report.loaded == ["v/3"] and report.unchanged == ["u", "v/1", "v/2"]
    assert close(probs(classify(core, "v")), expected(v3))
    shutil.rmtree(tmp_path / "v" / "3")
    report = core.reload()
    assert report.removed == ["v/3"] and report.loaded == []
    assert close(probs(classify(core, "v")), expected(v2))


def test_a_colliding_checkpoint_never_displaces_the_served_one(
    tmp_path: Path, minilm: Backbone, cores: list[EngineCore]
) -> None:
    served = write(tmp_path / "sst2", minilm, seed=0)
    core = make_core(tmp_path, minilm)
    cores.append(core)
    core.load(tmp_path)
    entry = core.registry.get("sst2")

    # Another folder that is also sst2 version 1: refused with its reason, sst2 untouched.
    write(tmp_path / "sst2" / "1", minilm, seed=5)
    report = core.reload()
    assert report.loaded == [] and report.unchanged == ["sst2"]
    assert list(report.refused) == [str(tmp_path / "sst2" / "1")]
    assert f"also the folder {tmp_path / 'sst2'}" in report.refused[str(tmp_path / "sst2" / "1")]
    assert core.registry.get("sst2") is entry

    # A copy whose dynprompt.json says "name": "sst2" is served under its own folder's name.
    shutil.copytree(tmp_path / "sst2", tmp_path / "aa_copy", ignore=shutil.ignore_patterns("1"))
    assert '"name": "sst2"' in (tmp_path / "aa_copy" / CONFIG_FILE).read_text()
    report = core.reload()
    assert report.loaded == ["aa_copy"] and report.unchanged == ["sst2"]
    assert core.registry.get("sst2") is entry
    assert core.model_names() == ["aa_copy", "sst2"]
    assert close(probs(classify(core, "sst2")), expected(served))

    # When neither colliding folder is served, neither is picked: both are refused.
    fresh = make_core(tmp_path, minilm)
    cores.append(fresh)
    fresh.load(tmp_path)
    assert fresh.model_names() == ["aa_copy"]
    assert fresh.registry.get("sst2") is None


# --------------------------------------------------------------------------- one loader


def break_checkpoints(repo: Path, backbone: Backbone) -> dict[str, str]:
    """Folders as a kill -9 during a write leaves them; name -> what each reason must say."""
    write(repo / "truncated", backbone, seed=1)
    weights = repo / "truncated" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write(repo / "json_only", backbone, seed=2)
    (repo / "json_only" / WEIGHTS_FILE).unlink()
    write(repo / "bad_json", backbone, seed=3)
    config = repo / "bad_json" / CONFIG_FILE
    config.write_text(config.read_text()[:200])
    # Only the temporary files of a write that never got renamed: not a checkpoint yet.
    write(repo / "temp_only", backbone, seed=4)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (repo / "temp_only" / name).rename(repo / "temp_only" / (name + ".tmp"))
    # A checkpoint being written into a hidden folder, to be renamed into place.
    write(repo / ".incoming" / "next", backbone, seed=5)
    return {
        "truncated": "not a readable safetensors file",
        "json_only": f"{WEIGHTS_FILE}: file not found",
        "bad_json": "invalid JSON",
    }


def test_start_up_serves_what_loads_and_fails_only_when_nothing_does(
    tmp_path: Path, minilm: Backbone, cores: list[EngineCore], caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    good = write(repo / "good", minilm, seed=0)
    reasons = break_checkpoints(repo, minilm)
    core = make_core(repo, minilm)
    cores.append(core)
    core.load(repo)
    assert core.model_names() == ["good"]
    assert close(probs(classify(core, "good")), expected(good))
    refused = {
        str(r.args[0]): r.getMessage()
        for r in caplog.records
        if str(r.msg).startswith("refused checkpoint") and isinstance(r.args, tuple)
    }
    assert sorted(refused) == sorted(str(repo / name) for name in reasons)
    for name, reason in reasons.items():
        assert reason in refused[str(repo / name)]
    # A reload of the same folder refuses the same checkpoints and keeps serving the rest.
    report = core.reload()
    assert report.unchanged == ["good"] and sorted(report.refused) == sorted(refused)

    shutil.rmtree(repo / "good")
    broken = make_core(repo, minilm)
    cores.append(broken)
    with pytest.raises(RepositoryError, match="no checkpoint could be loaded") as failed:
        broken.load(repo)
    assert broken.state == FAILED
    for name in reasons:
        assert str(repo / name) in str(failed.value)


def test_a_rescan_that_finds_nothing_keeps_the_served_set(
    tmp_path: Path, minilm: Backbone, cores: list[EngineCore]
) -> None:
    model = write(tmp_path / "a", minilm, seed=0)
    core = make_core(tmp_path, minilm)
    cores.append(core)
    core.load(tmp_path)
    shutil.rmtree(tmp_path / "a")
    write(tmp_path / "b", minilm, seed=1)
    (tmp_path / "b" / WEIGHTS_FILE).unlink()  # the only checkpoint left cannot load
    report = core.reload()
    assert report.kept and report.unchanged == ["a"] and report.removed == []
    assert "still serving the 1 model versions served before" in report.refused[str(tmp_path)]
    assert str(tmp_path / "b") in report.refused
    assert core.status() == {
        "state": "ready",
        "models": 1,
        "versions": 1,
        "failure": None,
        "serving_default": False,
    }
    assert close(probs(classify(core, "a")), expected(model))


# --------------------------------------------------------------------------- safe reads


def test_only_regular_files_inside_the_folder_under_the_caps_are_read(
    tmp_path: Path, minilm: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    write(repo / "good", minilm, seed=0)
    write(repo / "fifo", minilm, seed=1)
    (repo / "fifo" / CONFIG_FILE).unlink()
    os.mkfifo(repo / "fifo" / CONFIG_FILE)
    write(repo / "fifo_weights", minilm, seed=2)
    (repo / "fifo_weights" / WEIGHTS_FILE).unlink()
    os.mkfifo(repo / "fifo_weights" / WEIGHTS_FILE)
    write(tmp_path / "elsewhere", minilm, seed=3)
    write(repo / "escapes", minilm, seed=3)
    (repo / "escapes" / CONFIG_FILE).unlink()
    (repo / "escapes" / CONFIG_FILE).symlink_to(tmp_path / "elsewhere" / CONFIG_FILE)
    write(repo / "linked", minilm, seed=4)  # a symlink that stays inside its folder is fine
    (repo / "linked" / CONFIG_FILE).rename(repo / "linked" / "config-v4.json")
    (repo / "linked" / CONFIG_FILE).symlink_to("config-v4.json")
    write(repo / "huge", minilm, seed=5)
    with open(repo / "huge" / CONFIG_FILE, "a") as handle:  # valid JSON, 1 MiB of trailing space
        handle.write(" " * repository.MAX_CONFIG_BYTES)

    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(registry.reload(repo)), daemon=True)
    thread.start()
    thread.join(120)  # a FIFO that were opened for reading would block here for ever
    try:
        assert not thread.is_alive(), "reload blocked"
        report = done[0]
        assert sorted(report.loaded) == ["good", "linked"]
        refused = report.refused
        assert sorted(refused) == [
            str(repo / n) for n in ("escapes", "fifo", "fifo_weights", "huge")
        ]
        assert (
            f"{repo / 'fifo' / CONFIG_FILE}: a FIFO; only regular files"
            in refused[str(repo / "fifo")]
        )
        assert "a FIFO" in refused[str(repo / "fifo_weights")]
        assert "outside its checkpoint folder" in refused[str(repo / "escapes")]
        assert (
            f"over the limit of {repository.MAX_CONFIG_BYTES} bytes" in refused[str(repo / "huge")]
        )

        monkeypatch.setattr(repository, "MAX_WEIGHTS_BYTES", 1000)
        write(repo / "good", minilm, seed=6)  # changed: read again, now over the weights cap
        report = registry.reload(repo)
        assert "over the limit of 1000 bytes" in report.refused[str(repo / "good")]
        assert "good" in registry.current.models  # the version served before stays
    finally:
        registry.stop(30)


def test_an_unchanged_checkpoint_is_not_read_again(
    tmp_path: Path, minilm: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "a", minilm, seed=0)
    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    reads: list[Path] = []
    real = repository.inspect

    def counted(folder: Path) -> repository.Files:
        reads.append(folder)
        return real(folder)

    monkeypatch.setattr(repository, "inspect", counted)
    try:
        registry.reload(tmp_path)
        entry = registry.get("a")
        assert reads == [tmp_path / "a"]
        for _ in range(3):
            assert registry.reload(tmp_path).unchanged == ["a"]
        assert reads == [tmp_path / "a"], "an unchanged checkpoint was read again"
        os.utime(tmp_path / "a" / WEIGHTS_FILE)  # touched: read, found the same, not reloaded
        assert registry.reload(tmp_path).unchanged == ["a"]
        assert len(reads) == 2 and registry.get("a").model is entry.model  # type: ignore[union-attr]
        write(tmp_path / "a", minilm, seed=1)
        assert registry.reload(tmp_path).loaded == ["a"]
        assert registry.get("a").version == weights_checksum(tmp_path / "a")  # type: ignore[union-attr]
    finally:
        registry.stop(30)


# --------------------------------------------------------------------------- polling


def test_poll_loads_a_checkpoint_once_its_files_stop_changing(
    tmp_path: Path, minilm: Backbone, cores: list[EngineCore]
) -> None:
    write(tmp_path / "a", minilm, seed=0)
    core = make_core(tmp_path, minilm)
    cores.append(core)
    core.load(tmp_path)
    assert core.poll_once() is None  # nothing changed

    b = write(tmp_path / "b", minilm, seed=1)
    assert core.poll_once() is None and core.registry.get("b") is None  # new: wait one poll
    report = core.poll_once()
    assert report is not None and report.loaded == ["b"]
    assert close(probs(classify(core, "b")), expected(b))

    # A write in progress: weights half written. Never loaded while it changes.
    weights = tmp_path / "b" / WEIGHTS_FILE
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 3])
    assert core.poll_once() is None
    weights.write_bytes(whole[: 2 * len(whole) // 3])
    assert core.poll_once() is None
    b2 = write(tmp_path / "b", minilm, seed=2)
    assert core.poll_once() is None
    assert close(probs(classify(core, "b")), expected(b))  # the old version still serves
    report = core.poll_once()
    assert report is not None and report.loaded == ["b"] and not report.refused
    assert close(probs(classify(core, "b")), expected(b2))

    # A broken checkpoint is refused once, not again at every poll.
    write(tmp_path / "c", minilm, seed=3)
    (tmp_path / "c" / WEIGHTS_FILE).write_bytes(b"garbage")
    assert core.poll_once() is None
    report = core.poll_once()
    assert report is not None and list(report.refused) == [str(tmp_path / "c")]
    assert core.poll_once() is None and core.poll_once() is None

    shutil.rmtree(tmp_path / "b")  # a removal needs no second look
    report = core.poll_once()
    assert report is not None and report.removed == ["b"]
    assert core.model_names() == ["a"]


# --------------------------------------------------------------------------- memory


def compute_threads() -> int:
    return sum(t.name.startswith("dynprompt-compute") for t in threading.enumerate())


def test_reloading_a_changed_finetune_checkpoint_frees_the_old_copy(
    tmp_path: Path, minilm: Backbone
) -> None:
    finetune = {"variant": "finetune", "labels": ["negative", "positive"]}
    write(tmp_path / "ft", minilm, seed=0, **finetune)
    write(tmp_path / "shared", minilm, seed=1)
    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    try:
        registry.reload(tmp_path)
        assert registry.settle(60)
        threads, live = compute_threads(), registry.live()
        assert live == (2, 2)  # the shared backbone and the finetune copy, one worker each
        shared_worker = registry.get("shared").worker  # type: ignore[union-attr]
        old_copies = []
        for seed in range(2, 7):
            old = registry.get("ft")
            assert old is not None
            old_copies.append(weakref.ref(old.model.backbone.model))
            del old
            model = write(tmp_path / "ft", minilm, seed=seed, **finetune)
            report = registry.reload(tmp_path)
            assert report.loaded == ["ft"] and report.unchanged == ["shared"]
            assert registry.settle(120)
            assert compute_threads() == threads and registry.live() == live
            assert registry.get("shared").worker is shared_worker  # type: ignore[union-attr]
        gc.collect()
        assert [ref() for ref in old_copies] == [None] * 5, "an old backbone copy is still alive"
        served = registry.get("ft")
        assert served is not None and served.model.backbone.model is not None
        assert served.version == weights_checksum(tmp_path / "ft")
        del model
    finally:
        registry.stop(30)


def rss_mib() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) >> 10


@pytest.mark.skipif(
    not os.environ.get("DYNPROMPT_RSS_RELOADS"),
    reason="a measurement, not a check: set DYNPROMPT_RSS_RELOADS=N to run it",
)
def test_rss_over_finetune_reloads(tmp_path: Path, minilm: Backbone) -> None:
    """Prints the resident size after each of N reloads of a changed finetune checkpoint
    (docs/reliability.md); fails only if threads or backbones pile up."""
    finetune = {"variant": "finetune", "labels": ["negative", "positive"]}
    reloads = int(os.environ["DYNPROMPT_RSS_RELOADS"])
    write(tmp_path / "ft", minilm, seed=0, **finetune)
    registry = Registry(lambda *a: minilm, "cpu", torch.float32, BatchLimits(), ServiceMetrics())
    try:
        registry.reload(tmp_path)
        registry.settle(60)
        threads, live = compute_threads(), registry.live()
        sizes = [rss_mib()]
        for seed in range(1, reloads + 1):
            write(tmp_path / "ft", minilm, seed=seed, **finetune)
            assert registry.reload(tmp_path).loaded == ["ft"]
            registry.settle(120)
            sizes.append(rss_mib())
        print(f"\nRSS MiB after 0..{reloads} reloads: {sizes}")
        assert compute_threads() == threads and registry.live() == live
    finally:
        registry.stop(30)


# --------------------------------------------------------------------------- over HTTP


def test_server_starts_with_what_loads_pins_versions_and_never_blocks_on_a_fifo(
    tmp_path: Path, minilm: Backbone
) -> None:
    repo = tmp_path / "repo"
    v1 = write(repo / "v" / "1", minilm, seed=1)
    v2 = write(repo / "v" / "2", minilm, seed=2)
    reasons = break_checkpoints(repo, minilm)
    write(repo / "fifo", minilm, seed=6)
    (repo / "fifo" / CONFIG_FILE).unlink()
    os.mkfifo(repo / "fifo" / CONFIG_FILE)
    server = start_server(["--model-repository", str(repo)], log_dir=tmp_path / "logs")
    try:
        models = httpx.get(server.url + "/v1/models", timeout=30).json()["models"]
        assert [m["name"] for m in models] == ["v"]
        assert models[0]["version"] == weights_checksum(repo / "v" / "2")
        for version, model in ((None, v2), (2, v2), (1, v1)):
            body: dict[str, Any] = {"model": "v", "inputs": TEXTS, "return_all_scores": True}
            if version is not None:
                body["version"] = version
            r = httpx.post(server.url + "/v1/classify", json=body, timeout=60)
            assert r.status_code == 200, r.text
            got = [list(res["scores"].values()) for res in r.json()["results"]]
            assert close(got, expected(model)), version
        r = httpx.post(
            server.url + "/v1/classify", json={"model": "v", "inputs": TEXTS, "version": 3}
        )
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "model 'v' has no version 3; served versions: 1, 2"
        refused = [rec["msg"] for rec in server.log_records() if "refused checkpoint" in rec["msg"]]
        for name in [*reasons, "fifo"]:
            assert any(str(repo / name) in msg for msg in refused), name

        r = httpx.post(server.url + "/v1/admin/reload", timeout=120)  # the FIFO is still there
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["unchanged"] == ["v/1", "v/2"] and report["loaded"] == []
        assert sorted(x["path"] for x in report["refused"]) == sorted(
            str(repo / name) for name in [*reasons, "fifo"]
        )
    finally:
        code = server.stop(60)
    assert code == 0, server.logs()[-3000:]


def test_a_server_with_no_checkpoint_that_loads_exits_1(tmp_path: Path, minilm: Backbone) -> None:
    reasons = break_checkpoints(tmp_path / "repo", minilm)
    server = start_server(
        ["--model-repository", str(tmp_path / "repo")], wait=False, log_dir=tmp_path / "logs"
    )
    try:
        assert server.wait(180) == 1
    finally:
        server.kill()
    logs = server.logs()
    assert "no checkpoint could be loaded" in logs
    for name, reason in reasons.items():
        assert str(tmp_path / "repo" / name) in logs and reason in logs


def test_an_empty_repository_serves_the_default_until_a_reload_finds_checkpoints(
    tmp_path: Path, minilm: Backbone
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    server = start_server(["--model-repository", str(repo)], log_dir=tmp_path / "logs")
    try:

        def names() -> list[str]:
            models = httpx.get(server.url + "/v1/models", timeout=30).json()["models"]
            return [m["name"] for m in models]

        def reload() -> dict[str, Any]:
            r = httpx.post(server.url + "/v1/admin/reload", timeout=120)
            assert r.status_code == 200, r.text
            result: dict[str, Any] = r.json()
            return result

        assert names() == ["sst2"]  # the shipped default stands in
        report = reload()
        assert report["unchanged"] == ["sst2"] and report["loaded"] == []
        assert report["refused"][0]["path"] == str(repo)
        assert "holds no checkpoints" in report["refused"][0]["reason"]

        model = write(repo / "mine", minilm, seed=0)
        report = reload()
        assert report["loaded"] == ["mine"] and report["removed"] == ["sst2"]
        assert names() == ["mine"]

        shutil.rmtree(repo / "mine")  # emptied: the served set stays, and the reply says so
        report = reload()
        assert report["unchanged"] == ["mine"] and report["removed"] == []
        assert "no checkpoint that can be served" in report["refused"][0]["reason"]
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
        r = httpx.post(
            server.url + "/v1/classify",
            json={"model": "mine", "inputs": TEXTS, "return_all_scores": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        got = [list(res["scores"].values()) for res in r.json()["results"]]
        assert close(got, expected(model))
    finally:
        code = server.stop(60)
    assert code == 0, server.logs()[-3000:]


def test_poll_serves_a_checkpoint_moved_into_the_repository(
    tmp_path: Path, minilm: Backbone
) -> None:
    repo = tmp_path / "repo"
    write(repo / "a", minilm, seed=0)
    server = start_server(
        ["--model-repository", str(repo)],
        env={"DYNPROMPT_POLL_S": "0.2"},
        log_dir=tmp_path / "logs",
    )
    try:
        model = write(repo / ".incoming" / "b", minilm, seed=1)
        (repo / ".incoming" / "b").rename(repo / "b")
        deadline = time.monotonic() + 60
        names: list[str] = []
        while time.monotonic() < deadline and names != ["a", "b"]:
            time.sleep(0.2)
            names = [m["name"] for m in httpx.get(server.url + "/v1/models").json()["models"]]
        assert names == ["a", "b"]
        r = httpx.post(
            server.url + "/v1/classify",
            json={"model": "b", "inputs": TEXTS, "return_all_scores": True},
            timeout=60,
        )
        got = [list(res["scores"].values()) for res in r.json()["results"]]
        assert close(got, expected(model))
    finally:
        code = server.stop(60)
    assert code == 0, server.logs()[-3000:]
