"""The settings of an SFT run (`align.sft`), read by `training/sft.py`."""

from __future__ import annotations

from pydantic import Field

from spavl_kedro.training.recipe_config import RecipeSettings


class SFTSettings(RecipeSettings):
    """Hyperparameters of one SFT run. Defaults moved a bootstrapped tiny LLaVA's loss on CPU in seconds."""

    learning_rate: float = Field(2e-3, gt=0, description="peak AdamW learning rate, with linear decay to zero")
    num_train_epochs: float = Field(3, gt=0, description="passes over the examples; fractions are allowed")
    per_device_train_batch_size: int = Field(8, ge=1, description="examples per device per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps summed into one optimiser step")
    lora: bool = Field(False, description="train a LoRA adapter (`true`) or fine-tune every weight (`false`)")
    train_projector: bool = Field(
        True,
        description="full fine-tune: the multimodal projector trains with the language model (LLaVA's "
        "instruction tuning); `false` freezes it with the vision tower (which never trains)",
    )
    max_length: int | None = Field(
        None, description="token cap per sequence; keep null for vision data (same check as `align.dpo.max_length`)"
    )
    run_name: str = Field("sft", description="name of the nested MLflow run")
