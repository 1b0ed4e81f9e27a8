"""Reference answers for the help items that come without one, in shards that survive a crash.

HelpEval scores a policy's answer against a reference answer to the same harmless question (SPA-VL,
arXiv 2406.12030, compared against GPT-4V's answers). On this project's split the reference is what
`evaluate.reference_responder` answered in the generate stage. The official test split (test/help: image,
question, class1..3) has no answers at all, so that responder answers those items here, once: the same
`generate.responders[]` spec built by the same factory, with the same generation settings as in generate,
so the references of both test sources are drawn the same way. The embedded default's responder is a tiny
LLaVA (offline); conf/paper's is an API model.

The shards follow `pipelines/sharding.py`: `<responder>/<eval_set>/<index>`, fingerprinted by the
responder's spec (transport fields aside), its generation settings, a tiny model's weights and the items;
a rerun skips what is done and retries only failed answers. A failed answer is kept with its error:
`reference_answers` holds it, the report and the metrics count it, and the help judge scores each policy's
answer to that item as a loss (`reference_error`) rather than leaving the item out.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import pandas as pd

from spavl_kedro.config import CostsConfig, EvaluateConfig, GenerateConfig, stage_spend, typed
from spavl_kedro.datasets.optional import takes_missing
from spavl_kedro.evalsets.registry import IMAGE_BLANKED
from spavl_kedro.models.costs import SpendLedger, UsageMeter
from spavl_kedro.models.factory import api_key, build_backend, weights_of
from spavl_kedro.models.specs import TRANSPORT_FIELDS, BackendSpec
from spavl_kedro.models.vlm import Prompt, VLMBackend
from spavl_kedro.pipelines.sharding import Progress, Shard, complete, cut, fingerprint, gather, pending, plan_table
from spavl_kedro.seeding import derive_seed

log = logging.getLogger(__name__)

# origin: "generate" (the responder's answer from the generate stage, already in eval_items) or "evaluate"
# (answered by plan_reference_answers); model: what answered (`reference_model`)
REFERENCE_COLUMNS = [
    "item_id",
    "eval_set",
    "responder",
    "model",
    "origin",
    "text",
    "finish_reason",
    "latency_s",
    "error",
]


@takes_missing("responder_models")  # a tiny model's absence is named by the backend factory
def plan_reference_answers(
    items: pd.DataFrame,
    responder_models: Mapping[str, Any],
    credentials: Mapping[str, Any],
    done: Mapping[str, Callable[[], pd.DataFrame]],
    params: EvaluateConfig | dict[str, Any],
    generate_params: GenerateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
) -> tuple[dict[str, Callable[[], pd.DataFrame]], pd.DataFrame]:
    """One function per reference shard still to answer, and the plan (`reference_answer_plan`) that
    `collect_reference_answers` checks them against. Nothing is planned, and nothing loads, when every help
    item has its reference or no `evaluate.reference_responder` is set. An API responder counts into the
    evaluate stage's spend, checked against its budget before each shard."""
    cfg, gcfg = typed(EvaluateConfig, params), typed(GenerateConfig, generate_params)
    unreferenced = _unreferenced(items)
    if unreferenced.empty:
        return {}, plan_table([])
    if cfg.reference_responder is None:
        log.warning(
            "evaluate: %d help item(s) have no reference answer and evaluate.reference_responder is null: "
            "their win rate is left out",
            len(unreferenced),
        )
        return {}, plan_table([])
    spec = reference_spec(cfg, gcfg)
    api_key(spec, credentials)  # a missing key fails now, before any model loads
    config = [
        spec.model_dump(mode="json", exclude=set(TRANSPORT_FIELDS)),
        gcfg.generation,
        weights_of(spec, responder_models),
    ]
    planned = []
    for eval_set, group in unreferenced.groupby("eval_set", sort=True):
        for index, rows in enumerate(cut(group.sort_values("item_id"), cfg.shard_size)):
            content = [
                (r.item_id, r.question, [hashlib.sha256(b).hexdigest()[:12] for b in r.images])
                for r in rows.itertuples(index=False)
            ]
            planned.append(
                Shard(f"{spec.name}/{eval_set}/{index:05d}", rows, fingerprint(config, cfg.seed, content), index)
            )
    todo = list(pending(planned, done, _failed))
    log.info("evaluate: %d of %d reference answer shard(s) to answer by '%s'", len(todo), len(planned), spec.name)
    spend = stage_spend("evaluate", api_spend, costs)
    answerer = _Answerer(
        spec, gcfg, cfg.seed, responder_models, credentials, Progress("reference answer", len(todo)), spend.meter
    )
    work = {
        shard.shard_id: partial(complete, shard, previous, "item_id", _failed, partial(_answer, answerer, shard))
        for shard, previous in todo
    }
    return spend.guard(work), plan_table(planned)


def collect_reference_answers(
    reference_shards: Mapping[str, Callable[[], pd.DataFrame]],
    reference_plan: pd.DataFrame,
    items: pd.DataFrame,
    params: EvaluateConfig | dict[str, Any],
    generate_params: GenerateConfig | dict[str, Any],
) -> pd.DataFrame:
    """Every help item's reference in one table (`REFERENCE_COLUMNS`): those eval_items already carry
    (origin `generate`) and those answered here (origin `evaluate`), failures kept with their error."""
    cfg, gcfg = typed(EvaluateConfig, params), typed(GenerateConfig, generate_params)
    answered = gather(reference_plan, reference_shards, "reference answer")
    expected = int(reference_plan["records"].sum())
    if len(answered) != expected or (len(answered) and answered.duplicated(["eval_set", "item_id"]).any()):
        raise ValueError(
            f"reference answers: {len(answered)} rows, expected {expected} (one per help item without a reference)"
        )
    help_items = items[items["kind"] == "help"]
    given = help_items[help_items["reference"].notna()]
    frames = [answered[REFERENCE_COLUMNS]] if len(answered) else []
    if len(given) and cfg.reference_responder is not None:
        spec = reference_spec(cfg, gcfg)
        frames.append(
            pd.DataFrame(
                {
                    "item_id": given["item_id"],
                    "eval_set": given["eval_set"],
                    "responder": spec.name,
                    "model": reference_model(spec),
                    "origin": "generate",
                    "text": given["reference"],
                    "finish_reason": None,
                    "latency_s": None,
                    "error": None,
                },
                columns=REFERENCE_COLUMNS,
            )
        )
    if not frames:
        return pd.DataFrame(columns=REFERENCE_COLUMNS)
    references = pd.concat(frames, ignore_index=True).sort_values(["eval_set", "item_id"]).reset_index(drop=True)
    failed = int(_failed(references).sum())
    if failed:
        log.warning(
            "evaluate: the reference responder failed on %d of %d help items; kept with their error, each "
            "a loss for every policy (a rerun retries only those)",
            failed,
            len(references),
        )
    return references


def reference_spec(cfg: EvaluateConfig, gcfg: GenerateConfig) -> BackendSpec:
    """The `generate.responders[]` entry `evaluate.reference_responder` names."""
    for spec in gcfg.responders:
        if spec.name == cfg.reference_responder:
            return spec
    raise ValueError(
        f"evaluate.reference_responder '{cfg.reference_responder}' is not one of generate.responders "
        f"{[s.name for s in gcfg.responders]}"
    )


def reference_model(spec: BackendSpec) -> str:
    """What answers for `spec`, as the report names it: the served or loaded model, or a tiny LLaVA."""
    return spec.model if spec.model else "a tiny LLaVA built offline"


def _unreferenced(items: pd.DataFrame) -> pd.DataFrame:
    """Help items without a reference; an image-blanked copy takes its original's (scoring.py)."""
    return items[(items["kind"] == "help") & items["reference"].isna() & (items["variant"] != IMAGE_BLANKED)]


def _failed(frame: pd.DataFrame) -> pd.Series:
    return frame["error"].notna()


class _Answerer:
    """The reference responder, built on first use (a rerun with every shard on disk loads nothing)."""

    def __init__(
        self,
        spec: BackendSpec,
        gcfg: GenerateConfig,
        seed: int,
        responder_models: Mapping[str, Any],
        credentials: Mapping[str, Any],
        progress: Progress,
        meter: UsageMeter | None = None,
    ) -> None:
        self.spec, self.gcfg, self.seed, self.progress = spec, gcfg, seed, progress
        self.responder_models, self.credentials, self.meter = responder_models, credentials, meter
        self._backend: VLMBackend | None = None

    def backend(self, shard: Shard) -> VLMBackend:
        if self._backend is None:
            self._backend = build_backend(
                self.spec,
                tiny_models=self.responder_models,
                credentials=self.credentials,
                generation=self.gcfg.generation,
                batch_size=self.gcfg.batch_size,
                progress=False,
                meter=self.meter,
            )
        # a seed per shard, named by it: an answer does not depend on which other shards ran in this process
        return replace(self._backend, seed=derive_seed(self.seed, "reference answer", shard.shard_id))


def _answer(answerer: _Answerer, shard: Shard, todo: pd.DataFrame) -> pd.DataFrame:
    began = time.perf_counter()
    outputs = answerer.backend(shard).generate(
        [Prompt(r.question, tuple(r.images)) for r in todo.itertuples(index=False)]
    )
    fresh = pd.DataFrame(
        {
            "item_id": todo["item_id"].to_numpy(),
            "eval_set": todo["eval_set"].to_numpy(),
            "responder": answerer.spec.name,
            "model": reference_model(answerer.spec),
            "origin": "evaluate",
            "text": [o.text if o.error is None else None for o in outputs],
            "finish_reason": [o.finish_reason for o in outputs],
            "latency_s": [o.latency_s for o in outputs],
            "error": [o.error for o in outputs],
        },
        columns=REFERENCE_COLUMNS,
    )
    answerer.progress.advance(
        f"{shard.shard_id}: {len(todo)} answered, {int(_failed(fresh).sum())} failed, "
        f"{time.perf_counter() - began:.1f}s"
    )
    return fresh
