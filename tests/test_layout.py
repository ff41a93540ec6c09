"""The package boundaries of DESIGN §1, and the command line's entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dynprompt"

# package -> packages it must never import
FORBIDDEN = {
    "models": ("dynprompt.training", "dynprompt.service"),
    "training": ("dynprompt.service",),
    "service": ("dynprompt.training",),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"dynprompt/{package} has no modules"
    for path in files:
        for module in imported_modules(path):
            for banned in FORBIDDEN[package]:
                assert not module.startswith(banned), f"{path.relative_to(REPO)} imports {module}"


def test_no_machine_paths_in_tracked_files() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    marker = "/" + "work/"  # spelled apart so this file does not match itself
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix in {".safetensors", ".png"} or not path.is_file():
            continue
        if marker in path.read_text(encoding="utf-8", errors="ignore"):
            offenders.append(name)
    assert not offenders, f"machine-specific paths in {offenders}"


def test_cli_help_and_unknown_command() -> None:
    run = [sys.executable, "-m", "dynprompt.cli"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "eval", "experiment", "serve", "export-onnx", "bench"):
        assert command in out
    bad = subprocess.run([*run, "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


@pytest.mark.parametrize("command", ["train", "eval", "experiment", "serve", "export-onnx"])
def test_every_subcommand_explains_itself(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynprompt.cli", command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and len(result.stdout.splitlines()) > 5


def test_the_http_front_end_does_not_import_torch() -> None:
    """HTTP processes (`--workers N`) import the front end only: without torch and
    transformers they start in a second and stay small; the engine process has the models."""
    code = (
        "import sys\n"
        "import dynprompt.service.server, dynprompt.service.app, dynprompt.service.transport\n"
        "import dynprompt.service.tei, dynprompt.service.client\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "", out.stdout
