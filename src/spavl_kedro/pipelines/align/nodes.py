"""align: the base policy, and one training method per run on the split (or the official release).

The base policy is configuration: a tiny LLaVA bootstrapped to comply too often (embedded default) or a
real model such as LLaVA-1.5-7B (paper profile). `align.method` picks DPO, SFT (MIS chain-of-thought or
chosen answers), a VLM reward model, or GRPO / RLOO against that reward model and/or the judge; the
method's recipe is `align.<method>`. The result joins `aligned_models` under `align.name` (default: the
method), next to the models of earlier runs; a LoRA run stores the adapter, not a copy of the policy.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pandas as pd

from spavl_kedro.backends.adapters import LoraAdapter
from spavl_kedro.backends.judge_factory import primary_judge
from spavl_kedro.backends.online_rl import judge_reward
from spavl_kedro.backends.reward import RewardModel
from spavl_kedro.backends.settings import Behaviour
from spavl_kedro.backends.tiny import VLM, seed_examples, train_tiny_vlm
from spavl_kedro.backends.methods import get_method
from spavl_kedro.backends.train_worker import launch
from spavl_kedro.backends.vlm import load_vlm
from spavl_kedro.config import AlignConfig, JudgeConfig, TinyConfig, typed



def prepare_policy(seed_corpus: pd.DataFrame, tiny_foundation: VLM,
                   params: AlignConfig | dict[str, Any], tiny: TinyConfig | dict[str, Any]) -> VLM:
    """The policy to align: bootstrapped offline from the tiny foundation (kind tiny) or loaded from a
    directory or hub id with the spec's `load_kwargs` (the trainers cast their copy to the recipe's
    `weights_dtype`, whatever dtype this loads in)."""
    cfg = typed(AlignConfig, params).policy
    if cfg.kind == "transformers":
        return load_vlm(cfg.model, trust_remote_code=cfg.trust_remote_code, **cfg.load_kwargs)
    tcfg = typed(TinyConfig, tiny)
    behaviour = Behaviour(refusal_rate=cfg.refusal_rate, over_refusal_rate=cfg.over_refusal_rate,
                          vague_rate=cfg.vague_rate)
    vlm, _ = train_tiny_vlm(tiny_foundation.processor, seed_examples(seed_corpus), behaviour,
                            tcfg.model, tcfg.bootstrap, seed=cfg.seed, init=tiny_foundation)
    return vlm


def select_training_pairs(ours: dict[str, pd.DataFrame], official: dict[str, pd.DataFrame],
                          params: AlignConfig | dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """train and validation pairs from this project's export or from the official SPA-VL release."""
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
    return [{"images": [r.image["bytes"]], "question": r.question,
             "chosen": r.chosen, "rejected": r.rejected} for r in split.itertuples(index=False)]


def train_aligned(policy_base: VLM, train: pd.DataFrame, validation: pd.DataFrame, mis_train: pd.DataFrame,
                  images: pd.DataFrame, seed_corpus: pd.DataFrame, aligned_before: dict[str, Any],
                  credentials: dict[str, Any], judge_models: dict[str, Any], params: AlignConfig | dict[str, Any],
                  judge_params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train with `align.method` (then each of `align.also`) and its recipe; returns {name: artifact} for
    `aligned_models`, the summary, and the run parameters (method, data size) for the parent MLflow run.

    dpo / sft / grpo / rloo give a policy (a LoRA adapter, or a full fine-tune); reward gives a reward model.
    Every method starts from the base policy; each training logs its curves to a nested MLflow child run.
    """
    cfg = typed(AlignConfig, params)
    artifacts, summaries = {}, []
    for method in cfg.methods:
        name = cfg.artifact if method == cfg.method else method
        artifact, summary = _train_one(method, name, cfg, policy_base, train, validation, mis_train, images,
                                       seed_corpus, aligned_before, credentials, judge_models, judge_params)
        artifacts[name] = artifact
        summaries.append(summary)
    first = summaries[0]
    summary = {**first, "also": summaries[1:]} if len(summaries) > 1 else first
    run_params = {"align.trained": ",".join(artifacts), "align.train_examples": first["train_examples"],
                  "align.validation_examples": first["validation_examples"]}
    return artifacts, summary, run_params


def _train_one(method: str, name: str, cfg: AlignConfig, policy_base: VLM, train: pd.DataFrame,
               validation: pd.DataFrame, mis_train: pd.DataFrame, images: pd.DataFrame, seed_corpus: pd.DataFrame,
               aligned_before: dict[str, Any], credentials: dict[str, Any], judge_models: dict[str, Any],
               judge_params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    data, held_out = _training_data(method, cfg, train, validation, mis_train, images, seed_corpus)
    if not data:
        raise ValueError(f"align.method '{method}': no training examples (train_source {cfg.train_source})")
    launched = cfg.launch.accelerate_config is not None
    with tempfile.TemporaryDirectory(prefix=f"{method}-") as scratch:
        settings = cfg.settings(method, output_dir=scratch, artifact=name)
        reward_model, reward_fn = (_rl_reward(cfg, aligned_before, credentials, judge_models, judge_params, launched)
                                   if get_method(method).rewarded else (None, None))
        if launched:
            artifact, metrics = launch(method, policy_base, data, settings, cfg.launch.accelerate_config,
                                       cfg.launch.num_processes, eval_records=held_out or None,
                                       reward_model=reward_model)
        else:
            artifact, metrics = get_method(method).train(policy_base, data, settings, held_out or None, reward_fn)
    summary = {"method": method, "name": name, "train_source": cfg.train_source,
               "train_examples": len(data), "validation_examples": len(held_out), **metrics,
               "settings": settings.model_dump(exclude={"output_dir"})}
    return artifact, summary


def _training_data(method: str, cfg: AlignConfig, train: pd.DataFrame, validation: pd.DataFrame, mis_train: pd.DataFrame,
                   images: pd.DataFrame, seed_corpus: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """What the method trains on (its row's `records`) and the held-out part: pairs (dpo, reward), targets
    (sft; on chain-of-thought each target `sft_upsample` times plus `sft_replay` harmless seed examples per
    target), prompts (RL). Images stay encoded (PNG / JPEG bytes); the trainers decode them a batch at a time."""
    records = get_method(method).records
    if records == "pairs":
        return _pairs(train), _pairs(validation)
    if records == "targets" and cfg.sft_data == "cot":
        pixels = dict(zip(images["image_id"], images["png"]))
        examples = [{"images": [pixels[i] for i in r.image_ids], "question": r.question,
                     "target": r.target} for r in mis_train.itertuples(index=False)]
        n_eval = len(examples) // 10
        targets = examples[n_eval:]
        return targets * cfg.sft_upsample + _replay(seed_corpus, cfg.sft_replay * len(targets), cfg), \
            examples[:n_eval]
    if records == "targets":
        def chosen(split):
            return [{"images": [r.image["bytes"]], "question": r.question, "target": r.chosen}
                    for r in split.itertuples(index=False)]
        return chosen(train), chosen(validation)
    # RL needs prompts only: one per (question, image); template questions repeat across a subcategory's images
    unique = train.assign(_image=[i["path"] for i in train["image"]]).drop_duplicates(["question", "_image"])
    return [{"images": [r.image["bytes"]], "question": r.question}
            for r in unique.itertuples(index=False)], []


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
    rows = seed_corpus[~seed_corpus["harmful"].astype(bool)]
    if rows.empty:
        raise ValueError("align.sft_replay is above 0 but the seed corpus has no harmless requests to replay "
                         "(it is empty when images come from a real source)")
    seed = cfg.settings("sft", output_dir="unused").seed  # the sft recipe's own seed
    picked = rows.sample(n=want, replace=want > len(rows), random_state=seed)
    return [{"images": [r.png], "question": r.question, "target": r.answer}
            for r in picked.itertuples(index=False)]


def _rl_reward(cfg: AlignConfig, aligned_before: dict[str, Any], credentials: dict[str, Any],
               judge_models: dict[str, Any], judge_params: JudgeConfig | dict[str, Any], launched: bool
               ) -> tuple[RewardModel | None, Any]:
    """The reward model (when it has weight) and the reward function: the weighted sum of the reward model's
    score and the primary judge's verdict (safe 1, else 0). Launched processes get the reward model only."""
    parts, model = [], None
    if cfg.rl.model_weight > 0:
        if cfg.rl.reward_model not in aligned_before:
            raise ValueError(f"align.rl.reward_model '{cfg.rl.reward_model}' is not in aligned_models "
                             f"(have: {sorted(aligned_before)}); train it with --params align.method=reward")
        entry = aligned_before[cfg.rl.reward_model]
        # the catalog gives a loader, memory the model itself (a Module, so callable too: test the type)
        model = entry if isinstance(entry, (RewardModel, LoraAdapter, VLM)) else entry()
        if not isinstance(model, RewardModel):
            raise ValueError(f"align.rl.reward_model '{cfg.rl.reward_model}' is a policy, not a reward model")
        parts.append((cfg.rl.model_weight, model.score))
    if cfg.rl.judge_weight > 0:
        if launched:
            raise ValueError("align.launch runs grpo / rloo with the reward model's score only: set "
                             "align.rl.judge_weight to 0 (the judge's models live in the Kedro process), or "
                             "train without align.launch")
        judge = primary_judge(typed(JudgeConfig, judge_params), credentials, judge_models)
        parts.append((cfg.rl.judge_weight, judge_reward(judge)))
    if launched and cfg.rl.model_weight != 1:
        raise ValueError(f"align.launch runs grpo / rloo with the reward model's score unweighted: set "
                         f"align.rl.model_weight to 1 (it is {cfg.rl.model_weight})")

    def reward(items: list[dict]) -> list[float]:
        total = [0.0] * len(items)
        for weight, fn in parts:
            total = [t + weight * r for t, r in zip(total, fn(items))]
        return total

    return model, reward
