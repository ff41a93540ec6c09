"""`dynprompt predict`: every input format with the checkpoint's stored mapping, answers
equal to the reference `predict`, streaming in bounded memory, bad rows, pairs."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dynprompt.models import load_backbone, load_checkpoint, predict
from dynprompt.training.predict import predict_main
from dynprompt.training.trainer import train
from tests.test_training import sentiment_file, tiny_config, topic_file
from tests.tiny_models import tiny_backbone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT saved as a local model folder, so a checkpoint names a loadable path."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    backbone = tiny_backbone("bert")
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def review_ckpt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained on a TSV whose text column is `review`, label column `stars`."""
    tmp = tmp_path_factory.mktemp("review")
    for split, n, seed in (("train", 48, 0), ("dev", 16, 1)):
        rows = sentiment_file(tmp / f"{split}_raw.tsv", n, seed).read_text().splitlines()[1:]
        (tmp / f"reviews_{split}.tsv").write_text(
            "id\treview\tstars\n" + "".join(f"{i}\t{r}\n" for i, r in enumerate(rows))
        )
    config = tiny_config(
        tmp,
        train_file=str(tmp / "reviews_train.tsv"),
        dev_file=str(tmp / "reviews_dev.tsv"),
        text_field="review",
        label_field="stars",
        backbone=str(tiny_dir),
        variant="dynamic",
        feature="embeddings",
        max_steps=3,
    )
    backbone = load_backbone(str(tiny_dir))
    result = train(config, backbone=backbone, log=lambda _m: None)
    return result.checkpoints["toy"]


TEXTS = [
    "the movie was great fun",
    "boring and very dull plot",
    "it is the best film",
    "sad bad acting",
    "fine story and a bright ending",
]


def _expected(ckpt: Path, tiny_dir: Path) -> list[dict[str, object]]:
    model = load_checkpoint(ckpt, load_backbone(str(tiny_dir)))
    out = []
    for r in predict(model, TEXTS):
        best = max(range(len(r.probs)), key=r.probs.__getitem__)
        out.append(
            {
                "label": model.labels[best],
                "score": r.probs[best],
                "scores": dict(zip(model.labels, r.probs, strict=True)),
                "prompt_length": r.prompt_length,
                "tokens_before": r.tokens_before,
                "pool_weights": r.pool_weights,
            }
        )
    return out


def _check_jsonl(text: str, expected: list[dict[str, object]], lines: list[int]) -> None:
    got = [json.loads(x) for x in text.splitlines()]
    assert [g["line"] for g in got] == lines
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e["label"]
        assert g["score"] == pytest.approx(e["score"], abs=1e-5)
        assert g["scores"] == pytest.approx(e["scores"], abs=1e-5)
        routing = g["routing"]
        assert routing["prompt_length"] == e["prompt_length"]
        assert routing["tokens_before"] == e["tokens_before"]
        assert routing["tokens_after"] == e["prompt_length"] - e["tokens_before"]  # type: ignore[operator]
        assert routing["pool_weights"] == pytest.approx(e["pool_weights"], abs=1e-5)


def test_stored_mapping_is_the_real_field_names(review_ckpt: Path) -> None:
    spec = json.loads((review_ckpt / "dynprompt.json").read_text())["input"]
    assert spec["text_field"] == "review" and spec["label_field"] == "stars"
    assert spec["pair_field"] is None and spec["format"] == "tsv" and spec["has_header"] is True


def test_every_input_format_with_the_stored_mapping(
    review_ckpt: Path,
    tiny_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = _expected(review_ckpt, tiny_dir)
    flags = ["--all-scores", "--routing", "--quiet"]
    # TSV with a header (the training format), other columns ignored, a blank line skipped.
    tsv = tmp_path / "in.tsv"
    tsv.write_text("review\tid\n" + "".join(f"{t}\t{i}\n" for i, t in enumerate(TEXTS[:2])))
    with tsv.open("a") as handle:
        handle.write("\n" + "".join(f"{t}\t{i}\n" for i, t in enumerate(TEXTS[2:])))
    assert predict_main([str(review_ckpt), str(tsv), *flags]) == 0
    _check_jsonl(capsys.readouterr().out, expected, [2, 3, 5, 6, 7])
    # CSV (quoted commas) and JSONL: the same field name, found in each format.
    csv_file = tmp_path / "in.csv"
    with csv_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review"])
        writer.writerows([[t] for t in TEXTS])
    assert predict_main([str(review_ckpt), str(csv_file), *flags]) == 0
    _check_jsonl(capsys.readouterr().out, expected, [2, 3, 4, 5, 6])
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t, "extra": 1}) + "\n" for t in TEXTS))
    assert predict_main([str(review_ckpt), str(jsonl), *flags]) == 0
    _check_jsonl(capsys.readouterr().out, expected, [1, 2, 3, 4, 5])
    # stdin: no suffix, so the checkpoint's stored format (TSV with a header) applies.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(tsv.read_bytes())))
    assert predict_main([str(review_ckpt), "-", *flags, "--batch-size", "2"]) == 0
    _check_jsonl(capsys.readouterr().out, expected, [2, 3, 5, 6, 7])
    # CSV output to a file: a header row, then one row per input.
    out = tmp_path / "out" / "pred.csv"
    argv = [str(review_ckpt), str(jsonl), "--output-format", "csv", "-o", str(out)]
    assert predict_main(argv) == 0
    table = list(csv.DictReader(out.open()))
    assert [r["label"] for r in table] == [e["label"] for e in expected]
    assert set(table[0]) == {"line", "label", "score"}
    assert "5 rows" in capsys.readouterr().err


def test_pairs_use_the_stored_pair_field(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic_file(tmp_path / "nli_train.jsonl", 30, 2)
    topic_file(tmp_path / "nli_dev.jsonl", 9, 3)
    config = tiny_config(
        tmp_path,
        train_file=str(tmp_path / "nli_train.jsonl"),
        dev_file=str(tmp_path / "nli_dev.jsonl"),
        text_field="premise",
        pair_field="hypothesis",
        labels=["entailment", "contradiction", "neutral"],
        backbone=str(tiny_dir),
        max_steps=2,
        max_length=24,
    )
    result = train(config, backbone=load_backbone(str(tiny_dir)), log=lambda _m: None)
    ckpt = result.checkpoints["toy"]
    pairs = [("the movie was good", "it is yes"), ("a plot", "no it is false")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"premise": a, "hypothesis": b}) + "\n" for a, b in pairs))
    assert predict_main([str(ckpt), str(data), "--all-scores", "--quiet"]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    model = load_checkpoint(ckpt, load_backbone(str(tiny_dir)))
    ref = predict(model, [a for a, _ in pairs], [b for _, b in pairs])
    for g, r in zip(got, ref, strict=True):
        assert list(g["scores"].values()) == pytest.approx(r.probs, abs=1e-5)
    # A pair file without the hypothesis: the file, the line and the field are named.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "a", "hypothesis": "b"}) + "\n" + '{"premise": "c"}\n')
    assert predict_main([str(ckpt), str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2: field 'hypothesis'" in err


def test_bad_rows_and_inputs_exit_2_naming_file_line_field(
    review_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        ("missing.tsv", None, ["missing.tsv", "not found"]),
        ("nocol.tsv", "text\n", ["nocol.tsv line 1", "'review'", "no such column"]),
        ("empty.tsv", "review\tid\ngood\t1\n  \t2\n", ["empty.tsv line 3", "'review'", "empty"]),
        ("bad.jsonl", '{"review": "ok"}\n{"review": 3}\n', ["bad.jsonl line 2", "'review'"]),
        ("broken.jsonl", '{"review": "ok"}\n{oops\n', ["broken.jsonl line 2", "not valid JSON"]),
        ("stray.tsv", "review\tid\na\t1\nb\tc\t3\n", ["stray.tsv line 3", "stray delimiter"]),
    ]
    for name, content, pieces in cases:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        out = tmp_path / f"{name}.out.jsonl"
        assert predict_main([str(review_ckpt), str(path), "-o", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dynprompt predict: error: "), err
        for piece in pieces:
            assert piece in err, (piece, err)
        assert not out.exists() and not list(tmp_path.glob(f".{name}*.tmp"))
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("review\nfine\ncaf\u00e9\n".encode("latin-1"))
    assert predict_main([str(review_ckpt), str(latin), "--quiet"]) == 2
    assert "latin.tsv line 3: not valid UTF-8" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "no-ckpt"), str(latin)]) == 2
    assert "dynprompt.json" in capsys.readouterr().err


def test_old_checkpoints_read_with_their_defaults(
    review_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint written before the layout was stored (`text` field, no format) still
    loads; stdin then needs the format named, and a file is read by its suffix."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(review_ckpt, old)
    raw = json.loads((old / "dynprompt.json").read_text())
    raw["input"] = {k: raw["input"][k] for k in ("max_length", "truncation_side")}
    raw["input"].update(text_field="text", pair_field=None)
    (old / "dynprompt.json").write_text(json.dumps(raw))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "good fun"}\n')))
    assert predict_main([str(old), "-", "--quiet"]) == 2
    assert "<stdin>: say which format it is in" in capsys.readouterr().err
    # `--format` names the input's format, as in `train` and `eval`; `--input-format`,
    # its old name here, still works.
    for flag in ("--format", "--input-format"):
        stdin = io.TextIOWrapper(io.BytesIO(b'{"text": "good fun"}\n{"text": "dull"}\n'))
        monkeypatch.setattr(sys, "stdin", stdin)
        assert predict_main([str(old), "-", flag, "jsonl", "--quiet"]) == 0
        assert [json.loads(x)["line"] for x in capsys.readouterr().out.splitlines()] == [1, 2]
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "good fun"}\n{"text": "dull"}\n')
    assert predict_main([str(old), str(data), "--quiet"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def _run_predict(ckpt: Path, stdin: object, extra: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "dynprompt.cli", "predict", str(ckpt), "-", *extra],
        stdin=stdin,  # type: ignore[arg-type]
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_answers_come_out_while_stdin_is_still_open(review_ckpt: Path) -> None:
    proc = _run_predict(review_ckpt, subprocess.PIPE, ["--format", "jsonl", "--quiet"])
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps({"review": TEXTS[0]}) + "\n").encode())
    proc.stdin.flush()
    first: list[bytes] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout=120)
    try:
        assert first and first[0], "no answer before the input ended"
        assert json.loads(first[0])["line"] == 1
        assert proc.poll() is None  # still running: its input is open
        second = (json.dumps({"review": TEXTS[1]}) + "\n").encode()
        rest, err = proc.communicate(input=second, timeout=120)  # then stdin closes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert [json.loads(x)["line"] for x in rest.decode().splitlines()] == [2]
    assert b"Loading weights" not in err, err.decode()


_PEAK_RSS = """
import resource, subprocess, sys
with open(sys.argv[1], "rb") as stdin:
    code = subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss_kb(ckpt: Path, data: Path) -> int:
    """Peak RSS of one `dynprompt predict` process reading `data` on stdin, measured in a
    wrapper whose only child it is."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dynprompt.cli", "predict", str(ckpt), "-"]
    cmd += ["--format", "jsonl", "--quiet", "--batch-size", "256", "--device", "cpu"]
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(data), *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    code, peak = out.stdout.split()
    assert code == "0", out.stderr
    return int(peak)


def test_a_large_input_streams_in_bounded_memory(review_ckpt: Path, tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    line = json.dumps({"review": "the very long story was dull but the acting was fine"}) + "\n"
    small.write_text(line * 2_000)
    with large.open("w") as handle:
        for _ in range(20):
            handle.write(line * 10_000)
    assert large.stat().st_size > 12_000_000  # 200,000 rows
    base = _peak_rss_kb(review_ckpt, small)
    peak = _peak_rss_kb(review_ckpt, large)
    # Held whole, 200,000 rows (text, parsed record, token ids, one result each) would
    # take hundreds of MB; streamed, the process stays within a window of rows.
    assert peak - base < 40_000, (base, peak)


def test_eval_reads_a_file_with_the_stored_mapping(
    review_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--text-field review --label-field stars` at training time, no flags at eval."""
    from dynprompt.training.cli import eval_main
    from dynprompt.training.plots import routing_figure

    dev = review_ckpt.parents[2] / "reviews_dev.tsv"
    out = tmp_path / "eval.json"
    plot = tmp_path / "routing.png"
    assert (
        eval_main([str(review_ckpt), "--file", str(dev), "--json", str(out), "--plot", str(plot)])
        == 0
    )
    payload = json.loads(out.read_text())
    recorded = json.loads((review_ckpt / "dynprompt.json").read_text())["training"]
    assert payload["n"] == 16 == recorded["metrics"]["dev_examples"]
    assert payload["accuracy"] == pytest.approx(recorded["metrics"]["dev_accuracy"], abs=1e-6)
    assert payload["split"] == "reviews_dev.tsv (16 examples)"
    assert plot.stat().st_size > 1000
    histograms = {"toy": {k: payload[k] for k in ("tokens_before", "prompt_length")}}
    axes = routing_figure(histograms, payload["split"]).axes
    assert {ax.get_ylabel() for ax in axes} == {"reviews_dev.tsv (16 examples)"}
    capsys.readouterr()
    # Flags still override the stored mapping: a file with other column names.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "great fun", "y": "1"}) + "\n")
    assert eval_main([str(review_ckpt), "--file", str(other)]) == 2
    assert "field 'review'" in capsys.readouterr().err
    args = ["--text-field", "body", "--label-field", "y", "--output", "json"]
    assert eval_main([str(review_ckpt), "--file", str(other), *args]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_no_loading_weights_bar_in_user_output(
    review_ckpt: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Transformers draws a "Loading weights" bar for this very backbone when asked
    plainly; `dynprompt eval` (through `load_backbone`) shows none, and `load_backbone`
    leaves transformers' progress bar and verbosity as it found them."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        capsys.readouterr()
        AutoModel.from_pretrained(tiny_dir)
        plain = capsys.readouterr()
        assert "Loading weights" in plain.err, "nothing to hide: the check would prove nothing"
        for enabled, level in ((True, hf_logging.INFO), (False, hf_logging.WARNING)):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            hf_logging.set_verbosity(level)
            load_backbone(str(tiny_dir))
            assert hf_logging.is_progress_bar_enabled() is enabled
            assert hf_logging.get_verbosity() == level
    finally:
        (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(verbosity)

    dev = review_ckpt.parents[2] / "reviews_dev.tsv"
    out = subprocess.run(
        [sys.executable, "-m", "dynprompt.cli", "eval", str(review_ckpt), "--file", str(dev)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout
    assert "Loading weights" not in out.stdout + out.stderr, out.stdout + out.stderr
