"""What an MLflow run of a `kedro run` says about itself: a name from what ran, a short description that links
the report, and tags to filter the runs table by (env, pipelines, methods, train source, seeds, git commit).

Two `align` runs of different methods or seeds are told apart in the runs table by name alone:
`align · dpo+sft · ours · seed 0`, `__default__ · dpo+sft · ours · seed 0`. The hook in hooks.py sets them on
the run kedro-mlflow opened, after it has opened it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from spavl_kedro.config import AlignConfig, GenerateConfig

ALIGNS = {"align", "__default__"}  # pipelines that train: the name says which methods


def run_name(pipelines: list[str], configs: dict[str, Any]) -> str:
    """`<pipelines> · <methods> · <train source> · seed <n>`, methods and source only where align runs."""
    parts = ["+".join(pipelines)]
    align: AlignConfig | None = configs.get("align")
    if align is not None and ALIGNS & set(pipelines):
        parts += ["+".join(align.methods), align.train_source]
    generate: GenerateConfig | None = configs.get("generate")
    if generate is not None:
        parts.append(f"seed {generate.seed}")
    return " · ".join(parts)


def run_tags(pipelines: list[str], env: str, configs: dict[str, Any], project: Path) -> dict[str, str]:
    """Tags of the run: spavl.env, spavl.pipelines, spavl.methods, spavl.train_source, spavl.seeds and
    spavl.git_commit (with `+dirty` when the work tree has changes; absent outside a git checkout)."""
    tags = {"spavl.env": env, "spavl.pipelines": ",".join(pipelines), "spavl.role": "kedro run"}
    align: AlignConfig | None = configs.get("align")
    if align is not None:
        tags["spavl.methods"] = ",".join(align.methods)
        tags["spavl.train_source"] = align.train_source
    seeds = {
        block: configs[block].seed
        for block in ("generate", "judge", "split", "evaluate")
        if block in configs and getattr(configs[block], "seed", None) is not None
    }
    tags["spavl.seeds"] = ",".join(f"{block}={seed}" for block, seed in seeds.items())
    commit = git_commit(project)
    if commit:
        tags["spavl.git_commit"] = commit
    return tags


def runner_name(runner: Any) -> str:
    """`SequentialRunner` from what Kedro records of a runner: a class name, or an instance's repr
    (`<kedro.runner.sequential_runner.SequentialRunner object at 0x7f...>`)."""
    text = str(runner) if runner not in (None, "None", "") else "SequentialRunner"  # Kedro's when none given
    return re.sub(r" object at 0x[0-9a-fA-F]+", "", text).strip("<>").rsplit(".", 1)[-1]


def git_commit(project: Path) -> str | None:
    """The checkout's commit, `+dirty` when tracked files changed; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def description(name: str, pipelines: list[str]) -> str:
    """The run's markdown description (MLflow's `mlflow.note.content`)."""
    lines = [f"**{name}**: `kedro run` of {', '.join(f'`{p}`' for p in pipelines)}."]
    if {"evaluate", "__default__"} & set(pipelines):
        lines.append(
            "The report is the artifact `eval_report.md`; each evaluated policy has a child run "
            "(`eval · <policy>`) with the same metric names, linked to the run that trained it."
        )
    if ALIGNS & set(pipelines):
        lines.append("Each trained model has a child run (its curves, and its training data as a dataset input).")
    return "\n\n".join(lines)
