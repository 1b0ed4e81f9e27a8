"""Long stages in shards that survive a crash: plan, answer what is missing, gather with checks.

A stage (responses, verdicts) cuts its records into shards and gives each a fingerprint of everything
that decides its output (model config, inputs). The node returns one function per shard that still needs
work; the catalog's `ShardDataset` calls them one at a time and writes each shard when it is done. A rerun
reads the shards on disk and:
- skips a shard with the same fingerprint and no failed record;
- in a shard with failed records, redoes only those and keeps the rest;
- redoes a shard whose fingerprint differs (other inputs or config).
The plan node also returns the plan as a table (`plan_table`), which the catalog stores; `gather` joins
the shards it names and fails on a missing or stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Shard:
    shard_id: str  # "<owner>/<index>" (owner: a model, or scorer/model/set), stored as <folder>/<shard_id>.parquet
    rows: pd.DataFrame  # the records it covers, in a stable order
    fingerprint: str
    index: int  # its place among its owner's shards; sampling seeds derive from it


def plan_table(shards: list[Shard]) -> pd.DataFrame:
    """The plan as the catalog stores it: each planned shard's id, fingerprint and number of records. The
    collect node checks the stored shards against this table instead of planning a second time."""
    return pd.DataFrame({"shard_id": [shard.shard_id for shard in shards],
                         "fingerprint": [shard.fingerprint for shard in shards],
                         "records": [len(shard.rows) for shard in shards]},
                        columns=["shard_id", "fingerprint", "records"])


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cut(rows: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [rows.iloc[start : start + size] for start in range(0, len(rows), size)]


def pending(shards: list[Shard], done: Mapping[str, Callable[[], pd.DataFrame]],
            failed: Callable[[pd.DataFrame], pd.Series]) -> Iterator[tuple[Shard, pd.DataFrame | None]]:
    """Shards that need work, each with the reusable part on disk (None: do it all)."""
    skipped = 0
    for shard in shards:
        previous = _stored(done, shard)
        if previous is not None and not failed(previous).any():
            skipped += 1
            continue
        yield shard, previous
    if skipped:
        log.info("%d shard(s) already on disk", skipped)


def _stored(done: Mapping[str, Callable[[], pd.DataFrame]], shard: Shard) -> pd.DataFrame | None:
    if shard.shard_id not in done:
        return None
    try:
        previous = done[shard.shard_id]()
    except Exception as exc:  # a damaged or foreign file: do the shard again
        log.warning("shard %s unreadable (%s): doing it again", shard.shard_id, exc)
        return None
    if "fingerprint" not in previous or (previous["fingerprint"] != shard.fingerprint).any():
        log.info("shard %s was written for other inputs or config: doing it again", shard.shard_id)
        return None
    return previous


def complete(shard: Shard, previous: pd.DataFrame | None, key: str, failed: Callable[[pd.DataFrame], pd.Series],
             work: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Run `work` on the shard's rows (only the failed ones when `previous` holds the rest) and merge."""
    todo = shard.rows
    if previous is not None:
        todo = todo[todo[key].isin(previous.loc[failed(previous), key])]
    fresh = work(todo).assign(fingerprint=shard.fingerprint)
    if previous is not None:
        fresh = pd.concat([previous[~failed(previous)], fresh]).sort_values(key)
    return fresh.reset_index(drop=True)


def gather(plan: pd.DataFrame, stored: Mapping[str, Callable[[], pd.DataFrame]], stage: str) -> pd.DataFrame:
    """The shards of `plan` (see `plan_table`) joined; raises naming a shard that is missing or was written
    for other inputs. Shards on disk that the plan does not name are not read."""
    frames = []
    for shard_id, expected in zip(plan["shard_id"], plan["fingerprint"]):
        if shard_id not in stored:
            raise ValueError(f"{stage} shard {shard_id} is missing: rerun the stage")
        frame = stored[shard_id]()
        if (frame["fingerprint"] != expected).any():
            raise ValueError(f"{stage} shard {shard_id} was written for other inputs or config")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class Progress:
    """One bar over the shards of a run, with rate and ETA, created when the first shard starts."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self._bar = what, total, None

    def advance(self, note: str) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=f"{self.what} shards", unit="shard")
        self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(1)
        log.info("%s shard %s", self.what, note)
        if self._bar.n >= self.total:
            self._bar.close()
