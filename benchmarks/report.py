"""Write one benchmark's section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every table below is written by the script named in its section; rerun the command to\n"
    "refresh it. Ratios are measured side by side in one run; absolute times on a shared\n"
    "2-core CPU machine are noisy and only the ratios should be compared.\n"
)


def device_description() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {torch.get_num_threads()} torch threads"


def write_section(name: str, markdown: str, doc: Path = DOC) -> Path:
    """Replace (or append) the block between this section's markers."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.write_text(text)
    return doc
