"""Run parameters a node computes (how many pairs a policy was trained on), logged to the active MLflow run.

kedro-mlflow logs the Kedro parameters at the start of a run and offers datasets for metrics and artifacts,
but none for parameters known only once a node has run. Outside an MLflow run there is nothing to log to,
and saving is a no-op (unit tests and plain `SequentialRunner` runs).
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError

log = logging.getLogger(__name__)


class MlflowParamsDataset(AbstractDataset):
    def __init__(self, prefix: str = "", metadata: dict[str, Any] | None = None) -> None:
        self._prefix = prefix
        self.metadata = metadata
        self._last: dict[str, Any] = {}

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"MlflowParamsDataset saves a dict name -> value, got {type(data).__name__}")
        self._last = {f"{self._prefix}{k}": v for k, v in data.items()}
        if mlflow.active_run() is None:
            log.debug("no active MLflow run: parameters %s not logged", sorted(self._last))
            return
        mlflow.log_params({k: str(v) for k, v in self._last.items()})

    def load(self) -> dict[str, Any]:
        return dict(self._last)

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self._prefix}
