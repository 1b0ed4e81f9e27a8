"""The alignment methods, one table: what each trains on, its recipe's settings class and its trainer.

`align.method: <name>` and `align.also` pick rows of `METHODS`; `align.<name>` is the row's recipe, checked
against its settings class; the align node builds the row's kind of records and calls its trainer. Adding a
method is its own module with a trainer, one row here and its recipe in `parameters_align.yml`:

    METHODS["kto"] = Method(KTOSettings, records="pairs", trainer="my_package.kto:train",
                            summary="KTO on the preference pairs")

A trainer is `train(vlm, records, settings, eval_records=None, reward_fn=None) -> (artifact, metrics)`: it
trains a copy of `vlm` (the base policy) and returns what joins `aligned_models` (a `LoraAdapter`, a `VLM` or a
`RewardModel`) and a flat dict of final metrics. This module imports no torch: trainers are named as
"module:function" and imported when their method runs, so the configuration loads without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.online_rl_config import OnlineRLSettings
from spavl_kedro.training.recipe_config import RecipeSettings
from spavl_kedro.training.reward_config import RewardSettings
from spavl_kedro.training.sft_config import SFTSettings

# What a method trains on. Every record also has `images` (a list of encoded images); these are its texts.
RECORDS: dict[str, tuple[str, ...]] = {
    "pairs": ("question", "chosen", "rejected"),  # train / validation preference pairs
    "targets": ("question", "target"),  # MIS chain-of-thought targets or the chosen answers (align.sft_data)
    "prompts": ("question",),  # one per (question, image) of train: the policy answers, a reward scores
}


@dataclass(frozen=True)
class Method:
    settings: type[RecipeSettings]  # the recipe's class: align.<name> is validated against it
    records: Literal["pairs", "targets", "prompts"]
    trainer: str  # "module:function", see the module docstring
    summary: str  # what it trains, for the docs and error messages
    rewarded: bool = False  # online RL: the trainer gets a reward function (align.rl)
    fixed: dict[str, Any] = field(default_factory=dict)  # settings the row fixes (GRPO and RLOO share a class)

    @property
    def columns(self) -> tuple[str, ...]:
        return RECORDS[self.records]

    def train(
        self,
        vlm,
        records: Sequence[dict],
        settings: RecipeSettings,
        eval_records: Sequence[dict] | None = None,
        reward_fn: Callable[[list[dict]], list[float]] | None = None,
    ) -> tuple[Any, dict]:
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)(vlm, records, settings, eval_records, reward_fn)


METHODS: dict[str, Method] = {
    "dpo": Method(DPOSettings, "pairs", "spavl_kedro.training.dpo:train", "DPO on the preference pairs (SPA-VL)"),
    "sft": Method(
        SFTSettings,
        "targets",
        "spavl_kedro.training.sft:train",
        "supervised fine-tuning on chain-of-thought targets (MIS) or chosen answers",
    ),
    "reward": Method(
        RewardSettings,
        "pairs",
        "spavl_kedro.training.reward:train",
        "a VLM reward model on the preference pairs (SPA-VL's RM for PPO)",
    ),
    "grpo": Method(
        OnlineRLSettings,
        "prompts",
        "spavl_kedro.training.online_rl:train",
        "GRPO against the reward model and/or the judge",
        rewarded=True,
        fixed={"algorithm": "grpo"},
    ),
    "rloo": Method(
        OnlineRLSettings,
        "prompts",
        "spavl_kedro.training.online_rl:train",
        "RLOO against the reward model and/or the judge",
        rewarded=True,
        fixed={"algorithm": "rloo"},
    ),
}


def get_method(name: str) -> Method:
    """The row of `name`, or an error that lists the known methods."""
    if name not in METHODS:
        raise ValueError(f"unknown alignment method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def settings_for(name: str, fields: dict[str, Any]) -> RecipeSettings:
    """The method's settings from its recipe fields (and the row's fixed ones)."""
    row = get_method(name)
    return row.settings.model_validate({**fields, **row.fixed})
