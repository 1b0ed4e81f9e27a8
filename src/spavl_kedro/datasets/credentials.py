"""API keys for endpoints, handed to the nodes that open them and to nothing else.

Kedro injects `credentials:` only into datasets, so this load-only dataset is how a node receives keys
from conf/local/credentials.yml. It is not a parameter: kedro-mlflow never logs it, and its description
(what kedro-viz and error messages show) lists key names, never values.
"""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError


class CredentialsDataset(AbstractDataset):
    """Loads the mapping name -> key of a credentials.yml entry; `{}` when the catalog gives none.

    conf/base declares the entry without credentials (the embedded default calls no API); an environment
    that does (conf/paper) adds `credentials: <entry in conf/local/credentials.yml>`.
    """

    def __init__(self, credentials: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._credentials = dict(credentials or {})
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        return dict(self._credentials)

    def save(self, data: Any) -> None:
        raise DatasetError("CredentialsDataset is read-only: keys live in conf/local/credentials.yml")

    def _describe(self) -> dict[str, Any]:
        return {"keys": sorted(self._credentials)}

    def __repr__(self) -> str:  # the default repr would print the arguments, keys included
        return f"CredentialsDataset(keys={sorted(self._credentials)})"
