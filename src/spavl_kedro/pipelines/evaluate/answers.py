"""Every policy answers every evaluation item, in shards that survive a crash (see pipelines/sharding.py).

Policies: `base`, each further base of `align.bases` under its name, and each policy in `aligned_models` (a
LoRA adapter is merged into a copy of the base it was trained from, a full fine-tune is used as it is, a reward model is skipped: it scores answers, it does not write them).
A shard is `<model>/<eval_set>/<index>`; its fingerprint covers the model's weights, the items and the
decoding settings, so retraining a policy under the same name re-answers its shards and nothing else.
Decoding: greedy (SPA-VL's evaluation), plus `samples` sampled answers per item, recorded per row.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd

from spavl_kedro.config import BASE, CostsConfig, EvaluateConfig, stage_spend, typed
from spavl_kedro.datasets.optional import takes_missing
from spavl_kedro.evalsets.registry import IMAGE_BLANKED
from spavl_kedro.models.costs import SpendLedger, UsageMeter
from spavl_kedro.models.factory import OneAtATime, build_backend
from spavl_kedro.models.tiny import VLM, weights_fingerprint
from spavl_kedro.models.vlm import Prompt, TransformersVLM, VLMBackend, place_for_answering
from spavl_kedro.pipelines.sharding import Progress, Shard, complete, cut, fingerprint, gather, pending, plan_table
from spavl_kedro.seeding import eval_answer_seed
from spavl_kedro.training.adapters import LoraAdapter, apply_adapter
from spavl_kedro.training.reward import RewardModel

log = logging.getLogger(__name__)

GENERATION_COLUMNS = [
    "item_id",
    "model",
    "eval_set",
    "variant",
    "decoding",
    "sample",
    "text",
    "finish_reason",
    "latency_s",
    "error",
]


@dataclass
class Policy:
    load: Callable[[], VLM]  # builds the model when its shards are answered
    weights: str  # weights_fingerprint of what `load` gives


def gather_aligned_models(**by_method: Mapping[str, Any]) -> dict[str, Any]:
    """One mapping name -> model (or its loader) of every method's dataset `aligned_<method>`; a name two
    methods both use is an error, as evaluation metrics are named by it."""
    gathered: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for method, models in by_method.items():
        for name, model in models.items():
            if name in gathered:
                raise ValueError(
                    f"aligned model '{name}' exists for both {owner[name]} and {method} "
                    f"(data/06_models/aligned/<method>/{name}): remove one, or rename with align.name"
                )
            gathered[name], owner[name] = model, method
    return gathered


def policies(
    policy_base: VLM, aligned_models: Mapping[str, Any], policy_bases: Mapping[str, Any] | None = None
) -> dict[str, Policy]:
    """Every policy to evaluate, base first, then the further bases (`policy_bases`, by their names), then the
    aligned models, each artifact loaded once here to learn its type and weights.

    A LoRA adapter is kept (it is small) and merged into a copy of the base it was trained from when needed;
    a full model is not kept: its catalog loader runs again when its shards are answered, so several 7B
    policies never sit in memory together. Reward models score answers; they do not write them.
    """
    found = {BASE: Policy(lambda: policy_base, weights_fingerprint(policy_base.model.state_dict()))}
    for name in sorted(policy_bases or {}):
        found[name] = _full_model(name, policy_bases[name])
    bases = list(found)
    for name in sorted(aligned_models):
        if name in found:
            raise ValueError(f"aligned model '{name}' has the name of a base policy: rename it with align.name")
        entry = aligned_models[name]
        # the catalog gives loaders, memory the models (a reward model is a Module, callable too: test types)
        artifact = entry if isinstance(entry, (LoraAdapter, VLM, RewardModel)) else entry()
        if isinstance(artifact, RewardModel):
            continue
        if isinstance(artifact, LoraAdapter):  # the merged policy is its base plus the adapter
            if artifact.base not in bases:
                raise ValueError(
                    f"aligned model '{name}' is a LoRA adapter of base '{artifact.base}', which is not a "
                    f"base policy here (have: {bases}): add it to align.bases and run prepare_bases"
                )
            base = found[artifact.base]
            found[name] = Policy(
                partial(_merged, base.load, artifact),
                fingerprint(base.weights, weights_fingerprint(artifact.state_dict)),
            )
        elif isinstance(artifact, VLM):
            found[name] = _full_model(name, entry, artifact)
        else:
            raise ValueError(f"aligned_models['{name}'] is a {type(artifact).__name__}, not a policy or reward model")
        del artifact
    return found


def _full_model(name: str, entry: Any, loaded: VLM | None = None) -> Policy:
    """A whole model as a policy: `entry` is the model or its catalog loader (then loaded again when answered)."""
    model = loaded if loaded is not None else (entry if isinstance(entry, VLM) else entry())
    if not isinstance(model, VLM):
        raise ValueError(f"policy '{name}' is a {type(model).__name__}, not a VLM")
    load = (lambda vlm=model: vlm) if model is entry else entry
    return Policy(load, weights_fingerprint(model.model.state_dict()))


def _merged(load_base: Callable[[], VLM], adapter: LoraAdapter) -> VLM:
    return apply_adapter(load_base(), adapter)


@takes_missing("policy_bases")
def plan_eval_shards(
    items: pd.DataFrame,
    policy_base: VLM,
    aligned_models: Mapping[str, Any],
    done: Mapping[str, Callable[[], pd.DataFrame]],
    credentials: dict[str, Any],
    params: EvaluateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
    policy_bases: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Callable[[], pd.DataFrame]], pd.DataFrame]:
    """One function per shard still to answer, which the catalog's ShardDataset runs and writes in id order,
    and the plan (`eval_answer_plan`) that `collect_eval_answers` checks them against. A policy named in
    `evaluate.served` is answered through its endpoint instead of being loaded, counting into the evaluate
    stage's spend, checked against its budget before each shard. `policy_bases` (prepare_bases) are answered
    under their names beside `base`."""
    cfg = typed(EvaluateConfig, params)
    spend = stage_spend("evaluate", api_spend, costs)
    found = policies(policy_base, aligned_models, policy_bases)
    unknown = sorted({spec.name for spec in cfg.served} - set(found))
    if unknown:
        raise ValueError(f"evaluate.served names {unknown}, which are not policies here (have: {sorted(found)})")
    planned = _plan(items, found, cfg)
    todo = list(pending(planned, done, _failed))
    log.info("evaluate: %d of %d answer shard(s) to generate", len(todo), len(planned))
    pool = _PolicyPool(
        {name: policy.load for name, policy in found.items()},
        cfg,
        credentials,
        Progress("evaluation answer", len(todo)),
        spend.meter,
    )
    work = {
        shard.shard_id: partial(complete, shard, previous, "row_key", _failed, partial(_answer, pool, shard))
        for shard, previous in todo
    }
    return spend.guard(work), plan_table(planned)


def collect_eval_answers(
    answer_shards: Mapping[str, Callable[[], pd.DataFrame]], answer_plan: pd.DataFrame, items: pd.DataFrame
) -> pd.DataFrame:
    """The planned shards joined; every (model, item, decoding, sample) exactly once, failures kept."""
    answers = gather(answer_plan, answer_shards, "evaluation answer")
    if answers.empty:
        return pd.DataFrame(columns=GENERATION_COLUMNS)
    expected = int(answer_plan["records"].sum())  # items x policies x decodings, as planned
    if len(answers) != expected or answers["row_key"].duplicated().any():
        raise ValueError(
            f"evaluation answers: {len(answers)} rows ({answers['row_key'].duplicated().sum()} "
            f"doubled), expected {expected} (items x policies x decodings)"
        )
    unanswered = set(items["item_id"]) - set(answers["item_id"])
    if unanswered:
        raise ValueError(f"evaluation answers: {len(unanswered)} items have no answer, e.g. {sorted(unanswered)[0]}")
    failed = int(_failed(answers).sum())
    if failed:
        log.warning(
            "evaluate: %d of %d generations failed; kept with their error and scored as failures "
            "(a rerun retries only those)",
            failed,
            len(answers),
        )
    return (
        answers[GENERATION_COLUMNS]
        .sort_values(["model", "eval_set", "item_id", "decoding", "sample"])
        .reset_index(drop=True)
    )


def _plan(items: pd.DataFrame, found: Mapping[str, Policy], cfg: EvaluateConfig) -> list[Shard]:
    shards = []
    for model, policy in found.items():
        weights = policy.weights
        for eval_set, group in items.groupby("eval_set", sort=True):
            decoding = {
                "max_new_tokens": cfg.new_tokens(eval_set),
                "samples": cfg.samples_for(eval_set),
                "temperature": cfg.temperature,
                "seed": cfg.seed,
            }
            group = group.sort_values(["variant", "item_id"])
            for index, rows in enumerate(cut(group, cfg.shard_size)):
                content = [
                    (r.item_id, r.question, [hashlib.sha256(b).hexdigest()[:12] for b in r.images])
                    for r in rows.itertuples(index=False)
                ]
                rows = _expand(rows, model, cfg.samples_for(eval_set))
                shards.append(
                    Shard(f"{model}/{eval_set}/{index:05d}", rows, fingerprint(weights, decoding, content), index)
                )
    return shards


def _expand(rows: pd.DataFrame, model: str, samples: int) -> pd.DataFrame:
    """One row per decoding of each item: greedy (sample 0), then the sampled answers 0..samples-1. An item of
    the blank-image ablation is answered greedily only."""
    runs = [("greedy", 0)] + [("sampled", k) for k in range(samples)]
    frames = [rows.assign(model=model, decoding=d, sample=k) for d, k in runs]
    frames = [f if d == "greedy" else f[f["variant"] != IMAGE_BLANKED] for f, (d, _) in zip(frames, runs)]
    out = pd.concat(frames, ignore_index=True)
    out["row_key"] = out["model"] + "|" + out["item_id"] + "|" + out["decoding"] + "|" + out["sample"].astype(str)
    return out


def _failed(frame: pd.DataFrame) -> pd.Series:
    return frame["error"].notna()


class _PolicyPool:
    """One policy in memory at a time: shards run in id order, so all shards of a model run together. A
    served policy (`evaluate.served`) is never loaded: its answers come from its endpoint."""

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], VLM]],
        cfg: EvaluateConfig,
        credentials: dict[str, Any],
        progress: Progress,
        meter: UsageMeter | None = None,
    ) -> None:
        self.loaders, self.cfg, self.credentials, self.progress = loaders, cfg, credentials, progress
        self.meter = meter  # served policies count their tokens here
        self.served = {spec.name: spec for spec in cfg.served}
        self.held: OneAtATime[VLM] = OneAtATime()

    def backend(self, name: str, label: str, generation: dict[str, Any], seed: int) -> VLMBackend:
        """What answers for policy `name`: its endpoint, or the policy loaded and placed by the placement rule."""
        if name in self.served:
            return build_backend(
                self.served[name],
                credentials=self.credentials,
                generation=generation,
                seed=seed,
                progress=False,
                meter=self.meter,
            )
        policy = self.held.get(name, lambda: place_for_answering(self.loaders[name](), self.cfg.policy_load_kwargs))
        return TransformersVLM(label, policy, self.cfg.batch_size, generation, seed=seed, progress=False)


def _answer(pool: _PolicyPool, shard: Shard, todo: pd.DataFrame) -> pd.DataFrame:
    cfg = pool.cfg
    model, eval_set, _ = shard.shard_id.rsplit("/", 2)
    began = time.perf_counter()
    frames = []
    for (decoding, sample), group in todo.groupby(["decoding", "sample"], sort=True):
        kwargs = (
            {"do_sample": False}
            if decoding == "greedy"
            else {"do_sample": True, "temperature": cfg.temperature, "top_k": 0}
        )
        # a seed per shard and sample: an answer does not depend on which other shards ran in this process
        seed = eval_answer_seed(cfg.seed, shard.index, decoding, int(sample))
        generation = {"max_new_tokens": cfg.new_tokens(eval_set), **kwargs}
        backend = pool.backend(model, f"{model}/{eval_set}", generation, seed)
        outputs = backend.generate([Prompt(r.question, tuple(r.images)) for r in group.itertuples(index=False)])
        frames.append(
            group.assign(
                text=[o.text if o.error is None else None for o in outputs],
                finish_reason=[o.finish_reason for o in outputs],
                latency_s=[o.latency_s for o in outputs],
                error=[o.error for o in outputs],
            )
        )
    fresh = pd.concat(frames, ignore_index=True)[[*GENERATION_COLUMNS, "row_key"]]
    pool.progress.advance(
        f"{shard.shard_id}: {len(todo)} answers, {int(_failed(fresh).sum())} failed, {time.perf_counter() - began:.1f}s"
    )
    return fresh
