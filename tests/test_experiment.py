"""The experiment runner: its statistics against values computed here by other means,
the report's sections, and `--parallel` workers sharing a resumable run cache."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from dynprompt.training import experiment as ex
from dynprompt.training.intervals import (
    paired_interval,
    regularized_beta,
    t_cdf,
    t_quantile,
    welch_interval,
)
from tests.conftest import DATA
from tests.tiny_models import tiny_backbone

# Two-sided 95% critical values of Student's t, from printed tables.
T_TABLE = {1: 12.7062047362, 2: 4.3026527297, 4: 2.7764451052, 9: 2.2621571628, 29: 2.0452296421}


def t_pdf(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def integrated_cdf(x: float, df: float, steps: int = 2_000) -> float:
    """P(T <= x) by Simpson's rule on the density (independent of the beta function)."""
    h = x / steps
    total = t_pdf(0, df) + t_pdf(x, df)
    total += sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + total * h / 3


def independent_quantile(p: float, df: float) -> float:
    low, high = 0.0, 100.0
    for _ in range(48):
        mid = (low + high) / 2
        low, high = (mid, high) if integrated_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_tables_and_the_integrated_density(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-8)
    for p in (0.9, 0.975):
        assert t_quantile(p, df) == pytest.approx(independent_quantile(p, df), abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-T_TABLE[df], abs=1e-8)
    assert t_cdf(1.3, df) == pytest.approx(integrated_cdf(1.3, df), abs=1e-9)
    # I_x(1, 1) = x and I_x(a, 1) = x^a: the beta function at its closed forms.
    assert regularized_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-12)
    assert regularized_beta(2.5, 1, 0.6) == pytest.approx(0.6**2.5, abs=1e-12)


def test_paired_interval_by_formula() -> None:
    a = [0.70, 0.74, 0.69, 0.80, 0.75]
    b = [0.68, 0.71, 0.66, 0.76, 0.72]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = independent_quantile(0.975, 4) * sd / math.sqrt(5)
    got = paired_interval(a, b)
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half), abs=1e-8)
    assert got.n == 5 and got.method == "paired t"
    assert got.excludes_zero  # +3.0 ± 0.9 points
    # Pairing matters: the same numbers shuffled across seeds give a wider interval.
    assert paired_interval(a, b[1:] + b[:1]).half_width > got.half_width


def test_welch_interval_by_formula() -> None:
    m1, s1, n1, m2, s2, n2 = 0.684, 0.015, 3, 0.672, 0.017, 3
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    half = independent_quantile(0.975, df) * math.sqrt(v1 + v2)
    got = welch_interval(m1, s1, n1, m2, s2, n2)
    assert (got.low, got.high) == pytest.approx((0.012 - half, 0.012 + half), abs=1e-8)
    assert not got.excludes_zero and got.method == "Welch t"


def records_for(accuracies: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    return [
        {
            "task": task,
            "method": method,
            "seed": seed,
            "accuracy": acc,
            "seconds": 2.0,
            "device": "CPU: test",
        }
        for method, by_task in accuracies.items()
        for task, values in by_task.items()
        for seed, acc in enumerate(values)
    ]


ACCURACIES = {
    "prefix": {"sst2": [0.70, 0.72, 0.71], "rte": [0.50, 0.52, 0.49]},
    "instance_position": {"sst2": [0.75, 0.76, 0.77], "rte": [0.52, 0.54, 0.50]},
    "task_position": {"sst2": [0.60, 0.62, 0.61], "rte": [0.45, 0.47, 0.44]},
    "dynamic": {"sst2": [0.74, 0.66, 0.72], "rte": [0.53, 0.46, 0.49]},
}


def test_paired_differences_per_task_and_average() -> None:
    records = records_for(ACCURACIES)
    diffs = ex.paired_differences(records, ["sst2", "rte"], "instance_position", [0, 1, 2])
    ip, pre = ACCURACIES["instance_position"], ACCURACIES["prefix"]
    for task in ("sst2", "rte"):
        mean, interval = diffs[task]
        assert interval is not None
        d = [x - y for x, y in zip(ip[task], pre[task], strict=True)]
        assert mean == pytest.approx(statistics.fmean(d))
        half = independent_quantile(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
        assert (interval.low, interval.high) == pytest.approx(
            (statistics.fmean(d) - half, statistics.fmean(d) + half), abs=1e-8
        )
    # The average: per seed, the mean over tasks of each method, then paired.
    per_seed = [
        (ip["sst2"][s] + ip["rte"][s]) / 2 - (pre["sst2"][s] + pre["rte"][s]) / 2 for s in range(3)
    ]
    mean, interval = diffs["average"]
    assert interval is not None
    assert mean == pytest.approx(statistics.fmean(per_seed))
    half = independent_quantile(0.975, 2) * statistics.stdev(per_seed) / math.sqrt(3)
    assert interval.half_width == pytest.approx(half, abs=1e-8)
    # A seed missing for one method drops out of that method's pairs.
    fewer = [r for r in records if not (r["method"] == "dynamic" and r["seed"] == 2)]
    partial = ex.paired_differences(fewer, ["sst2", "rte"], "dynamic", [0, 1, 2])
    assert partial["sst2"][1] is not None and partial["sst2"][1].n == 2
    one = [r for r in records if r["seed"] == 0]
    assert ex.paired_differences(one, ["sst2"], "dynamic", [0])["sst2"][1] is None


def test_verdicts_say_whether_the_interval_excludes_zero() -> None:
    records = records_for(ACCURACIES)
    tasks, seeds = ["sst2", "rte"], [0, 1, 2]
    sentences = {
        m: ex.verdict(m, *ex.paired_differences(records, tasks, m, seeds)["average"])
        for m in ("instance_position", "task_position", "dynamic")
    }
    assert "excludes zero: better than prefix" in sentences["instance_position"]
    assert "excludes zero: worse than prefix" in sentences["task_position"]
    assert "includes zero: no difference from prefix is established" in sentences["dynamic"]
    assert "paired t, 3 seeds" in sentences["dynamic"]
    assert "no interval" in ex.verdict("dynamic", 0.01, None)


def test_report_sections_from_runs_and_from_summaries(tmp_path: Path) -> None:
    tasks, methods = ["sst2", "rte"], list(ACCURACIES)
    runs = ex.Section(
        name="smollm2_gpu",
        backbone="smollm2",
        budget_name="gpu",
        budget=ex.budget_from("gpu", {"backbone": "smollm2"})[1],
        tasks=tasks,
        methods=methods,
        seeds=[0, 1, 2],
        records=records_for(ACCURACIES),
        devices=["GPU: test"],
        wall_seconds=1800.0,
        compute_seconds=7200.0,
        parallel=12,
    )
    legacy = ex.Section(
        name="minilm_cpu",
        backbone="minilm",
        budget_name="cpu",
        budget=ex.Budget(),
        tasks=tasks,
        methods=["prefix", "instance_position"],
        seeds=[0, 1, 2],
        summary={
            "prefix": {
                "sst2": [0.717, 0.023, 3],
                "rte": [0.478, 0.010, 3],
                "average": [0.6, 0.01, 3],
            },
            "instance_position": {
                "sst2": [0.712, 0.033, 3],
                "rte": [0.477, 0.033, 3],
                "average": [0.7, 0.01, 3],
            },
        },
        devices=["CPU: x86_64, 2 cores"],
        wall_seconds=67 * 60.0,
        note="Per-seed results were not kept.",
    )
    out = tmp_path / "results.md"
    stored = tmp_path / "results.json"
    ex.write_sections_report([legacy, runs], out, [("minilm", "gpu")], stored)
    text = out.read_text()
    assert text.index("## MiniLM") < text.index("## SmolLM2")
    assert "| prefix (vanilla prompt tuning) | 71.0 ± 1.0 | 50.3 ± 1.5 | 60.7 ± 1.2 |" in text
    # Paired cell: instance_position on sst2 is +5.0 points, every seed above prefix.
    d = [0.05, 0.04, 0.06]
    half = 100 * independent_quantile(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    assert f"**+5.0 [{5.0 - half:+.1f}, {5.0 + half:+.1f}]**" in text
    assert "Welch t on the means and standard deviations above" in text
    assert "paired t over seeds" in text
    assert "GPU: test, 12 worker processes. Wall time: 30 min" in text
    assert "all training data, 1000 steps of batch 32" in text
    assert "dynprompt experiment --budget gpu --parallel 12 --backbone minilm" in text
    assert "Per-seed results were not kept." in text
    assert out.with_suffix(".png").stat().st_size > 1000
    # The stored numbers rebuild the same sections without any run cache.
    again = ex.gather_sections(tmp_path / "no-runs", stored)
    assert [s.name for s in again] == ["minilm_cpu", "smollm2_gpu"]
    assert again[0].summary == legacy.summary
    assert sorted((r["method"], r["task"], r["seed"], r["accuracy"]) for r in again[1].records) == (
        sorted((r["method"], r["task"], r["seed"], r["accuracy"]) for r in runs.records)
    )
    assert again[1].budget == runs.budget and again[1].wall_seconds == 1800.0


def test_budget_presets_files_and_keys(tmp_path: Path) -> None:
    name, cpu = ex.budget_from("cpu")
    assert name == "cpu" and cpu == ex.Budget()
    # The key of the CPU budget the published MiniLM results were run under.
    assert cpu.key() == "66422eba3c0f"
    name, gpu = ex.budget_from("gpu", {"backbone": "smollm2"})
    assert (gpu.train_examples, gpu.dev_examples, gpu.batch_size) == (None, None, 32)
    assert gpu.steps >= 1000 and gpu.backbone == "smollm2"
    config = gpu.config_for("trec", "prefix", 0, "cpu")
    assert config.max_train_examples is None and config.final_eval_limit is None
    assert config.keep_best is False and config.eval_every == config.max_steps
    assert config.label_words == ex.LABEL_WORDS["trec"]
    path = tmp_path / "small.yaml"
    path.write_text("steps: 7\ntrain_examples: 20\n")
    name, small = ex.budget_from(str(path), {"backbone": "x/tiny-bert"})
    assert (name, small.steps, small.train_examples, small.backbone) == (
        "small",
        7,
        20,
        "x/tiny-bert",
    )
    assert ex.section_name(small.backbone, name) == "tiny-bert_small"
    assert ex.section_name("models/SmolLM2-135M.Q4_1.gguf", "gpu") == "smollm2-135m.q4_1_gpu"
    # Other label words re-run the prompt variants (verbalizers), not the baselines.
    words = ex.Budget(label_words={"sst2": ["bad", "good"]})
    assert words.key("prefix") != ex.Budget().key("prefix")
    assert words.key("linear_probe") == ex.Budget().key("linear_probe")


# ------------------------------------------------------------------- parallel workers


@pytest.mark.skipif(not (DATA / "sst2").is_dir(), reason=f"real data not found at {DATA}")
def test_parallel_workers_fill_the_cache_and_a_rerun_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone = tiny_backbone("bert")
    model_dir = tmp_path / "tiny-bert"
    backbone.model.save_pretrained(model_dir)
    backbone.tokenizer.save_pretrained(model_dir)
    budget = tmp_path / "tiny.yaml"
    budget.write_text(
        "train_examples: 16\ndev_examples: 16\nsteps: 2\nbatch_size: 4\n"
        "prompt_length: 3\nmax_length: {sst2: 32}\nwarmup_steps: 0\n"
    )
    runs, results = tmp_path / "runs", tmp_path / "docs" / "results.md"
    argv = [
        *("--budget", str(budget), "--backbone", str(model_dir), "--parallel", "2"),
        *("--tasks", "sst2", "--methods", "prefix", "instance_position", "--seeds", "0", "1"),
        *("--run-dir", str(runs), "--results", str(results), "--data-dir", str(DATA)),
        *("--device", "cpu"),
    ]
    assert ex.experiment_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 cached, 4 to train" in out and "2 worker processes on cpu" in out
    section = runs / "tiny-bert_tiny"
    files = sorted(section.glob("sst2/*/seed*.json"))
    assert [f.relative_to(section).as_posix() for f in files] == [
        "sst2/instance_position/seed0.json",
        "sst2/instance_position/seed1.json",
        "sst2/prefix/seed0.json",
        "sst2/prefix/seed1.json",
    ]
    for f in files:
        record = json.loads(f.read_text())
        assert record["steps"] == 2 and record["dev_examples"] == 16
        assert record["train_examples"] == 16 and 0.0 <= record["accuracy"] <= 1.0
    sessions = json.loads((section / ex.SECTION_FILE).read_text())["sessions"]
    assert [(s["trained"], s["parallel"]) for s in sessions] == [(4, 2)]
    text = results.read_text()
    assert "## `tiny-bert`, tiny budget" in text and "2 worker processes" in text
    assert "instance_position (backbone features) vs prefix: average" in text
    stamps = {f: f.stat().st_mtime_ns for f in files}

    assert ex.experiment_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs: 4 cached, 0 to train" in out and "0 runs trained" in out
    assert "worker processes" not in out
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert len(json.loads((section / ex.SECTION_FILE).read_text())["sessions"]) == 1
