"""API keys for endpoints, handed to the nodes that open them and to nothing else.

Keys come from two places only: an entry of conf/local/credentials.yml (git ignores conf/local) and
environment variables `SPAVL_KEY_<NAME>` (upper case; `-` and `.` become `_`), which win over the file.
This load-only dataset reads both, so a missing file or entry is not a Kedro start-up error but an empty
mapping: the node that needs a key fails naming it, and the preflight pipeline lists what is missing.

It is not a parameter: kedro-mlflow never logs it, and its description (what kedro-viz, logs and error
messages show) lists key names, never values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from kedro.io import AbstractDataset, DatasetError

ENV_PREFIX = "SPAVL_KEY_"


def env_name(key: str) -> str:
    """The environment variable that carries key `key`: SPAVL_KEY_OPENAI for `openai`."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


class CredentialsDataset(AbstractDataset):
    """name -> key from `entry` of `filepath` plus SPAVL_KEY_* environment variables; `{}` when neither has any.

    Every SPAVL_KEY_<NAME> variable is read; `names` maps variables back to names with `-` or `.` in them.
    `credentials` is still accepted for a catalog that injects a Kedro credentials entry itself.
    """

    def __init__(
        self,
        entry: str | None = None,
        filepath: str = "conf/local/credentials.yml",
        names: list[str] | None = None,
        credentials: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._entry, self._filepath = entry, filepath
        self._names = list(names or [])
        self._injected = dict(credentials or {})
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        keys = dict(self._injected)
        if self._entry is not None:
            keys.update(self._from_file())
        for name in sorted({*self._names, *keys}):
            value = os.environ.get(env_name(name))
            if value:
                keys[name] = value
        # any other SPAVL_KEY_<NAME>, under its normalised name (see factory.api_key)
        for variable, value in os.environ.items():
            if variable.startswith(ENV_PREFIX) and value:
                keys.setdefault(variable[len(ENV_PREFIX) :].lower(), value)
        return keys

    def _from_file(self) -> dict[str, Any]:
        path = Path(self._filepath)
        if not path.is_file():
            return {}
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:  # the message quotes the offending line: it may hold a key, so not shown
            raise DatasetError(f"{path} is not valid YAML (line {getattr(exc, 'problem_mark', None)})") from None
        entry = content.get(self._entry, {}) if isinstance(content, dict) else {}
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: entry '{self._entry}' must be a mapping of key names to keys")
        return dict(entry)

    def save(self, data: Any) -> None:
        raise DatasetError("CredentialsDataset is read-only: keys live in conf/local/credentials.yml or SPAVL_KEY_*")

    def _describe(self) -> dict[str, Any]:
        return {"entry": self._entry, "filepath": self._filepath, "names": self._names}

    def __repr__(self) -> str:  # the default repr would print the arguments, keys included
        return f"CredentialsDataset(entry={self._entry!r}, filepath={self._filepath!r})"
