"""A table kept as parquet and shown in MLflow row by row.

Saving writes the parquet file (what later nodes, kedro-viz and scripts read) and, inside an MLflow run,
logs the same rows with `mlflow.log_table`, which the UI shows as a table and `mlflow.load_table` reads back.
Columns named in `image_columns` hold PNG bytes here; MLflow gets them as pictures (it stores each as an
artifact and shows a thumbnail in its row). Outside a run only the parquet file is written.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.imaging import decode_image

log = logging.getLogger(__name__)


class MlflowTableDataset(AbstractDataset):
    def __init__(
        self,
        filepath: str,
        artifact_file: str,
        image_columns: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if PurePosixPath(artifact_file).suffix not in (".json", ".parquet"):
            raise DatasetError(
                f"MlflowTableDataset: artifact_file must end in .json or .parquet (what "
                f"mlflow.log_table writes), got {artifact_file!r}"
            )
        self._filepath = filepath
        self._artifact_file = artifact_file
        self._image_columns = list(image_columns or [])
        self.metadata = metadata

    def save(self, data: pd.DataFrame) -> None:
        if not isinstance(data, pd.DataFrame):
            raise DatasetError(f"MlflowTableDataset saves a DataFrame, got {type(data).__name__}")
        if missing := [c for c in self._image_columns if c not in data.columns]:
            raise DatasetError(f"MlflowTableDataset '{self._artifact_file}': image columns {missing} not in the table")
        Path(self._filepath).parent.mkdir(parents=True, exist_ok=True)
        data.to_parquet(self._filepath, index=False)
        if mlflow.active_run() is None:
            log.debug("no active MLflow run: table %s written to %s only", self._artifact_file, self._filepath)
            return
        shown = data.copy()
        for column in self._image_columns:
            shown[column] = shown[column].map(decode_image)
        mlflow.log_table(shown, artifact_file=self._artifact_file)

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(self._filepath)

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "artifact_file": self._artifact_file, "image_columns": self._image_columns}
