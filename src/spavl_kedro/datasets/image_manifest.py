"""A Kedro dataset that reads an image manifest and the raw bytes of every image it lists.

Real image sources enter the `images` table through one of two manifest shapes, told apart by columns:

  local folder  path, caption, and subcategory and/or keywords (keywords: ';'-separated in CSV, a list in
                Parquet) — images a user collected and labelled, under `root`
  LAION-style   url and/or path, caption (LAION's own `URL` / `TEXT` names accepted) — web images whose
                subcategory is assigned later from the caption or by CLIP, as SPA-VL did with LAION-5B

The dataset does the I/O only: it reads files and fetches URLs, and never decodes an image (that is the
node's job, where unreadable bytes become a reported bad row). A row that cannot be read never raises: it
is returned with `data=None` and its `read_error`, so the node can stop the run naming every bad row or
quarantine them, as configured. Only a manifest that is unusable as a whole (missing file, missing
required column) raises.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.schema import TABLES

# What `load` returns, one row per manifest row (the contract `pipelines/generate/images.py` reads).
RECORD_COLUMNS = TABLES["image_records"]

# LAION metadata parquet files name their columns URL and TEXT; anything else keeps its lower-case name.
_ALIASES = {"url": "url", "text": "caption"}
_USER_AGENT = "spavl_kedro image manifest reader (urllib)"


class ImageManifestDataset(AbstractDataset):
    """Load-only: a manifest (.csv or .parquet) -> one record per row with the image's raw bytes.

    Args:
        filepath: the manifest file, .csv or .parquet.
        root: folder that relative `path` values resolve against; default: the manifest's folder.
        fetch_timeout_s: seconds per HTTP(S) request for `url` rows; a timeout or connection error is
            retried once, an HTTP error status is not (a 404 stays a 404).
        fetch_workers: parallel downloads; URL fetching is network-bound, so threads overlap the waits.
        optional: a missing manifest loads as an empty table instead of raising. conf/base declares the
            manifest entries so that switching `source` is configuration only, while its default source
            is synthetic and no manifest exists: the entry must then load (as nothing) without failing
            the run. The node still refuses to build images from an empty manifest.
        metadata: free-form metadata (kedro-viz layer, ...), ignored by the dataset.

    Returned columns (RECORD_COLUMNS): row (0-based manifest row), path (the path or url as written),
    caption, subcategory (None when absent), keywords (list of str), data (bytes or None), read_error
    (None, or e.g. "file not found: imgs/x.png", "HTTP 404 for http://...").
    """

    def __init__(
        self,
        filepath: str,
        root: str | None = None,
        fetch_timeout_s: float = 10.0,
        fetch_workers: int = 8,
        optional: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = Path(filepath)
        self._root = Path(root) if root is not None else self._filepath.parent
        if self._filepath.suffix.lower() not in (".csv", ".parquet"):
            raise DatasetError(f"ImageManifestDataset({filepath}): the manifest must be a .csv or .parquet file")
        if fetch_timeout_s <= 0 or fetch_workers < 1:
            raise DatasetError(
                f"ImageManifestDataset({filepath}): fetch_timeout_s must be > 0 and "
                f"fetch_workers >= 1, got {fetch_timeout_s} and {fetch_workers}"
            )
        self._timeout = fetch_timeout_s
        self._workers = fetch_workers
        self._optional = optional
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        if not self._filepath.is_file():
            if self._optional:
                return pd.DataFrame({c: pd.Series(dtype=object) for c in RECORD_COLUMNS})
            raise DatasetError(f"image manifest {self._filepath} does not exist")
        manifest = self._read_manifest()
        locations = [self._location(manifest, i) for i in range(len(manifest))]
        # Threads only for URLs: local reads are disk-bound and fast, and stay in manifest order.
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            fetched = list(pool.map(self._read, locations))
        missing = [None] * len(manifest)
        columns = {
            "path": locations,
            "caption": [_text(v) for v in manifest.get("caption", missing)],
            "subcategory": [_text(v) for v in manifest.get("subcategory", missing)],
            "keywords": [_keywords(v) for v in manifest.get("keywords", missing)],
            "data": [data for data, _ in fetched],
            "read_error": [error for _, error in fetched],
        }
        # object columns: pandas 3 would otherwise infer a string dtype and turn every None into NaN.
        return pd.DataFrame(
            {
                "row": np.arange(len(manifest), dtype="int64"),
                **{name: pd.Series(values, dtype=object) for name, values in columns.items()},
            },
            columns=RECORD_COLUMNS,
        )

    def save(self, data: pd.DataFrame) -> None:
        raise DatasetError(f"ImageManifestDataset({self._filepath}) is load-only: manifests are inputs")

    def _read_manifest(self) -> pd.DataFrame:
        try:
            if self._filepath.suffix.lower() == ".csv":
                # Everything as text: an all-digit path or caption must stay a string.
                df = pd.read_csv(self._filepath, dtype=str, keep_default_na=False, na_values=[""])
            else:
                df = pd.read_parquet(self._filepath)
        except Exception as exc:  # noqa: BLE001 - re-raised as the catalog's error type, naming the file
            raise DatasetError(f"image manifest {self._filepath}: cannot read it: {exc}") from exc
        renamed = {}
        for column in df.columns:
            name = _ALIASES.get(str(column).lower(), str(column).lower())
            if name not in renamed.values():  # a real `caption` column wins over LAION's TEXT
                renamed[column] = name
        df = df[list(renamed)].rename(columns=renamed)
        if "caption" not in df.columns:
            raise DatasetError(
                f"image manifest {self._filepath}: missing column 'caption' "
                f"(LAION's 'TEXT' is accepted too); it has {list(df.columns)}"
            )
        labelled = "subcategory" in df.columns or "keywords" in df.columns
        if labelled and "path" not in df.columns:
            raise DatasetError(
                f"image manifest {self._filepath}: missing column 'path' (a folder manifest "
                f"with subcategory/keywords lists local files); it has {list(df.columns)}"
            )
        if "path" not in df.columns and "url" not in df.columns:
            raise DatasetError(
                f"image manifest {self._filepath}: missing column 'path' or 'url' "
                f"(LAION's 'URL' is accepted too); it has {list(df.columns)}"
            )
        return df.reset_index(drop=True)

    @staticmethod
    def _location(manifest: pd.DataFrame, i: int) -> str | None:
        """A row's local path if it has one (e.g. LAION shards downloaded by img2dataset), else its url."""
        for column in ("path", "url"):
            if column in manifest.columns and _text(manifest.at[i, column]):
                return _text(manifest.at[i, column])
        return None

    def _read(self, location: str | None) -> tuple[bytes | None, str | None]:
        if location is None:
            return None, "no path or url"
        if location.lower().startswith(("http://", "https://")):
            return self._fetch(location)
        path = Path(location) if Path(location).is_absolute() else self._root / location
        if not path.is_file():
            return None, f"file not found: {location}"
        try:
            return path.read_bytes(), None
        except OSError as exc:
            return None, f"cannot read {location}: {exc}"

    def _fetch(self, url: str) -> tuple[bytes | None, str | None]:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        error = None
        for _ in range(2):  # one retry, for transient failures only
            try:
                with urllib.request.urlopen(request, timeout=self._timeout) as response:
                    return response.read(), None
            except urllib.error.HTTPError as exc:
                return None, f"HTTP {exc.code} for {url}"
            except Exception as exc:  # noqa: BLE001 - timeouts, refused connections, cut-off bodies
                reason = getattr(exc, "reason", None) or exc
                error = f"fetch failed for {url}: {reason}"
        return None, error

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": str(self._filepath),
            "root": str(self._root),
            "fetch_timeout_s": self._timeout,
            "optional": self._optional,
        }


def _missing(value: Any) -> bool:
    return value is None or (np.isscalar(value) and pd.isna(value)) or value is pd.NA


def _text(value: Any) -> str | None:
    """A manifest cell as stripped text, or None when empty or missing."""
    if _missing(value):
        return None
    text = str(value).strip()
    return text or None


def _keywords(value: Any) -> list[str]:
    """';'-separated text (CSV) or a list/array (Parquet) -> list of non-empty stripped keywords."""
    if _missing(value):
        return []
    items = value.split(";") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]
