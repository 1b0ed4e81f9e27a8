"""Shards of a long stage, saved one by one as they are produced, so a crash loses at most one shard.

A node returns a dict shard id -> function; `PartitionedDataset` saves lazily, calling each function and
writing its result before calling the next. This subclass adds what resuming needs:
- `load()` on a stage that has not written anything yet gives `{}` instead of raising, so the node that
  plans the work can read which shards already exist;
- each shard is written to a temporary name and renamed, so a kill mid-write leaves either the whole
  shard or none of it (a rename is atomic on a local filesystem);
- a mapping that runs its shards side by side (`Lanes` in pipelines/sharding.py, duck-typed by its
  `as_done()`) is written in the order its shards finish, each as soon as it is ready.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from copy import deepcopy
from typing import Any

from kedro_datasets.partitions import PartitionedDataset

PARTIAL = ".partial"


class ShardDataset(PartitionedDataset):
    def load(self) -> dict[str, Callable[[], Any]]:
        self._invalidate_caches()
        if not self._list_partitions():
            return {}
        return super().load()

    def save(self, data: dict[str, Any]) -> None:
        if self._protocol not in ("file", None) or self._overwrite:
            return super().save(data)  # atomic rename is a local-filesystem guarantee; elsewhere write directly
        shards = data.as_done() if hasattr(data, "as_done") else sorted(data.items())
        for shard_id, shard in shards:
            final = self._partition_to_path(shard_id)
            kwargs = deepcopy(self._dataset_config)
            kwargs[self._filepath_arg] = final + PARTIAL
            dataset = self._dataset_type(**kwargs)
            dataset.save(shard() if callable(shard) else shard)
            os.replace(final + PARTIAL, final)
        self._invalidate_caches()
