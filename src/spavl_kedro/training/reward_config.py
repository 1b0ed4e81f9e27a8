"""The settings of a reward-model run (`align.reward`), read by `training/reward.py`."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import Field, model_validator

from spavl_kedro.training.recipe_config import RecipeSettings, names_lm_head


class RewardSettings(RecipeSettings):
    """Hyperparameters of one reward-model run. Defaults separate refusals from compliances on a tiny LLaVA;
    the optimiser fields carry transformers' `TrainingArguments` names and meanings."""

    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate; `lr_scheduler_type` shapes it")
    lr_scheduler_type: str = Field(
        "linear",
        description="a transformers scheduler name (`get_scheduler`): `linear` decays to zero, "
        "`constant_with_warmup` holds the peak after the warm-up (SPA-VL's)",
    )
    warmup_steps: float = Field(
        0,
        ge=0,
        description="linear warm-up from 0 to `learning_rate`: a whole number of optimiser steps, or a "
        "fraction of all steps when below 1, rounded up (transformers 5's `warmup_steps`, "
        "which took over `warmup_ratio`)",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="clip the global gradient norm to this before each optimiser step; `0` turns "
        "clipping off. Under DeepSpeed it fills the config's `gradient_clipping`",
    )
    num_train_epochs: int = Field(3, ge=1, description="passes over the preference pairs")
    per_device_train_batch_size: int = Field(
        8,
        ge=1,
        description="pairs per process per optimisation step; each pair is two sequences (the project's own "
        "loop, named as the TRL trainers are)",
    )
    lora: bool = Field(
        False,
        description="train a LoRA adapter on the language model plus the whole head (`true`), "
        "or every weight `freeze_vision_tower` leaves (`false`)",
    )
    freeze_vision_tower: bool = Field(
        True,
        description="full fine-tune: the vision tower keeps its weights while the projector, the language "
        "model and the head train, as in SPA-VL's reward model. The LM head never trains (a reward "
        "model does not compute it), and with `lora` only the adapters and the head do",
    )
    run_name: str = Field("reward", description="name of the nested MLflow run")
    output_dir: str | None = Field(
        None,
        description="unused by the reward model's own loop (its checkpoints go to `checkpoint_dir`); kept so "
        "every recipe has the same fields",
    )

    @model_validator(mode="before")
    @classmethod
    def _warmup_ratio_is_warmup_steps(cls, data: Any) -> Any:
        # SPA-VL's scripts pass --warmup_ratio, which transformers 5 removed: say what to write instead of
        # failing on an unknown key.
        if isinstance(data, dict) and "warmup_ratio" in data:
            raise ValueError(
                f"warmup_ratio is gone from transformers 5: write warmup_steps: {data['warmup_ratio']} "
                "(a value below 1 is a fraction of the optimiser steps)"
            )
        return data

    @pydantic.field_validator("trl_args")
    @classmethod
    def _not_a_trl_trainer(cls, value: dict) -> dict:
        if value:
            raise ValueError("the reward model trains in its own loop, not a TRL trainer: trl_args does not apply")
        return value

    @pydantic.field_validator("lora_target_modules")
    @classmethod
    def _no_lm_head(cls, value: list[str] | str) -> list[str] | str:
        if names_lm_head(value):
            raise ValueError(
                "lora_target_modules must not include lm_head: the reward model scores from the last "
                "hidden state and never runs the LM head"
            )
        return value
