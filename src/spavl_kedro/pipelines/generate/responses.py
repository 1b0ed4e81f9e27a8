"""Responses: every kept question answered by every responder, in shards that survive a crash.

The shard rules (skip what is done, redo only failed records, redo a shard written for other inputs) are
in `pipelines/sharding.py`. A response shard's fingerprint covers the responder's spec, the shared
generation kwargs, the seed, a tiny responder's weights, and its questions' texts and image hashes; endpoint URLs, concurrency and
timeouts do not change answers, so a rerun against other servers still resumes.

Responders behind different servers answer at the same time (`responder_lanes`); models in this process
take turns. Each shard has its own seed, so the tables are the same either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import pandas as pd

from spavl_kedro.config import CostsConfig, GenerateConfig, stage_spend, typed
from spavl_kedro.datasets.optional import takes_missing
from spavl_kedro.models.costs import SpendLedger, UsageMeter
from spavl_kedro.models.factory import OneAtATime, api_key, build_backend, weights_of
from spavl_kedro.models.specs import TRANSPORT_FIELDS, BackendSpec
from spavl_kedro.models.vlm import Prompt, VLMBackend
from spavl_kedro.pipelines.sharding import (
    Lanes,
    Progress,
    Shard,
    complete,
    cut,
    fingerprint,
    gather,
    pending,
    plan_table,
)
from spavl_kedro.schema import TABLES, validate
from spavl_kedro.seeding import response_seed

log = logging.getLogger(__name__)


def _failed(responses: pd.DataFrame) -> pd.Series:
    return responses["error"].notna()


def plan_shards(
    questions: pd.DataFrame, images: pd.DataFrame, cfg: GenerateConfig, responder_models: Mapping[str, Any]
) -> list[tuple[Shard, int]]:
    """Kept questions in question_id order, cut into `shard_size` pieces, for each responder (by index).
    A tiny responder's fingerprint also covers its weights: a re-bootstrapped responder answers again."""
    kept = questions[questions["kept"]].sort_values("question_id").reset_index(drop=True)
    shas = dict(zip(images["image_id"], images["sha256"]))
    shards = []
    for n, spec in enumerate(cfg.responders):
        config = [
            spec.model_dump(exclude=set(TRANSPORT_FIELDS)),
            cfg.generation,
            cfg.seed,
            weights_of(spec, responder_models),
        ]
        for index, chunk in enumerate(cut(kept, cfg.shard_size)):
            content = [(q.question_id, q.text, [shas[i] for i in q.image_ids]) for q in chunk.itertuples(index=False)]
            shards.append((Shard(f"{spec.name}/{index:05d}", chunk, fingerprint(config, content), index), n))
    return shards


def responder_lanes(responders: Sequence[BackendSpec]) -> list[str]:
    """The lane of each responder (see `sharding.Lanes`): models in this process share its GPUs and take
    turns in one lane; each OpenAI-compatible server is a lane of its own (vLLM serves one model per
    process), and responders with a base URL in common share one lane, so no server is asked by two.

    >>> from spavl_kedro.models.specs import BackendSpec
    >>> specs = [
    ...     BackendSpec(name="a", kind="openai", model="m", base_urls=["http://h:1/v1"]),
    ...     BackendSpec(name="b", kind="transformers", model="m"),
    ...     BackendSpec(name="c", kind="openai", model="m", base_urls=["http://h:2/v1", "http://h:1/v1/"]),
    ... ]
    >>> responder_lanes(specs)
    ['server:c', 'in-process', 'server:c']
    """
    lanes: list[str] = []
    for n, spec in enumerate(responders):
        if not spec.served:
            lanes.append("in-process")  # ':' never occurs in a responder name, so no server lane is called this
            continue
        lane, urls = f"server:{spec.name}", {url.rstrip("/") for url in spec.base_urls}
        for m, other in enumerate(responders[:n]):
            if other.served and urls & {url.rstrip("/") for url in other.base_urls}:
                lanes = [lane if label == lanes[m] else label for label in lanes]  # merge its lane into this one
        lanes.append(lane)
    return lanes


@takes_missing("responder_models")  # a tiny model's absence is named by the backend factory
def plan_response_shards(
    questions: pd.DataFrame,
    images: pd.DataFrame,
    responder_models: Mapping[str, Any],
    credentials: Mapping[str, Any],
    done_shards: Mapping[str, Callable[[], pd.DataFrame]],
    params: GenerateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
) -> tuple[dict[str, Callable[[], pd.DataFrame]], pd.DataFrame]:
    """One function per shard that still needs answers, which the catalog runs (each responder lane at the
    same time) and writes as each finishes, and the plan (`response_plan`) that `collect_responses` checks
    the shards against. API responders count into the generate stage's spend, checked against its budget
    before each shard (`models/costs.py`)."""
    cfg = typed(GenerateConfig, params)
    spend = stage_spend("generate", api_spend, costs)
    for spec in cfg.responders:  # a missing key fails now, not after hours of other responders' shards
        api_key(spec, credentials)
    pixels = dict(zip(images["image_id"], images["png"]))
    planned = plan_shards(questions, images, cfg, responder_models)
    responder = {shard.shard_id: n for shard, n in planned}
    todo = list(pending([shard for shard, _ in planned], done_shards, _failed))
    lanes = responder_lanes(cfg.responders)
    pool = _BackendPool(cfg, responder_models, credentials, Progress("response", len(todo)), lanes, spend.meter)
    log.info(
        "responses: %d shard(s) to answer in %d lane(s)",
        len(todo),
        len({lanes[responder[shard.shard_id]] for shard, _ in todo}),
    )
    work = {
        shard.shard_id: partial(
            complete,
            shard,
            previous,
            "question_id",
            _failed,
            partial(_answer, pool, pixels, shard, responder[shard.shard_id]),
        )
        for shard, previous in todo
    }
    work = spend.guard(work)
    return Lanes(work, {shard_id: lanes[responder[shard_id]] for shard_id in work}), plan_table(
        [shard for shard, _ in planned]
    )


def _answer(pool: _BackendPool, pixels: Mapping[str, bytes], shard: Shard, n: int, todo: pd.DataFrame) -> pd.DataFrame:
    spec = pool.cfg.responders[n]
    began = time.perf_counter()
    # A seed per shard: a shard's samples do not depend on which other shards ran in this process.
    backend = pool.get(n, seed=response_seed(pool.cfg.seed, n, shard.index))
    outputs = backend.generate(
        [Prompt(q.text, tuple(pixels[i] for i in q.image_ids)) for q in todo.itertuples(index=False)]
    )
    fresh = pd.DataFrame(
        {
            "response_id": [f"{qid}:{spec.name}" for qid in todo["question_id"]],
            "question_id": todo["question_id"].to_numpy(),
            "responder": spec.name,
            "text": [o.text for o in outputs],
            "finish_reason": [o.finish_reason for o in outputs],
            "latency_s": [o.latency_s for o in outputs],
            "error": [o.error for o in outputs],
        },
        columns=TABLES["responses"],
    )
    pool.progress.advance(
        f"{shard.shard_id}: {len(todo)} asked, {int(_failed(fresh).sum())} failed, {time.perf_counter() - began:.1f}s"
    )
    return fresh


@dataclass
class _BackendPool:
    """Holds one backend per lane: a lane runs its shards in id order, so all shards of a responder run
    together, and the in-process lane releases one model before the next loads (12 7B models never share
    RAM)."""

    cfg: GenerateConfig
    tiny_models: Mapping[str, Any]
    credentials: Mapping[str, Any]
    progress: Progress
    lanes: list[str]  # responder index -> lane
    meter: UsageMeter | None = None  # API responders count their tokens here
    held: dict[str, OneAtATime] = field(init=False)

    def __post_init__(self) -> None:
        self.held = {lane: OneAtATime() for lane in self.lanes}  # built here: lanes' threads only read the dict

    def get(self, n: int, seed: int) -> VLMBackend:
        spec = self.cfg.responders[n]
        backend = self.held[self.lanes[n]].get(
            spec.name,
            lambda: build_backend(
                spec,
                tiny_models=self.tiny_models,
                credentials=self.credentials,
                generation=self.cfg.generation,
                batch_size=self.cfg.batch_size,
                progress=False,
                meter=self.meter,
            ),
        )
        return replace(backend, seed=seed)


def collect_responses(
    response_shards: Mapping[str, Callable[[], pd.DataFrame]],
    response_plan: pd.DataFrame,
    questions: pd.DataFrame,
    params: GenerateConfig | dict[str, Any],
) -> pd.DataFrame:
    """The planned shards joined into `responses`; fails if any (question, responder) is missing or doubled.

    Shards on disk that the current plan does not name (another config, fewer questions) are not read.
    """
    cfg = typed(GenerateConfig, params)
    responses = gather(response_plan, response_shards, "response")
    if responses.empty:
        responses = pd.DataFrame(columns=TABLES["responses"])
    doubled = responses[responses.duplicated(["question_id", "responder"], keep=False)]
    if not doubled.empty:
        raise ValueError(
            f"responses: {len(doubled)} (question, responder) records appear twice, e.g. "
            f"{doubled.iloc[0]['response_id']}"
        )
    expected = int(questions["kept"].sum()) * len(cfg.responders)
    if len(responses) != expected:
        raise ValueError(f"responses: {len(responses)} records, expected {expected} (kept questions x responders)")
    failed = int(_failed(responses).sum())
    if failed:
        log.warning(
            "%d of %d generations failed; kept with their error (a rerun retries only those)", failed, len(responses)
        )
    return validate(responses, "responses")
