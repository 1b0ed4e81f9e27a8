"""The settings of a DPO run (`align.dpo`), read by `training/dpo.py`."""

from __future__ import annotations

import pydantic
from pydantic import Field

from spavl_kedro.training.recipe_config import RecipeSettings, names_lm_head


class DPOSettings(RecipeSettings):
    """Hyperparameters of one DPO run. Defaults are what moved a tiny LLaVA's sampled refusal rate on CPU."""

    beta: float = Field(0.1, gt=0, description="DPO temperature on the log-ratio margin; SPA-VL uses 0.1")
    lora: bool = Field(True, description="train a LoRA adapter; `false` does a full fine-tune of the language model")
    train_projector: bool = Field(
        False,
        description="also train the multi-modal projector (with LoRA, through `modules_to_save`), as the "
        "official code does. The vision tower is never trained",
    )
    learning_rate: float = Field(
        5e-4, gt=0, description="peak AdamW learning rate. SPA-VL: 2e-5 with LoRA, 1e-6 for a full fine-tune"
    )
    num_train_epochs: float = Field(
        2, gt=0, description="passes over the preference pairs; fractions are allowed (TRL's name)"
    )
    per_device_train_batch_size: int = Field(
        8,
        ge=1,
        description="pairs per device per micro-step (TRL's name). The effective batch is "
        "per_device_train_batch_size × gradient_accumulation_steps × processes",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-steps summed into one optimiser step (paper: 1 × 8 GPUs = an effective batch of 8)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name for the decay")
    max_length: int | None = Field(
        None,
        description="token cap per sequence. Keep null for vision data so image tokens are never cut; a cap "
        "below 2 × image tokens + 64 fails (tiny: 96, LLaVA-1.5: 1216)",
    )
    run_name: str = Field("dpo", description="name of the nested MLflow run")

    @pydantic.field_validator("lora_target_modules")
    @classmethod
    def _no_lm_head(cls, value: list[str] | str) -> list[str] | str:
        # TRL computes DPO log-probs from lm_head.weight directly, so an adapter there would never train;
        # it raises deep inside the trainer. Failing here points at the setting instead.
        if names_lm_head(value):
            raise ValueError("lora_target_modules must not include lm_head (TRL DPO cannot train it)")
        return value
