"""Run a grid of the paper's ablations as separate `kedro run`s, one MLflow run each.

    python -m spavl_kedro.sweep --grid align.method=dpo,sft --grid align.dpo.beta=0.05,0.1 \\
        --grid split.subset.max_pairs=100,1000 [--pipelines split,align,evaluate] [--env paper] [--dry-run]

Every combination becomes `kedro run --pipelines ... --params k1=v1,k2=v2,align.name=<slug>`: the slug
names the trained model (so runs never overwrite each other's) and its eval metrics; the grid values
are ordinary Kedro parameters, so MLflow lists them as columns to compare. Runs are sequential (one
machine); on a cluster, send the printed commands (`--dry-run`) to your scheduler instead.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
import sys


def commands(grid: list[str], pipelines: str, env: str | None) -> list[list[str]]:
    """One `kedro run` argument list per combination of the grid's values."""
    axes = []
    for entry in grid:
        key, _, values = entry.partition("=")
        if not key or not values:
            raise ValueError(f"--grid {entry!r}: expected key=value1,value2,... (e.g. align.dpo.beta=0.05,0.1)")
        axes.append([(key, v) for v in values.split(",")])
    kedro = shutil.which("kedro") or "kedro"
    runs = []
    for combo in itertools.product(*axes):
        slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "", f"{k.rsplit('.', 1)[-1]}{v}") for k, v in combo)
        params = ",".join([*(f"{k}={v}" for k, v in combo), f"align.name={slug}"])
        run = [kedro, "run", "--pipelines", pipelines, "--params", params]
        runs.append(run + (["--env", env] if env else []))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append", required=True, help="key=value1,value2 (repeatable)")
    parser.add_argument(
        "--pipelines",
        default="split,align,evaluate",
        help="stages each run repeats (default: split,align,evaluate; data scale lives in split)",
    )
    parser.add_argument("--env", default=None, help="Kedro environment, e.g. paper")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    runs = commands(args.grid, args.pipelines, args.env)
    failed = 0
    for n, run in enumerate(runs, 1):
        print(f"[{n}/{len(runs)}] {' '.join(run)}", flush=True)
        if not args.dry_run:
            failed += subprocess.run(run).returncode != 0
    if failed:
        print(f"{failed} of {len(runs)} runs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
