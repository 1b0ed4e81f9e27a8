"""The fields every training recipe has (`RecipeSettings`); each method's settings class extends it in
`<method>_config.py`, beside its trainer, and imports no torch."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

# Default LoRA placement: the MLP projections of the language model only (Llama module names, so the same
# pattern fits LLaVA-1.5). Measured on a tiny LLaVA bootstrapped to refuse 30% of the time, 250 pairs:
# adapters on every linear layer at lr 1e-3 won the DPO margin by wrecking the text (no well-formed sample
# left, sampled refusals fell); every-linear at lower lr traded refusals against broken outputs. Language
# MLPs only at lr 5e-4 took the sampled refusal rate from ~0.35 to ~0.8 and greedy from 0 to 1, with
# ~3 in 4 samples still well-formed.
LANGUAGE_MLP = r".*language_model.*\.(gate_proj|up_proj|down_proj)"


class RecipeSettings(pydantic.BaseModel):
    """Fields every training recipe has; the trainers' settings classes extend it. A misspelt key fails."""

    model_config = pydantic.ConfigDict(extra="forbid")

    lora_r: int = Field(16, ge=1, description="rank of the LoRA update matrices (used only with `lora: true`)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator; the update is scaled by alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input path")
    lora_target_modules: list[str] | str = Field(
        LANGUAGE_MLP,
        description="module names, a full-match regex, or `all-linear`. The default is the language "
        "model's MLP (Llama names, which fit LLaVA-1.5). The vision tower never gets an "
        "adapter",
    )
    seed: int = Field(0, description="seeds adapter init, data order, dropout and sampling")
    logging_steps: int = Field(1, ge=1, description="optimiser steps averaged into one logged curve point")
    report_to: list[str] = Field(
        ["mlflow"],
        description="the loggers handed to the trainer; `mlflow` logs the curves to a nested run of the Kedro run",
    )
    run_name: str = Field(description="name of the nested MLflow run")
    artifact_name: str | None = Field(
        None,
        description="the name the trained model is saved and evaluated under (`align.name`, or the method). "
        "The align node sets it and tags the nested MLflow run with it (`spavl.model`), so the evaluation "
        "runs of that model link back to the run that trained it",
        json_schema_extra={"doc_base": "set by the align node"},
    )
    output_dir: str = Field(
        description="the trainer's scratch directory. The align node sets a temporary one, so a value here is ignored",
        json_schema_extra={"doc_base": "set by the align node"},
    )  # the base cell of the configuration reference
    use_cpu: bool | None = Field(
        None,
        description="null trains on a CUDA GPU when one is visible (bf16 where supported), else on the CPU in "
        "fp32. `true` always uses the CPU; `false` without a GPU fails when training starts",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass instead of keeping them: less GPU memory for "
        "more compute (transformers' name; `gradient_checkpointing` is its deprecated alias). TRL "
        "would turn it on by default, which only slows small models. `align_summary` records "
        "whether the trainer used it",
    )
    weights_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the dtype of the weights the trainer holds and AdamW updates. The trainer casts its "
        "copy of the policy to it, so a checkpoint saved in float16 (llava-hf's are) never "
        "trains in float16; `float32` keeps fp32 master weights under bf16 autocast on a GPU, "
        "`bfloat16` halves the memory and coarsens the updates. `optimiser_dtypes` in "
        "`align_summary` says what was updated",
    )
    checkpoint_steps: int = Field(
        0,
        ge=0,
        description="save a resumable checkpoint (weights, optimiser, schedule, RNG state) every this many "
        "optimiser steps, keeping the latest two. A rerun of the same run (same recipe, data and "
        "starting weights) resumes from the latest; a finished run deletes its checkpoints. `0`: "
        "none ([align.md](align.md#checkpoints-and-resuming))",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="where the checkpoints go; the align node sets it to `align.checkpoint_dir/<artifact name>` "
        "unless the recipe sets it",
    )
    trl_args: dict[str, Any] = Field(
        default_factory=dict,
        description="further arguments of the recipe's TRL config class (`DPOConfig`, "
        "`SFTConfig`, `GRPOConfig`, `RLOOConfig`) under TRL's own names, passed as "
        "they are. A name the class lacks, or one a recipe field already sets, fails "
        "before training ([backends.md](backends.md#fast-engines-at-paper-scale))",
    )

    @pydantic.model_validator(mode="after")
    def _checkpoints_have_a_place(self):
        if self.checkpoint_steps and not self.checkpoint_dir:
            raise ValueError("checkpoint_steps is set but checkpoint_dir is not: say where checkpoints go")
        return self


def names_lm_head(value: list[str] | str) -> bool:
    names = [value] if isinstance(value, str) else value
    return any(name == "lm_head" or name.endswith(".lm_head") for name in names)
