"""The benchmarks cannot rot: each runs here in its `--quick` mode (in this process, at the smallest size),
and every figure they write into the docs says which command measured it, when and on what machine."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from conftest import PROJECT

BENCHMARKS = PROJECT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What each quick run must show, beyond finishing: the figure it exists for, computed.
EXPECT = {
    "align_overhead": lambda r: (
        r["node_loss"] == r["bare_loss"] and r["overhead_ratio"] > 0 and r["mlflow_child_runs"] == 1
    ),
    "bootstrap": lambda r: r["seconds_1_thread"] > 0 and r["seconds_2_threads"] > 0,
    "generation": lambda r: r["batched_speedup"] > 0 and r["api_concurrency_speedup"] > 0,
    # SPA-VL's test sets: 5 harmful and 5 easy questions for each of the 53 subcategories
    "split_scale": lambda r: r["test_harm"] == r["test_help"] == 265 and r["train"] > 0,
    "training_memory": lambda r: r["dpo"]["ratio_4n_over_n"] > 0 and len(r["dpo"]["peak_rss_mb"]) == 2,
    "miniature_seeds": lambda r: r["figures"] > 20 and r["seeded_keys"] == 8,
}


def test_every_benchmark_has_a_quick_check():
    assert sorted(EXPECT) == SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_in_quick_mode(name, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # set back afterwards
    _load(name).main(["--quick"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert EXPECT[name](result), result


def test_every_recorded_figure_names_its_command_date_and_machine():
    from record import BLOCK  # benchmarks/record.py

    blocks = [
        (page.name, b) for page in sorted((PROJECT / "docs").glob("*.md")) for b in BLOCK.finditer(page.read_text())
    ]
    recorded = sorted(b.group("name").removesuffix(".py") for _, b in blocks)
    # every benchmark but the seeds one (which writes the whole of results.md) records one block
    assert recorded == [s for s in SCRIPTS if s != "miniature_seeds"]
    for page, block in blocks:
        heading = re.match(
            rf"Measured by `benchmarks/{re.escape(block.group('name'))} --record` on \d{{4}}-\d\d-\d\d: .+, \d+ cores, torch ",
            block.group("body"),
        )
        assert heading, f"docs/{page}: the block of benchmarks/{block.group('name')} is not headed by its command"
        assert "\n| " in block.group("body"), f"docs/{page}: benchmarks/{block.group('name')} recorded no table"
