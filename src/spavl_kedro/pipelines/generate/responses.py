"""Responses: every kept question answered by every responder, in shards that survive a crash.

`plan_response_shards` returns one function per shard that still needs work; the catalog's `ShardDataset`
calls them one at a time and writes each shard as soon as it is answered. A rerun reads the shards on
disk and plans only what is missing:
- a shard written by the same responder config for the same questions is skipped;
- in a shard with failed records only those records are asked again, the rest are kept;
- a shard written for other questions or another config (its fingerprint differs) is answered anew.
`collect_responses` then joins the planned shards and checks every (question, responder) is there once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Mapping

import pandas as pd
from tqdm.auto import tqdm

from spavl_kedro.backends.factory import BackendSpec, api_key, build_backend
from spavl_kedro.backends.vlm import Prompt, VLMBackend
from spavl_kedro.config import GenerateConfig
from spavl_kedro.schema import TABLES, validate

log = logging.getLogger(__name__)

SHARD_COLUMNS = [*TABLES["responses"], "fingerprint"]


@dataclass
class Shard:
    shard_id: str  # "<responder>/<index>", the file responses/<responder>/<index>.parquet
    responder: int  # position in generate.responders, for the seed
    index: int
    questions: pd.DataFrame
    fingerprint: str


def plan_shards(questions: pd.DataFrame, images: pd.DataFrame, cfg: GenerateConfig) -> list[Shard]:
    """Kept questions in question_id order, cut into `shard_size` pieces, for each responder."""
    kept = questions[questions["kept"]].sort_values("question_id").reset_index(drop=True)
    shas = dict(zip(images["image_id"], images["sha256"]))
    shards = []
    for n, spec in enumerate(cfg.responders):
        config = _config_fingerprint(spec, cfg)
        for index, start in enumerate(range(0, len(kept), cfg.shard_size)):
            chunk = kept.iloc[start : start + cfg.shard_size]
            content = [(q.question_id, q.text, [shas[i] for i in q.image_ids]) for q in chunk.itertuples(index=False)]
            digest = hashlib.sha256(json.dumps([config, content]).encode()).hexdigest()[:16]
            shards.append(Shard(f"{spec.name}/{index:05d}", n, index, chunk, digest))
    return shards


def _config_fingerprint(spec: BackendSpec, cfg: GenerateConfig) -> str:
    """What decides a responder's answers: its spec, the shared generation kwargs and the seed. Concurrency,
    timeouts and endpoint URLs do not change answers, so a rerun against other servers still resumes."""
    relevant = spec.model_dump(exclude={"concurrency", "timeout_s", "max_retries", "base_urls", "api_key",
                                        "batch_size"})
    return json.dumps([relevant, cfg.generation, cfg.seed], sort_keys=True, default=str)


def plan_response_shards(questions: pd.DataFrame, images: pd.DataFrame,
                         responder_models: Mapping[str, Any], credentials: Mapping[str, Any],
                         done_shards: Mapping[str, Callable[[], pd.DataFrame]],
                         params: dict[str, Any]) -> dict[str, Callable[[], pd.DataFrame]]:
    """One function per shard that still needs answers (see the module docstring for the rules)."""
    cfg = GenerateConfig.model_validate(params)
    for spec in cfg.responders:  # a missing key fails now, not after hours of other responders' shards
        api_key(spec, credentials)
    pixels = dict(zip(images["image_id"], images["png"]))
    pool = _BackendPool(cfg, responder_models, credentials)
    work: dict[str, Callable[[], pd.DataFrame]] = {}
    skipped = 0
    for shard in plan_shards(questions, images, cfg):
        previous = _load(done_shards, shard)
        if previous is not None and previous["error"].isna().all():
            skipped += 1
            continue
        work[shard.shard_id] = partial(_answer_shard, shard, previous, pixels, pool)
    pool.total = len(work)
    log.info("responses: %d shard(s) to answer, %d already on disk", len(work), skipped)
    return work


def _load(done: Mapping[str, Callable[[], pd.DataFrame]], shard: Shard) -> pd.DataFrame | None:
    """The shard on disk if it answers exactly this shard's questions with this config, else None."""
    if shard.shard_id not in done:
        return None
    try:
        previous = done[shard.shard_id]()
    except Exception as exc:  # a shard file from an older layout or a damaged disk: answer it again
        log.warning("shard %s unreadable (%s): answering it again", shard.shard_id, exc)
        return None
    if (previous["fingerprint"] != shard.fingerprint).any():
        log.info("shard %s was written for other questions or another config: answering it again", shard.shard_id)
        return None
    return previous


def _answer_shard(shard: Shard, previous: pd.DataFrame | None, pixels: Mapping[str, bytes],
                  pool: "_BackendPool") -> pd.DataFrame:
    """Answer the shard's questions (only the failed ones when `previous` holds the rest)."""
    spec = pool.cfg.responders[shard.responder]
    todo = shard.questions
    if previous is not None:
        failed = set(previous.loc[previous["error"].notna(), "question_id"])
        todo = todo[todo["question_id"].isin(failed)]
    began = time.perf_counter()
    # A seed per shard: a shard's samples do not depend on which other shards ran in this process.
    backend = pool.get(spec, seed=pool.cfg.seed * 1_000_003 + shard.responder * 10_007 + shard.index)
    outputs = backend.generate([Prompt(q.text, tuple(pixels[i] for i in q.image_ids))
                                for q in todo.itertuples(index=False)])
    fresh = pd.DataFrame({
        "response_id": [f"{qid}:{spec.name}" for qid in todo["question_id"]],
        "question_id": todo["question_id"].to_numpy(), "responder": spec.name,
        "text": [o.text for o in outputs], "finish_reason": [o.finish_reason for o in outputs],
        "latency_s": [o.latency_s for o in outputs], "error": [o.error for o in outputs],
        "fingerprint": shard.fingerprint}, columns=SHARD_COLUMNS)
    if previous is not None:
        fresh = pd.concat([previous[previous["error"].isna()], fresh]).sort_values("question_id")
    failed = int(fresh["error"].notna().sum())
    pool.advance(f"{shard.shard_id}: {len(todo)} asked, {failed} failed, {time.perf_counter() - began:.1f}s")
    return fresh[SHARD_COLUMNS].reset_index(drop=True)


@dataclass
class _BackendPool:
    """Holds one responder's backend at a time: shards are saved in id order, so all shards of a responder
    run together and the previous model is released before the next loads (12 7B models never share RAM)."""

    cfg: GenerateConfig
    tiny_models: Mapping[str, Any]
    credentials: Mapping[str, Any]
    total: int = 0
    _name: str | None = None
    _backend: VLMBackend | None = None
    _bar: Any = field(default=None, repr=False)

    def get(self, spec: BackendSpec, seed: int) -> VLMBackend:
        if self._name != spec.name:
            self._backend = None  # drop the previous model before loading the next
            self._backend = build_backend(spec, tiny_models=self.tiny_models, credentials=self.credentials,
                                          generation=self.cfg.generation, batch_size=self.cfg.batch_size,
                                          progress=False)
            self._name = spec.name
        return replace(self._backend, seed=seed)

    def advance(self, note: str) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc="response shards", unit="shard")
        self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(1)
        log.info("response shard %s", note)
        if self._bar.n >= self.total:
            self._bar.close()


def collect_responses(response_shards: Mapping[str, Callable[[], pd.DataFrame]], questions: pd.DataFrame,
                      images: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """The planned shards joined into `responses`; fails if any (question, responder) is missing or doubled.

    Shards on disk that the current plan does not name (another config, fewer questions) are left alone
    and not read.
    """
    cfg = GenerateConfig.model_validate(params)
    frames = []
    for shard in plan_shards(questions, images, cfg):
        if shard.shard_id not in response_shards:
            raise ValueError(f"response shard {shard.shard_id} is missing: rerun `kedro run --pipeline generate`")
        frame = response_shards[shard.shard_id]()
        if (frame["fingerprint"] != shard.fingerprint).any():
            raise ValueError(f"response shard {shard.shard_id} was written for other questions or config")
        frames.append(frame)
    responses = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SHARD_COLUMNS)
    doubled = responses[responses.duplicated(["question_id", "responder"], keep=False)]
    if not doubled.empty:
        raise ValueError(f"responses: {len(doubled)} (question, responder) records appear twice, e.g. "
                         f"{doubled.iloc[0]['response_id']}")
    expected = int(questions["kept"].sum()) * len(cfg.responders)
    if len(responses) != expected:
        raise ValueError(f"responses: {len(responses)} records, expected {expected} (kept questions x responders)")
    failed = int(responses["error"].notna().sum())
    if failed:
        log.warning("%d of %d generations failed; kept with their error (a rerun retries only those)",
                    failed, len(responses))
    return validate(responses, "responses")
