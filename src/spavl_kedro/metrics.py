"""Metric dicts in the shape kedro-mlflow's MlflowMetricsHistoryDataset logs."""

from __future__ import annotations


def for_mlflow(metrics: dict[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """{name: value} -> {name: {"value": value, "step": step}}; values are cast to float."""
    return {name: {"value": float(value), "step": step} for name, value in metrics.items()}
