"""A dataset an earlier pipeline writes, read as None when no earlier run wrote it.

The official-data route (`align.train_source=official`, `evaluate.test_source=official`) needs only the SPA-VL
release, the configured models and endpoints; the align and evaluate nodes still name this project's own
tables (the seed corpus, MIS targets, held-out images, responder models) for the routes that use them.
Wrapping those entries lets a fresh machine run the official route without a default run first: a missing
table loads as None, and the node that really needs it says which pipeline writes it. Saving and every other
call go to the wrapped dataset, so the default run is unchanged.
"""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset
from kedro.io.core import parse_dataset_definition


class OptionalDataset(AbstractDataset):
    """`dataset`: the wrapped entry, written as in the catalog (type and its arguments)."""

    def __init__(self, dataset: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        kind, arguments = parse_dataset_definition(dict(dataset))
        self._dataset = kind(**arguments)
        self.metadata = metadata

    def load(self) -> Any:
        return self._dataset.load() if self._dataset.exists() else None

    def save(self, data: Any) -> None:
        self._dataset.save(data)

    def _exists(self) -> bool:
        return self._dataset.exists()

    def __getattr__(self, name: str) -> Any:
        # kedro-viz previews a table through its dataset's `preview`: the wrapped one's, where it has one
        if name == "preview" and "_dataset" in self.__dict__:
            return self._dataset.preview
        raise AttributeError(name)

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe()}  # noqa: SLF001  (what the wrapped entry says of itself)


def takes_missing(*inputs: str):
    """Marks a node function that accepts None for these catalog inputs (OptionalDataset entries no run has
    written yet) and says itself what it needs. The project's run hook stops any other node that would get
    None, naming the input, instead of letting it fail on a None somewhere inside."""

    def mark(function):
        function.takes_missing = frozenset(inputs)
        return function

    return mark
