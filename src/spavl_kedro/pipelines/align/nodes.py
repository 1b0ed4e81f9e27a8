"""align: the base policy, and DPO on the preference split.

The base policy is configuration: a tiny LLaVA bootstrapped to comply too often (embedded default) or a
real model such as LLaVA-1.5-7B (paper profile). DPO trains a LoRA adapter with TRL; the adapter, not a
full copy of the policy, is the catalog artifact.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pandas as pd

from spavl_kedro.backends.adapters import LoraAdapter
from spavl_kedro.backends.tiny import VLM, train_tiny_vlm
from spavl_kedro.backends.training import DPOSettings, train_dpo
from spavl_kedro.backends.vlm import decode_image, load_vlm
from spavl_kedro.config import AlignConfig, TinyConfig
from spavl_kedro.pipelines.generate.nodes import seed_examples


def prepare_policy(seed_corpus: pd.DataFrame, images: pd.DataFrame, tiny_processor,
                   params: dict[str, Any], tiny: dict[str, Any]) -> VLM:
    """The policy to align: bootstrapped offline (kind tiny) or loaded from a directory or hub id."""
    cfg = AlignConfig.model_validate(params).policy
    if cfg.kind == "transformers":
        return load_vlm(cfg.model)
    tcfg = TinyConfig.model_validate(tiny)
    vlm, _ = train_tiny_vlm(tiny_processor, seed_examples(seed_corpus, images), cfg.refusal_rate,
                            tcfg.model, tcfg.bootstrap, seed=cfg.seed)
    return vlm


def select_training_pairs(ours: dict[str, pd.DataFrame], official: dict[str, pd.DataFrame],
                          params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """train and validation pairs from this project's export or from the official SPA-VL release."""
    cfg = AlignConfig.model_validate(params)
    if cfg.train_source == "official":
        release, where = official, f"align.official_dir ({cfg.official_dir})"
    else:
        release, where = ours, "the split pipeline's export (spa_vl_release): run `kedro run --pipeline split`"
    if "train" not in release:
        raise ValueError(f"align.train_source is '{cfg.train_source}' but there is no train split in {where}")
    validation = release.get("validation", release["train"].iloc[:0])
    return release["train"], validation


def _pairs(split: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"images": [decode_image(r.image["bytes"])], "question": r.question,
             "chosen": r.chosen, "rejected": r.rejected} for r in split.itertuples(index=False)]


def train_dpo_policy(policy_base: VLM, train: pd.DataFrame, validation: pd.DataFrame,
                     params: dict[str, Any]) -> tuple[LoraAdapter, dict[str, Any]]:
    """DPO with a LoRA adapter; the reference model is the adapter-disabled base (TRL's default with PEFT).

    Training logs to a nested MLflow child run (loss, rewards/accuracies, rewards/margins curves).
    """
    cfg = AlignConfig.model_validate(params)
    if train.empty:
        raise ValueError("train split is empty: nothing to align on")
    with tempfile.TemporaryDirectory(prefix="dpo-") as scratch:
        settings = DPOSettings.model_validate({**cfg.dpo, "output_dir": scratch})
        model, metrics = train_dpo(policy_base, _pairs(train), settings,
                                   eval_pairs=_pairs(validation) if len(validation) else None)
    summary = {"train_pairs": len(train), "validation_pairs": len(validation), **metrics,
               "settings": settings.model_dump(exclude={"output_dir"})}
    return LoraAdapter.from_peft(model), summary
