"""Compare runs in the project's MLflow store: harmlessness vs helpfulness per policy, and the data-scale curve.

Every `kedro run` is one MLflow run whose metrics include `eval/<model>/<set>/<metric>.<scorer>`; a sweep
(`python -m spavl_kedro.sweep`) leaves one such run per grid point, each training a policy named by
`align.name` on `split.subset.max_pairs` pairs. This module reads them back with `mlflow.search_runs`:

    .venv/bin/python -m spavl_kedro.compare            # writes data/08_reporting/run_comparison.md + plots
    .venv/bin/python -m spavl_kedro.compare --judge md-judge --help-judge gpt-4o-help

The notebook (notebooks/explore_catalog.ipynb) calls the same functions.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure  # figures without pyplot: no global state, no backend switch

HARM = "test_harm/unsafe_rate"
HELP = "test_help/win_rate"
_TRAINED = re.compile(r"^params\.align\.trained\.(?P<name>.+)\.train_examples$")
_EVAL = re.compile(r"^metrics\.eval/(?P<model>[^/]+)/(?P<set>[^/]+)/(?P<metric>[^/]+)$")


def load_runs(tracking_uri: str) -> pd.DataFrame:
    """Every top-level run (a `kedro run`) of every experiment in the store, newest first."""
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"])
    if runs.empty:
        return runs
    parent = runs.get("tags.mlflow.parentRunId")
    return runs[parent.isna()].reset_index(drop=True) if parent is not None else runs


def eval_points(runs: pd.DataFrame, metric: str, scorer: str) -> pd.DataFrame:
    """One row per (run, model) that logged `eval/<model>/<metric>.<scorer>` (greedy, overall)."""
    frames = []
    names = runs["tags.mlflow.runName"] if "tags.mlflow.runName" in runs else pd.Series(None, index=runs.index)
    for column in runs.columns:
        match = _EVAL.match(column)
        if not match or f"{match['set']}/{match['metric']}" != f"{metric}.{scorer}":
            continue
        hit = runs[column].notna()
        frames.append(
            pd.DataFrame(
                {
                    "run_id": runs.loc[hit, "run_id"],
                    "start_time": runs.loc[hit, "start_time"],
                    "run_name": names[hit],
                    "model": match["model"],
                    "value": runs.loc[hit, column].astype(float),
                }
            )
        )
    columns = ["run_id", "start_time", "run_name", "model", "value"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def policy_table(runs: pd.DataFrame, scorer: str, help_scorer: str) -> pd.DataFrame:
    """Latest unsafe rate and win rate of every policy ever evaluated: the harmlessness/helpfulness trade."""
    harm = _latest(eval_points(runs, HARM, scorer)).rename(columns={"value": "unsafe_rate"})
    helpful = _latest(eval_points(runs, HELP, help_scorer)).rename(columns={"value": "win_rate"})
    table = harm.merge(helpful[["model", "win_rate"]], on="model", how="outer")
    return table[["model", "unsafe_rate", "win_rate", "run_id"]].sort_values("model").reset_index(drop=True)


def scale_curve(runs: pd.DataFrame, scorer: str) -> pd.DataFrame:
    """Unsafe rate of each model a run trained against its number of training examples (SPA-VL's data-scale
    ablation: the sweep's `split.subset.max_pairs`), with its method. The align nodes log
    `align.trained.<name>.method` and `align.trained.<name>.train_examples` for every model they train."""
    columns = ["model", "method", "train_pairs", "unsafe_rate", "run_id"]
    trained = [m["name"] for c in runs.columns if (m := _TRAINED.match(c))]
    rows = []
    for record in runs.to_dict("records"):
        for model in trained:
            size, column = (
                record.get(f"params.align.trained.{model}.train_examples"),
                f"metrics.eval/{model}/{HARM}.{scorer}",
            )
            if pd.isna(size) or column not in record or pd.isna(record[column]):
                continue
            rows.append(
                {
                    "model": model,
                    "method": record[f"params.align.trained.{model}.method"],
                    "train_pairs": int(size),
                    "unsafe_rate": float(record[column]),
                    "run_id": record["run_id"],
                }
            )
    curve = pd.DataFrame(rows, columns=columns)
    return curve.sort_values(["method", "train_pairs"]).reset_index(drop=True)


def plot_tradeoff(table: pd.DataFrame):
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    points = table.dropna(subset=["unsafe_rate", "win_rate"])
    ax.scatter(points["unsafe_rate"], points["win_rate"])
    for r in points.itertuples(index=False):
        ax.annotate(r.model, (r.unsafe_rate, r.win_rate), textcoords="offset points", xytext=(5, 5))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("test_harm unsafe rate (lower is safer)")
    ax.set_ylabel("test_help win rate vs reference")
    ax.set_title("Policies across runs")
    fig.tight_layout()
    return fig


def plot_scale(curve: pd.DataFrame):
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for method, rows in curve.groupby("method"):
        ax.plot(rows["train_pairs"], rows["unsafe_rate"], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training pairs")
    ax.set_ylabel("test_harm unsafe rate")
    ax.set_title("Data scale")
    if len(curve):
        ax.legend()
    fig.tight_layout()
    return fig


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _latest(points: pd.DataFrame) -> pd.DataFrame:
    if points.empty:
        return points
    return points.sort_values("start_time").groupby("model", as_index=False).last()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlflow.db').resolve()}")
    parser.add_argument("--judge", default="keyword", help="verdict judge of the unsafe rate")
    parser.add_argument("--help-judge", default="helpfulness_rule", help="scorer of the win rate")
    parser.add_argument("--out", default="data/08_reporting", help="folder for run_comparison.md and plots")
    args = parser.parse_args(argv)
    runs = load_runs(args.tracking_uri)
    table, curve = policy_table(runs, args.judge, args.help_judge), scale_curve(runs, args.judge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(table).savefig(out / "run_comparison_tradeoff.png", dpi=100)
    plot_scale(curve).savefig(out / "run_comparison_scale.png", dpi=100)
    text = [
        "# Run comparison",
        "",
        f"{len(runs)} runs in {args.tracking_uri}; unsafe rate by `{args.judge}`, "
        f"win rate by `{args.help_judge}` (greedy).",
        "",
        "## Policies (latest evaluation of each)",
        "",
        markdown_table(table) if len(table) else "no evaluations yet",
        "",
        "## Data scale (each run's own policy)",
        "",
        markdown_table(curve) if len(curve) else "no sweep runs yet",
        "",
        "![tradeoff](run_comparison_tradeoff.png)",
        "![scale](run_comparison_scale.png)",
        "",
    ]
    (out / "run_comparison.md").write_text("\n".join(text))
    print(f"wrote {out / 'run_comparison.md'}: {len(table)} policies, {len(curve)} scale points")


if __name__ == "__main__":
    main()
