"""Long stages in shards that survive a crash: plan, answer what is missing, gather with checks.

A stage (responses, verdicts) cuts its records into shards and gives each a fingerprint of everything
that decides its output (model config, inputs). The node returns one function per shard that still needs
work; the catalog's `ShardDataset` calls them and writes each shard when it is done. Returned as `Lanes`,
shards of different lanes (models behind different servers) run at the same time, and each is written as
it finishes. A rerun reads the shards on disk and:
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
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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
    return pd.DataFrame(
        {
            "shard_id": [shard.shard_id for shard in shards],
            "fingerprint": [shard.fingerprint for shard in shards],
            "records": [len(shard.rows) for shard in shards],
        },
        columns=["shard_id", "fingerprint", "records"],
    )


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cut(rows: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [rows.iloc[start : start + size] for start in range(0, len(rows), size)]


def pending(
    shards: list[Shard], done: Mapping[str, Callable[[], pd.DataFrame]], failed: Callable[[pd.DataFrame], pd.Series]
) -> Iterator[tuple[Shard, pd.DataFrame | None]]:
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


def complete(
    shard: Shard,
    previous: pd.DataFrame | None,
    key: str,
    failed: Callable[[pd.DataFrame], pd.Series],
    work: Callable[[pd.DataFrame], pd.DataFrame],
) -> pd.DataFrame:
    """Run `work` on the shard's rows (only the failed ones when `previous` holds the rest) and merge."""
    todo = shard.rows
    if previous is not None:
        todo = todo[todo[key].isin(previous.loc[failed(previous), key])]
    fresh = work(todo).assign(fingerprint=shard.fingerprint)
    if previous is not None:
        fresh = pd.concat([previous[~failed(previous)], fresh]).sort_values(key)
    return fresh.reset_index(drop=True)


class Lanes(dict):
    """Shard functions (shard id -> function) and the lane each runs in. Shards of one lane run one after
    another in id order; lanes run at the same time, one thread each, and `as_done()` yields every
    (shard id, result) as it finishes, so `ShardDataset` writes it at once.

    A lane is what must not be asked twice at once: this process's GPUs (every in-process model shares one
    lane, so they still take turns) or one inference server. Results do not depend on the lanes: each shard
    carries its own inputs and seed. As a plain dict it is the old sequential work, in id order.

    >>> lanes = Lanes({"a/0": lambda: 1, "b/0": lambda: 2, "a/1": lambda: 3}, {"a/0": "x", "a/1": "x", "b/0": "y"})
    >>> sorted(lanes.as_done())
    [('a/0', 1), ('a/1', 3), ('b/0', 2)]
    """

    def __init__(self, work: Mapping[str, Callable[[], Any]], lane_of: Mapping[str, str]) -> None:
        super().__init__(work)
        self.lane_of = {shard_id: lane_of[shard_id] for shard_id in work}

    def as_done(self) -> Iterator[tuple[str, Any]]:
        """Run every shard, yielding each result as it is ready. When a shard raises, no lane starts another
        shard; the shards already running finish and are yielded (a crash loses no finished work), then the
        first error is raised."""
        lanes: dict[str, list[str]] = {}
        for shard_id in sorted(self):
            lanes.setdefault(self.lane_of[shard_id], []).append(shard_id)
        if len(lanes) < 2:  # one lane: in this thread, exactly as before lanes existed
            for shard_id in sorted(self):
                yield shard_id, self[shard_id]()
            return
        finished: queue.Queue = queue.Queue()
        stop = threading.Event()

        def run(shard_ids: list[str]) -> None:
            try:
                for shard_id in shard_ids:
                    if stop.is_set():
                        break
                    finished.put((shard_id, self[shard_id](), None))
            except BaseException as exc:  # handed to the caller's thread, which raises it
                stop.set()
                finished.put((shard_id, None, exc))
            finally:
                finished.put(None)  # this lane is done

        # Daemon threads: an interrupted run exits without waiting for a lane's last, unsaved shard.
        for lane, shard_ids in lanes.items():
            threading.Thread(target=run, args=(shard_ids,), name=f"shards:{lane}", daemon=True).start()
        running, error = len(lanes), None
        try:
            while running:
                item = finished.get()
                if item is None:
                    running -= 1
                elif item[2] is not None:
                    error = error or item[2]
                else:
                    yield item[0], item[1]
        finally:
            stop.set()  # also when the caller stops early (a failed write): no lane starts another shard
        if error is not None:
            raise error


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
        self._lock = threading.Lock()  # shards of several lanes finish from their own threads

    def advance(self, note: str) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=self.total, desc=f"{self.what} shards", unit="shard")
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(1)
            log.info("%s shard %s", self.what, note)
            if self._bar.n >= self.total:
                self._bar.close()
