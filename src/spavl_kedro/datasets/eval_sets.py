"""A Kedro dataset for a published evaluation set, read with its loader into the eval-items table.

The catalog names the benchmark and where it lies; the loader in `evalsets/loaders.py` knows its layout:

    mm_safetybench_eval:
      type: spavl_kedro.datasets.eval_sets.EvalSetDataset
      format: mm_safetybench
      path: data/01_raw/eval/MM-SafetyBench/data
      options: {variants: [text_only, sd_typo], max_side: 336}
      missing_ok: true

`format` names a `Published` entry of a row of `evalsets.registry.EVAL_SETS`, which holds its loader; `path` is
the loader's first argument (a folder or a file, the entry's `layout`) and `options` its other keyword
arguments, checked against the loader's signature when the catalog is built, so a misspelt option fails
before any pipeline runs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.evalsets.loaders import empty_items
from spavl_kedro.evalsets.registry import published_format


class EvalSetDataset(AbstractDataset):
    """Load-only: one benchmark in its published layout -> DataFrame of EVAL_ITEM_COLUMNS.

    Args:
        format: a published layout of EVAL_SETS (mm_safetybench, figstep, advbench, mis_test, vqa).
        path: the loader's first argument, a folder or file as the layout's entry describes.
        options: the loader's other keyword arguments (variants, max_side, limit, ...).
        missing_ok: a missing `path` loads as an empty table, so a profile can name a benchmark nobody has
            downloaded yet; anything missing under an existing path is still an error.
        metadata: free-form metadata (kedro-viz layer, ...), ignored by the dataset.
    """

    def __init__(
        self,
        format: str,
        path: str,
        options: dict[str, Any] | None = None,
        missing_ok: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        try:
            self._published = published_format(format)
        except ValueError as exc:
            raise ValueError(f"EvalSetDataset({path}): {exc}") from exc
        self._format = format
        self._path = Path(path)
        self._options = dict(options or {})
        self._missing_ok = missing_ok
        self.metadata = metadata
        loader = self._published.loader
        try:
            inspect.signature(loader).bind(str(self._path), **self._options)
        except TypeError as exc:
            raise ValueError(
                f"EvalSetDataset({path}): options {sorted(self._options)} do not fit "
                f"{loader.__name__}{inspect.signature(loader)}: {exc}"
            ) from exc

    def load(self) -> pd.DataFrame:
        if not self._path.exists():
            if self._missing_ok:
                return empty_items()
            raise FileNotFoundError(
                f"{self._format} evaluation set: {self._path} does not exist (expected "
                f"{self._published.layout}); download it there or set missing_ok: true"
            )
        return self._published.loader(self._path, **self._options)

    def save(self, data: pd.DataFrame) -> None:
        raise DatasetError(f"EvalSetDataset({self._path}) is load-only: evaluation sets are published inputs")

    def _exists(self) -> bool:
        return self._path.exists()

    def _describe(self) -> dict[str, Any]:
        return {
            "format": self._format,
            "path": str(self._path),
            "options": self._options,
            "missing_ok": self._missing_ok,
        }
