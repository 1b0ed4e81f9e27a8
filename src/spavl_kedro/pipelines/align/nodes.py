"""align: the base policy, and one node per training method on the split (or the official release).

The base policy is configuration: a tiny LLaVA bootstrapped to comply too often (embedded default) or a
real model such as LLaVA-1.5-7B (paper profile); `align.bases` adds further base policies by name (MIS's
InternVL in the paper profile), which the methods `align.base_of` names train from. Every row of
`training.methods.METHODS` is a node `train_<method>` (DPO, SFT on MIS chain-of-thought or chosen answers, a
VLM reward model, GRPO / RLOO against that reward model and/or the judge) writing its own dataset
`aligned_<method>`; the nodes whose method is in `align.method` / `align.also` train, with the recipe
`align.<method>`, the others leave their models as they are. A model is stored under `align.name` (the first
method; default the method's name) next to the models of earlier runs; a LoRA run stores the adapter, not a
copy of the policy. One method failing fails the run, but the models the other nodes already wrote stay.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from typing import Any

import pandas as pd

from spavl_kedro.config import AlignConfig, JudgeConfig, PolicyConfig, TinyConfig, typed
from spavl_kedro.datasets.optional import takes_missing
from spavl_kedro.judges.factory import build_verdict_judge
from spavl_kedro.models.families import family_of
from spavl_kedro.models.specs import BASE, Behaviour
from spavl_kedro.models.tiny import VLM, seed_examples, train_tiny_vlm
from spavl_kedro.models.vlm import as_configured, load_vlm
from spavl_kedro.training.adapters import LoraAdapter
from spavl_kedro.training.methods import get_method
from spavl_kedro.training.online_rl import judge_reward
from spavl_kedro.training.reward import RewardModel
from spavl_kedro.training.train_worker import launch

log = logging.getLogger(__name__)


@takes_missing("seed_corpus", "tiny_foundation")
def prepare_policy(
    seed_corpus: pd.DataFrame | None,
    tiny_foundation: VLM | None,
    params: AlignConfig | dict[str, Any],
    tiny: TinyConfig | dict[str, Any],
) -> VLM:
    """The policy to align (`align.policy`): bootstrapped offline from the tiny foundation (kind tiny) or loaded
    from a directory or hub id with the spec's `load_kwargs` (the trainers cast their copy to the recipe's
    `weights_dtype`, whatever dtype this loads in)."""
    return _prepared(typed(AlignConfig, params).policy, "align.policy", seed_corpus, tiny_foundation, tiny)


@takes_missing("seed_corpus", "tiny_foundation")
def prepare_bases(
    seed_corpus: pd.DataFrame | None,
    tiny_foundation: VLM | None,
    params: AlignConfig | dict[str, Any],
    tiny: TinyConfig | dict[str, Any],
) -> dict[str, VLM]:
    """Every further base policy of `align.bases`, by name, prepared as `prepare_policy` prepares the policy:
    the methods `align.base_of` names train from them, and evaluation answers with each."""
    bases = typed(AlignConfig, params).bases
    return {
        name: _prepared(spec, f"align.bases.{name}", seed_corpus, tiny_foundation, tiny) for name, spec in bases.items()
    }


def _prepared(
    cfg: PolicyConfig,
    where: str,
    seed_corpus: pd.DataFrame | None,
    tiny_foundation: VLM | None,
    tiny: TinyConfig | dict[str, Any],
) -> VLM:
    if cfg.kind == "transformers":
        vlm = load_vlm(cfg.model, trust_remote_code=cfg.trust_remote_code, **cfg.load_kwargs)
        return as_configured(vlm, cfg)
    if seed_corpus is None or tiny_foundation is None:
        raise ValueError(
            f"{where}.kind is 'tiny': the policy is bootstrapped from the generate stage's "
            "tiny_foundation and seed_corpus, which no run has written here; run `kedro run --pipeline "
            f"generate` first, or set {where} to a real model (kind: transformers)"
        )
    tcfg = typed(TinyConfig, tiny)
    behaviour = Behaviour(
        refusal_rate=cfg.refusal_rate, over_refusal_rate=cfg.over_refusal_rate, vague_rate=cfg.vague_rate
    )
    vlm, _ = train_tiny_vlm(
        tiny_foundation.processor,
        seed_examples(seed_corpus),
        behaviour,
        tcfg.model,
        tcfg.bootstrap,
        seed=cfg.seed,
        init=tiny_foundation,
    )
    return as_configured(vlm, cfg)


def _base(policy_bases: Mapping[str, Any] | None, name: str) -> VLM:
    """The base policy `name` of `policy_bases` (prepare_bases), loaded."""
    found = policy_bases or {}
    if name not in found:
        raise ValueError(
            f"align.base_of trains from base '{name}', which no run of prepare_bases has written "
            f"(data/06_models/policy_bases has {sorted(found)}): run the align pipeline whole first"
        )
    entry = found[name]
    return entry if isinstance(entry, VLM) else entry()


def training_pairs(
    ours: dict[str, pd.DataFrame], official: dict[str, pd.DataFrame], params: AlignConfig | dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """train and validation pairs from this project's export or from the official SPA-VL release
    (`align.train_source`). Each train node reads them from the release datasets on disk, so
    `kedro run --pipeline align --nodes train_sft` needs nothing an earlier node held in memory."""
    cfg = typed(AlignConfig, params)
    if cfg.train_source == "official":
        release, where = official, f"align.official_dir ({cfg.official_dir})"
    else:
        release, where = ours, "the split pipeline's export (spa_vl_release): run `kedro run --pipeline split`"
    if "train" not in release:
        raise ValueError(f"align.train_source is '{cfg.train_source}' but there is no train split in {where}")
    validation = release.get("validation", release["train"].iloc[:0])
    return release["train"], validation


def _pairs(split: pd.DataFrame) -> list[dict[str, Any]]:
    """Pair records for the trainers, the images still encoded: they decode one batch at a time."""
    return [
        {"images": [r.image["bytes"]], "question": r.question, "chosen": r.chosen, "rejected": r.rejected}
        for r in split.itertuples(index=False)
    ]


def train_method(
    method: str,
    policy_base: VLM,
    policy_bases: Mapping[str, Any] | None,
    params: AlignConfig | dict[str, Any],
    ours: dict[str, pd.DataFrame],
    official: dict[str, pd.DataFrame],
    mis_train: pd.DataFrame | None = None,
    images: pd.DataFrame | None = None,
    seed_corpus: pd.DataFrame | None = None,
    reward_models: Mapping[str, Any] | None = None,
    credentials: dict[str, Any] | None = None,
    judge_models: dict[str, Any] | None = None,
    judge_params: JudgeConfig | dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The node `train_<method>`: train `method` from its base policy (`policy_base`, or the entry of
    `policy_bases` that `align.base_of` names) when this run asks for it (`align.method` or `align.also`), and
    return ({name: model} for `aligned_<method>`, {name: summary} for
    `align_summary_<method>`, the MLflow run parameters). The pairs come from `ours` (this project's
    export) or `official` (the SPA-VL release), as `align.train_source` says. A method the run does not ask for returns empty
    mappings, which save nothing: the model an earlier run trained stays where it is.

    dpo / sft / grpo / rloo give a policy (a LoRA adapter, or a full fine-tune); reward gives a reward model.
    Each training logs its curves to a nested MLflow child run. grpo / rloo read the reward model from
    `reward_models` (the `aligned_reward` dataset), so a reward model trained in the same run is found.
    """
    cfg = typed(AlignConfig, params)
    if method not in cfg.methods:
        log.info(
            "train_%s: '%s' is not in align.method / align.also (%s): nothing trained, earlier models kept",
            method,
            method,
            ", ".join(cfg.methods),
        )
        return {}, {}, {}
    name = cfg.artifact_name(method)
    train, validation = training_pairs(ours, official, cfg)
    data, held_out = training_data(method, cfg, train, validation, mis_train, images, seed_corpus)
    if not data:
        raise ValueError(f"align.method '{method}': no training examples (train_source {cfg.train_source})")
    base_name, base_spec = cfg.policy_of(method)
    policy = policy_base if base_name == BASE else _base(policy_bases, base_name)
    accelerate_config = cfg.launch.config_for(method)
    launched = accelerate_config is not None
    with tempfile.TemporaryDirectory(prefix=f"{method}-") as scratch:
        settings = cfg.settings(method, output_dir=scratch, artifact=name)
        reward_model, reward_fn = (
            _rl_reward(cfg, reward_models or {}, credentials or {}, judge_models or {}, judge_params, launched)
            if get_method(method).rewarded
            else (None, None)
        )
        if launched:
            artifact, metrics = launch(
                method,
                policy,
                data,
                settings,
                accelerate_config,
                cfg.launch.num_processes,
                eval_records=held_out or None,
                reward_model=reward_model,
            )
        else:
            artifact, metrics = get_method(method).train(policy, data, settings, held_out or None, reward_fn)
    if isinstance(artifact, LoraAdapter):  # evaluation merges it into the base it was trained from
        artifact = dataclasses.replace(artifact, base=base_name)
    summary = {
        "method": method,
        "name": name,
        "train_source": cfg.train_source,
        "base": base_name,
        "chat_template": base_spec.chat_template,
        "image_preprocessing": base_spec.image_preprocessing,
        "system_sentence": base_spec.system_sentence,
        "family": family_of(policy.model).name,
        "train_examples": len(data),
        "validation_examples": len(held_out),
        **metrics,
        "settings": settings.model_dump(exclude={"output_dir"}),
    }
    run_params = {
        f"align.trained.{name}.method": method,
        f"align.trained.{name}.train_examples": len(data),
        f"align.trained.{name}.validation_examples": len(held_out),
    }
    return {name: artifact}, {name: summary}, run_params


def training_data(
    method: str,
    cfg: AlignConfig,
    train: pd.DataFrame,
    validation: pd.DataFrame | None,
    mis_train: pd.DataFrame | None,
    images: pd.DataFrame | None,
    seed_corpus: pd.DataFrame | None,
) -> tuple[list[dict], list[dict]]:
    """What the method trains on (its row's `records`) and the held-out part: pairs (dpo, reward), targets
    (sft; on chain-of-thought each target `sft_upsample` times plus `sft_replay` harmless seed examples per
    target), prompts (RL). Images stay encoded (PNG / JPEG bytes); the trainers decode them a batch at a time."""
    records = get_method(method).records
    if records == "pairs":
        return _pairs(train), _pairs(validation)
    if records == "targets" and cfg.sft_data == "cot":
        if mis_train is None or images is None:
            raise ValueError(
                f"align.sft_data is 'cot': {method} trains on this project's MIS chain-of-thought "
                "targets (mis_train, images), which no run has written here; run the generate, judge "
                "and split pipelines first, or set align.sft_data: chosen"
            )
        pixels = dict(zip(images["image_id"], images["png"]))
        examples = [
            {"images": [pixels[i] for i in r.image_ids], "question": r.question, "target": r.target}
            for r in mis_train.itertuples(index=False)
        ]
        n_eval = len(examples) // 10
        targets = examples[n_eval:]
        return targets * cfg.sft_upsample + _replay(seed_corpus, cfg.sft_replay * len(targets), cfg), examples[:n_eval]
    if records == "targets":

        def chosen(split):
            return [
                {"images": [r.image["bytes"]], "question": r.question, "target": r.chosen}
                for r in split.itertuples(index=False)
            ]

        return chosen(train), chosen(validation)
    # RL needs prompts only: one per (question, image); template questions repeat across a subcategory's images
    unique = train.assign(_image=[i["path"] for i in train["image"]]).drop_duplicates(["question", "_image"])
    return [{"images": [r.image["bytes"]], "question": r.question} for r in unique.itertuples(index=False)], []


def _replay(seed_corpus: pd.DataFrame, count: float, cfg: AlignConfig) -> list[dict]:
    """`count` harmless requests of the seed corpus (capability questions and questions about the image)
    with their helpful answers, drawn with the sft recipe's seed, without repeats unless more are asked for
    than the corpus holds (then with replacement). SFT keeps rehearsing what the base policy was taught to
    answer, as safety fine-tuning mixes in general instruction data. Distinct rows matter: a few dozen
    replayed many times were memorised, and the tiny policy lost capability on images it had not seen (see
    the sft table in conf/base)."""
    want = round(count)
    if want == 0:
        return []
    if seed_corpus is None:
        raise ValueError(
            "align.sft_replay is above 0 but no run has written the seed corpus here (the generate "
            "pipeline does); set align.sft_replay: 0"
        )
    rows = seed_corpus[~seed_corpus["harmful"].astype(bool)]
    if rows.empty:
        raise ValueError(
            "align.sft_replay is above 0 but the seed corpus has no harmless requests to replay "
            "(it is empty when images come from a real source)"
        )
    seed = cfg.settings("sft", output_dir="unused").seed  # the sft recipe's own seed
    picked = rows.sample(n=want, replace=want > len(rows), random_state=seed)
    return [{"images": [r.png], "question": r.question, "target": r.answer} for r in picked.itertuples(index=False)]


def _rl_reward(
    cfg: AlignConfig,
    reward_models: Mapping[str, Any],
    credentials: dict[str, Any],
    judge_models: dict[str, Any],
    judge_params: JudgeConfig | dict[str, Any],
    launched: bool,
) -> tuple[RewardModel | None, Any]:
    """The reward model (when it has weight) and the reward function: the weighted sum of the reward model's
    score and the primary judge's verdict (safe 1, else 0). Launched processes get the reward model only."""
    parts, model = [], None
    if cfg.rl.model_weight > 0:
        if cfg.rl.reward_model not in reward_models:
            raise ValueError(
                f"align.rl.reward_model '{cfg.rl.reward_model}' is not in aligned_reward "
                f"(have: {sorted(reward_models)}); train it first, or in the same run: "
                f"--params align.also=[reward]"
            )
        entry = reward_models[cfg.rl.reward_model]
        # the catalog gives a loader, memory the model itself (a Module, so callable too: test the type)
        model = entry if isinstance(entry, (RewardModel, LoraAdapter, VLM)) else entry()
        if not isinstance(model, RewardModel):
            raise ValueError(f"align.rl.reward_model '{cfg.rl.reward_model}' is a policy, not a reward model")
        parts.append((cfg.rl.model_weight, model.score))
    if cfg.rl.judge_weight > 0:
        if launched:
            raise ValueError(
                "align.launch runs grpo / rloo with the reward model's score only: set "
                "align.rl.judge_weight to 0 (the judge's models live in the Kedro process), or "
                "train without align.launch"
            )
        jcfg = typed(JudgeConfig, judge_params)
        judge = build_verdict_judge(jcfg.spec(jcfg.primary), credentials or {}, jcfg, judge_models)
        parts.append((cfg.rl.judge_weight, judge_reward(judge)))
    if launched and cfg.rl.model_weight != 1:
        raise ValueError(
            f"align.launch runs grpo / rloo with the reward model's score unweighted: set "
            f"align.rl.model_weight to 1 (it is {cfg.rl.model_weight})"
        )

    def reward(items: list[dict]) -> list[float]:
        total = [0.0] * len(items)
        for weight, fn in parts:
            total = [t + weight * r for t, r in zip(total, fn(items))]
        return total

    return model, reward
