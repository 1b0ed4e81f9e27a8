"""The API spend ledger on disk: one JSON list of usage rows per (stage, backend name, served model).

`load()` gives a `SpendLedger` holding what earlier runs recorded and bound to this file, so the stages that
call APIs write their counts as they go (after every shard) and a rerun starts from the spend so far. No file
yet loads as an empty ledger. Each write goes to a temporary name first and is then renamed, so a kill
mid-write leaves the previous ledger whole. Tokens only: dollars are derived from `costs.prices` when needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.models.costs import SpendLedger


class SpendLedgerDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self.metadata = metadata

    def load(self) -> SpendLedger:
        rows: list[dict[str, Any]] = []
        if self._path.is_file():
            try:
                rows = json.loads(self._path.read_text())
            except ValueError as exc:
                raise DatasetError(
                    f"{self._path} is not a spend ledger (invalid JSON: {exc}); fix or remove it"
                ) from exc
        return SpendLedger(rows, persist=self._write, where=str(self._path))

    def save(self, data: SpendLedger | list[dict[str, Any]]) -> None:
        self._write(data.rows() if isinstance(data, SpendLedger) else list(data))

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        partial = self._path.with_name(self._path.name + ".partial")
        partial.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(partial, self._path)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}
