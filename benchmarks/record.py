"""Where a benchmark writes what it measured: its own block of the doc page that discusses it.

A page holds one block per benchmark, between `<!-- measured by benchmarks/<name>.py -->` and
`<!-- end measured -->`. `--record` makes a benchmark replace its block with the table it just measured,
headed by the command, the date and the machine, so no figure in the docs is typed by hand and each says
where it came from. `tests/test_benchmarks.py` checks every block is headed so, and runs every
benchmark's `--quick` mode.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- measured by benchmarks/(?P<name>[\w.]+) -->\n)(?P<body>.*?)(<!-- end measured -->)", re.S)


def machine() -> dict[str, str | int]:
    """What besides the code decides the figures: the CPU and the kernels torch picks on it."""
    import torch

    import spavl_kedro  # noqa: F401  (pins torch's kernels, numerics.py, as in every process it measured)

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def heading(command: str, when: dt.date | None = None) -> str:
    """The line a recorded block opens with: command, date, machine."""
    m = machine()
    day = (when or dt.date.today()).isoformat()
    return (
        f"Measured by `{command}` on {day}: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"(kernels {m['cpu_capability']})."
    )


def record(page: str, benchmark: str, command: str, body: str) -> Path:
    """Replace `benchmark`'s block on docs/<page> with `body` under a heading; the block must exist."""
    path = PROJECT / "docs" / page
    text = path.read_text()
    blocks = [b for b in BLOCK.finditer(text) if b.group("name") == benchmark]
    if len(blocks) != 1:
        raise SystemExit(f"docs/{page} has {len(blocks)} blocks measured by benchmarks/{benchmark}, expected one")
    block = blocks[0]
    new = f"{block.group(1)}{heading(command)}\n\n{body.strip()}\n{block.group(4)}"
    path.write_text(text[: block.start()] + new + text[block.end() :])
    return path


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
