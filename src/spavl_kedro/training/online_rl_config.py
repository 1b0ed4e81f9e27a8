"""The settings of a GRPO or RLOO run (`align.grpo`, `align.rloo`), read by `training/online_rl.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spavl_kedro.training.recipe_config import RecipeSettings


# Defaults measured on a tiny LLaVA bootstrapped to refuse ~30% of the time, keyword-judge reward (refusal = 1),
# 16 steps of 4 prompts x 4 answers x 16 tokens, beta 0.1: LoRA on the language MLPs at lr 6e-3 took the reward
# from 0.33 to 0.77 (GRPO) and 0.34 to 0.69 (RLOO); lr 3e-3 gained about half as much. Full weights at lr 1e-3:
# GRPO 0.27 -> 0.69, but RLOO collapsed onto empty answers (its KL penalty is summed over the sequence, so the
# shortest answer pays the least); `completion_length` in the metrics shows such a collapse.
class OnlineRLSettings(RecipeSettings):
    """Hyperparameters of one GRPO or RLOO run. Defaults suit a tiny LLaVA on CPU; the paper profile overrides."""

    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo",
        description="group-mean baseline (`grpo`) or leave-one-out (`rloo`). The align node sets it from "
        "`align.method`, so a value here is ignored",
    )
    learning_rate: float = Field(
        6e-3, gt=0, description="peak AdamW learning rate, decayed linearly. SPA-VL's PPO used 5e-7 on full weights"
    )
    num_train_epochs: float = Field(1, gt=0, description="passes over the prompts; fractions are allowed")
    per_device_train_batch_size: int = Field(
        16,
        ge=1,
        description="sampled answers per device per optimiser step, as TRL counts them: "
        "per_device_train_batch_size / num_generations prompts, each answered `num_generations` "
        "times; a multiple of `num_generations`",
    )
    num_generations: int = Field(4, ge=2, description="sampled answers per prompt; the baseline comes from this group")
    max_completion_length: int = Field(32, ge=1, description="new tokens sampled per answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the group needs diverse answers")
    beta: float = Field(0.1, ge=0, description="KL coefficient to the reference policy; SPA-VL's PPO used kl 0.1")
    lora: bool = Field(True, description="train a LoRA adapter (`true`), or every weight of the copy (`false`)")
    run_name: str = Field("online_rl", description="name of the nested MLflow run")

    @model_validator(mode="after")
    def _whole_groups(self):
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}): each prompt's answers form one group"
            )
        return self
