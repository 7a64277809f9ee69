"""Write one benchmark's table into its own section of ``docs/benchmarks.md``.

Each benchmark owns a section delimited by HTML comments, so scripts can be re-run in any
order without clobbering each other's results.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every table below was produced by the command shown above it, on the machine named "
    "there. Ratios are measured side by side in one run; absolute times on these shared "
    "machines are noisy.\n"
)


def machine() -> str:
    """A one-line description of the machine the benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of ``docs/benchmarks.md``.

    Parameters
    ----------
    name
        Stable identifier of the benchmark, e.g. ``"psf"``.
    title
        Section heading.
    body
        Markdown: tables and remarks. The command and machine are added here.
    """
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {date.today().isoformat()}\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    text = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def run_cli(args: list[str]) -> float:
    """Run ``hpcdeconv ARGS`` (the entry point next to this interpreter); seconds of wall
    time. A failure exits the benchmark with the command's stderr."""
    command = [str(Path(sys.executable).with_name("hpcdeconv")), *args]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"hpcdeconv {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def sets(items: list[str]) -> list[str]:
    """``--set`` arguments of ``items``."""
    return [arg for item in items for arg in ("--set", item)]
