"""Settings of `dynprompt train` / `eval`: every flag they accepted before the move to
pydantic-settings still lands in its field; where settings come from; the learning-rate
schedules (now transformers') give the numbers the shipped model was trained with; the
top-level command's usage; fast `--help`."""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dynprompt.cli import main as dynprompt_main
from dynprompt.training.cli import eval_parser, resolve_train_config, train_parser
from dynprompt.training.config import ConfigError, TrainConfig
from dynprompt.training.trainer import _trainable_state, lr_factor, train
from tests.test_training import tiny_config
from tests.tiny_models import tiny_backbone

REPO = Path(__file__).resolve().parents[1]

# Every flag of `dynprompt train --help` before the move to pydantic-settings (copied from
# that help), with a value and the field (and value) it must land in. A data source
# (`--train-file t.tsv`) is added to rows that do not give one.
TRAIN_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--name", "2024"], "name", "2024"),
    (["--variant", "dynamic"], "variant", "dynamic"),
    (["--backbone", "some/folder"], "backbone", "some/folder"),
    (["--prompt-length", "7"], "prompt_length", 7),
    (["--pool-size", "3"], "pool_size", 3),
    (["--feature", "embeddings"], "feature", "embeddings"),
    (["--prompt-init", "uniform"], "prompt_init", "uniform"),
    (["--pooling", "first"], "pooling", "first"),
    (["--head", "verbalizer"], "head", "verbalizer"),
    (["--label-words", "bad,good"], "label_words", ["bad", "good"]),
    (["--word-score", "mean"], "word_score", "mean"),
    (["--max-length", "99"], "max_length", 99),
    (["--truncation-side", "left"], "truncation_side", "left"),
    (["--preset", "sst2"], "preset", "sst2"),
    (["--train-file", "a.tsv"], "train_file", "a.tsv"),
    (["--dev-file", "d.tsv"], "dev_file", "d.tsv"),
    (["--format", "csv"], "format", "csv"),
    (["--has-header"], "has_header", True),
    (["--no-has-header"], "has_header", False),
    (["--text-field", "1"], "text_field", "1"),
    (["--pair-field", "hypothesis"], "pair_field", "hypothesis"),
    (["--label-field", "stars"], "label_field", "stars"),
    (["--labels", "neg,pos"], "labels", ["neg", "pos"]),
    (["--dev-fraction", "0.25"], "dev_fraction", 0.25),
    (["--regime", "fewshot", "--shots", "4"], "regime", "fewshot"),
    (["--shots", "4"], "shots", 4),
    (["--data-dir", "elsewhere"], "data_dir", "elsewhere"),
    (["--split-seed", "3"], "split_seed", 3),
    (["--max-train-examples", "50"], "max_train_examples", 50),
    (["--optimizer", "adafactor"], "optimizer", "adafactor"),
    (["--lr-prompt", "1e-2"], "lr_prompt", 0.01),
    (["--lr-router", "0.5"], "lr_router", 0.5),
    (["--lr-head", "0.25"], "lr_head", 0.25),
    (["--lr-backbone", "2e-5"], "lr_backbone", 2e-5),
    (["--weight-decay", "0"], "weight_decay", 0.0),
    (["--lr-schedule", "cosine"], "lr_schedule", "cosine"),
    (["--warmup-steps", "5"], "warmup_steps", 5),
    (["--max-grad-norm", "null"], "max_grad_norm", None),
    (["--max-grad-norm", "2.5"], "max_grad_norm", 2.5),
    (["--batch-size", "4"], "batch_size", 4),
    (["--grad-accum", "2"], "grad_accum", 2),
    (["--max-steps", "12"], "max_steps", 12),
    (["--bucket-by-length"], "bucket_by_length", True),
    (["--no-bucket-by-length"], "bucket_by_length", False),
    (["--tau-start", "2.0"], "tau_start", 2.0),
    (["--tau-min", "0.25"], "tau_min", 0.25),
    (["--tau-schedule", "cosine"], "tau_schedule", "cosine"),
    (["--tau-anneal-steps", "30"], "tau_anneal_steps", 30),
    (["--eval-every", "5"], "eval_every", 5),
    (["--eval-limit", "null"], "eval_limit", None),
    (["--final-eval-limit", "20"], "final_eval_limit", 20),
    (["--eval-batch-size", "8"], "eval_batch_size", 8),
    (["--metric", "macro_f1"], "metric", "macro_f1"),
    (["--keep-best"], "keep_best", True),
    (["--no-keep-best"], "keep_best", False),
    (["--early-stopping", "3"], "early_stopping", 3),
    (["--log-every", "2"], "log_every", 2),
    (["--output-dir", "runs/x"], "output_dir", "runs/x"),
    (["--checkpoint-dir", "ckpts"], "checkpoint_dir", "ckpts"),
    (["--resume"], "resume", True),
    (["--no-resume"], "resume", False),
    (["--save-every", "6"], "save_every", 6),
    (["--seed", "11"], "seed", 11),
    (["--device", "cuda"], "device", "cuda"),
    (["--mixed-precision", "bf16"], "mixed_precision", "bf16"),
    (["--num-threads", "3"], "num_threads", 3),
    (["--plots"], "plots", True),
    (["--no-plots"], "plots", False),
    (["--quiet"], "quiet", True),
    (["--no-quiet"], "quiet", False),
    (["--set", "max_steps=7"], "max_steps", 7),
    (["--set", "labels=[a, b]"], "labels", ["a", "b"]),
    (["--set", "tasks=[{preset: rte}, {preset: cb}]"], "tasks", ["rte", "cb"]),
    (["--task", "rte"], "tasks", ["rte"]),
    (["--task", "rte", "--task", "cb"], "tasks", ["rte", "cb"]),
    (["--config", "{config}"], "lr_head", 0.125),
]
SOURCES = {"--preset", "--train-file", "--task", "--set", "--config"}


@pytest.mark.parametrize(("argv", "field", "expected"), TRAIN_FLAGS)
def test_every_train_flag_lands_in_its_field(
    argv: list[str], field: str, expected: Any, tmp_path: Path
) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train_file: t.tsv\nlr_head: 0.125\n")
    argv = [a.replace("{config}", str(config_file)) for a in argv]
    given = set(argv) & SOURCES
    if not given or (given == {"--set"} and field != "tasks"):
        argv = ["--train-file", "t.tsv", *argv]
    config, args = resolve_train_config(argv)
    value = getattr(config, field)
    if field == "tasks":
        value = [t.preset for t in value]
    assert value == expected and type(value) is type(expected), (argv, value)


def test_print_config_prints_the_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    from dynprompt.training.cli import train_main

    assert train_main(["--preset", "sst2", "--max-steps", "9", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == "sst2" and printed["max_steps"] == 9


# Every flag of `dynprompt eval --help` before the change, with where it lands.
EVAL_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--preset", "rte"], "preset", "rte"),
    (["--split", "test"], "split", "test"),
    (["--regime", "fewshot32"], "regime", "fewshot32"),
    (["--data-dir", "d"], "data_dir", "d"),
    (["--split-seed", "2"], "split_seed", 2),
    (["--file", "x.jsonl"], "file", "x.jsonl"),
    (["--format", "jsonl"], "format", "jsonl"),
    (["--no-header"], "has_header", False),
    (["--text-field", "review"], "text_field", "review"),
    (["--pair-field", "b"], "pair_field", "b"),
    (["--label-field", "stars"], "label_field", "stars"),
    (["--limit", "10"], "limit", 10),
    (["--batch-size", "8"], "batch_size", 8),
    (["--device", "cuda:1"], "device", "cuda:1"),
    (["--backbone", "bb"], "backbone", "bb"),
    (["--json", "out.json"], "json_out", "out.json"),
    (["--output", "json"], "output", "json"),
    (["--output-format", "json"], "output", "json"),
    (["--plot", "r.png"], "plot", "r.png"),
]


@pytest.mark.parametrize(("argv", "field", "expected"), EVAL_FLAGS)
def test_every_eval_flag_lands_in_its_field(argv: list[str], field: str, expected: Any) -> None:
    args = eval_parser().parse_args(["ckpt", *argv])
    assert args.checkpoint == "ckpt"
    assert getattr(args, field) == expected


def test_one_spelling_per_flag_across_subcommands() -> None:
    from dynprompt.training.predict import predict_parser

    helps = {
        "train": train_parser().format_help(),
        "eval": eval_parser().format_help(),
        "predict": predict_parser().format_help(),
    }
    for name, text in helps.items():
        assert "--header, --no-header" in text, name
        assert "--has-header" not in text and "--no-has-header" not in text, name
        assert "--num-threads" in text and "--text-field" in text, name
    assert "--task " not in helps["train"] and "--preset PRESET" in helps["train"]
    # The old spellings still parse, into the same field.
    assert eval_parser().parse_args(["c", "--no-has-header"]).has_header is False
    assert eval_parser().parse_args(["c", "--header"]).has_header is True
    assert resolve_train_config(["--train-file", "t", "--no-header"])[0].has_header is False
    # --num-threads: the same default and the same "null" (torch's choice) everywhere.
    assert resolve_train_config(["--train-file", "t"])[0].num_threads == 1
    assert (
        resolve_train_config(["--train-file", "t", "--num-threads", "null"])[0].num_threads is None
    )
    assert eval_parser().parse_args(["c"]).num_threads == 1
    assert predict_parser().parse_args(["c", "-", "--num-threads", "null"]).num_threads is None
    assert predict_parser().parse_args(["c", "-", "--num-threads", "2"]).num_threads == 2
    # --format is the input's format in all three; predict names its output's format
    # --output-format (its old --input-format still parses, out of the help).
    for name, text in helps.items():
        assert "--format {tsv,csv,jsonl}" in text, name
    assert "--output-format {jsonl,csv}" in helps["predict"]
    assert "--input-format" not in helps["predict"]
    assert resolve_train_config(["--train-file", "t", "--format", "csv"])[0].format == "csv"
    assert eval_parser().parse_args(["c", "--format", "csv"]).format == "csv"
    for flag in ("--format", "--input-format"):
        parsed = predict_parser().parse_args(["c", "-", flag, "csv"])
        assert (parsed.format, parsed.output_format) == ("csv", "jsonl"), flag
    parsed = predict_parser().parse_args(["c", "-", "--output-format", "csv"])
    assert (parsed.format, parsed.output_format) == (None, "csv")


def test_sources_in_order_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('preset = "sst2"\nlr_prompt = 0.02\nbatch_size = 16\nseed = 4\n')
    monkeypatch.setenv("DYNPROMPT_TRAIN_BATCH_SIZE", "24")
    monkeypatch.setenv("DYNPROMPT_TRAIN_SEED", "5")
    monkeypatch.setenv("DYNPROMPT_TRAIN_LABEL_WORDS", '["bad", "good"]')
    config, _ = resolve_train_config(["--config", str(toml_file), "--seed", "6"])
    assert config.lr_prompt == 0.02  # file
    assert config.batch_size == 24  # env beats file
    assert config.seed == 6  # flag beats env
    assert config.label_words == ["bad", "good"]
    monkeypatch.setenv("DYNPROMPT_TRAIN_MAX_STEPS", "-3")
    with pytest.raises(ConfigError, match=r"field 'max_steps'"):
        resolve_train_config(["--config", str(toml_file)])
    with pytest.raises(ConfigError, match=r"given both as a flag and with --set"):
        resolve_train_config(["--preset", "sst2", "--seed", "1", "--set", "seed=2"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("preset: [unclosed\n")
        resolve_train_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_train_config(["--config", str(tmp_path / "missing.yaml")])


def test_variant_names_match_the_model_core() -> None:
    """training.config repeats the variant names and the name pattern so that `--help`
    does not import torch; the copies must agree with the model core's."""
    from dynprompt.models import config as core
    from dynprompt.training import config as training

    assert typing.get_args(training.Variant) == typing.get_args(core.Variant)
    assert training.NAME_PATTERN.pattern == core.NAME_PATTERN.pattern


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from dynprompt.cli import main\n"
        "for cmd in ('train', 'eval', 'predict'):\n"
        "    try:\n"
        "        main([cmd, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("heavy: []"), out.stdout[-300:]


def test_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert dynprompt_main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: dynprompt" in captured.err
    assert "--version" in captured.err and "predict" in captured.err
    assert dynprompt_main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out
    assert dynprompt_main(["--version"]) == 0
    assert capsys.readouterr().out.strip()


def test_default_config_writes_to_runs_not_the_shipped_model() -> None:
    config, _ = resolve_train_config(["--config", str(REPO / "configs" / "sst2_default.yaml")])
    root = config.checkpoints_root
    assert root.parts[0] == "runs", root
    assert "default_model" not in str(root)
    docs = (REPO / "docs" / "training.md").read_text()
    assert "runs/sst2_default/checkpoints/sst2" in docs and "dynprompt/default_model/sst2" in docs


# --------------------------------------------------------------------------- schedules


def _old_lr_factor(step: int, config: TrainConfig) -> float:
    """The hand-written schedule the shipped default model was trained with (before
    `transformers.get_scheduler`), verbatim."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(
    ("warmup", "steps"), [(100, 2000), (0, 50), (6, 60), (50, 1000), (10, 10), (20, 5)]
)
def test_lr_schedule_gives_the_numbers_it_always_gave(
    schedule: str, warmup: int, steps: int
) -> None:
    config = TrainConfig(preset="sst2", lr_schedule=schedule, warmup_steps=warmup, max_steps=steps)  # type: ignore[arg-type]
    for step in range(steps):
        new, old = lr_factor(step, config), _old_lr_factor(step, config)
        # transformers computes linear decay as (T - s) / (T - W), the old code as
        # 1 - (s - W) / (T - W): equal up to the last bit of a double ...
        assert new == pytest.approx(old, rel=1e-15, abs=1e-15), step
        # ... and equal as the float32 rates an optimizer step applies.
        for base in (1e-2, 5e-3, 3e-5):
            assert np.float32(base * new) == np.float32(base * old), (step, base)


def test_shipped_recipe_schedule_step_by_step() -> None:
    """configs/sst2_default.yaml's 2,000 steps: warmup to full rate at step 99, then linear
    decay; the recorded training of the shipped model used exactly these rates."""
    file = yaml.safe_load((REPO / "configs" / "sst2_default.yaml").read_text())
    config = TrainConfig.model_validate(file)
    assert (config.warmup_steps, config.max_steps, config.lr_schedule) == (100, 2000, "linear")
    rates = [config.lr_prompt * lr_factor(s, config) for s in range(config.max_steps)]
    old = [config.lr_prompt * _old_lr_factor(s, config) for s in range(config.max_steps)]
    assert np.array_equal(np.float32(rates), np.float32(old))
    assert rates[0] == pytest.approx(1e-4) and rates[99] == pytest.approx(1e-2)
    assert rates[1999] == pytest.approx(1e-2 / 1900)


def test_training_with_the_old_schedule_gives_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynprompt.training.trainer as trainer
    from dynprompt.models import load_checkpoint

    backbone = tiny_backbone("bert")
    fields = {"max_steps": 12, "warmup_steps": 4, "eval_every": 12, "lr_schedule": "linear"}
    weights = []
    for run, schedule in (("new", lr_factor), ("old", _old_lr_factor)):
        monkeypatch.setattr(trainer, "lr_factor", schedule)
        (tmp_path / run).mkdir()
        result = train(tiny_config(tmp_path / run, **fields), backbone=backbone, log=print)
        weights.append(_trainable_state(load_checkpoint(result.checkpoints["toy"], backbone)))
    new, old = weights
    assert new.keys() == old.keys()
    for key in new:
        assert torch.equal(new[key], old[key]), key


# --------------------------------------------------------------------------- ONNX cache


def test_onnx_cache_root_has_one_name_and_reads_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynprompt.models import onnx_export

    monkeypatch.delenv("DYNPROMPT_ONNX_CACHE_DIR", raising=False)
    monkeypatch.delenv("DYNPROMPT_ONNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_export.default_cache_root() == tmp_path / "xdg" / "dynprompt" / "onnx"
    monkeypatch.setenv("DYNPROMPT_ONNX_CACHE", str(tmp_path / "old"))
    assert onnx_export.default_cache_root() == tmp_path / "old"
    monkeypatch.setenv("DYNPROMPT_ONNX_CACHE_DIR", str(tmp_path / "new"))
    assert onnx_export.default_cache_root() == tmp_path / "new"
    assert onnx_export.CACHE_ENV == "DYNPROMPT_ONNX_CACHE_DIR"
    # `dynprompt serve --onnx-cache-dir` is the same variable.
    from dynprompt.service.config import env_name

    assert env_name("onnx_cache_dir") == onnx_export.CACHE_ENV


def test_onnx_export_lock_excludes_other_processes(tmp_path: Path) -> None:
    from dynprompt.models.onnx_export import export_lock

    export_dir = tmp_path / "cache" / "abc" / "float32"
    probe = (
        "import sys\n"
        "from filelock import FileLock, Timeout\n"
        "try:\n"
        "    FileLock(sys.argv[1]).acquire(timeout=0.2)\n"
        "    print('acquired')\n"
        "except Timeout:\n"
        "    print('busy')\n"
    )
    lock_file = export_dir.parent / ".float32.lock"

    def other_process() -> str:
        out = subprocess.run(
            [sys.executable, "-c", probe, str(lock_file)], capture_output=True, text=True
        )
        return out.stdout.strip()

    with export_lock(export_dir):
        assert lock_file.exists()
        assert other_process() == "busy"
    assert other_process() == "acquired"
