"""Every typed setting the backends take, importable without torch, transformers or TRL.

`spavl_kedro.config` validates the Kedro parameters against these classes once, before a run starts, and a
user's notebook can build and check a recipe on a machine without the training stack. The modules that act
on a setting (tiny.py, factory.py, recipe.py, dpo.py, sft.py, reward.py, online_rl.py) import it from
here; what a field means is said once, in its `Field` description (docs/configuration.md is checked
against them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # annotations only: importing these would pull in torch
    import random

    import torch

    from spavl_kedro.backends.tiny import EncodedSeed


NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"


# BackendSpec fields that decide where and how fast a request goes, not what it answers: resumable stages
# leave them out of their shard fingerprints, so a rerun against other servers still resumes.
TRANSPORT_FIELDS = frozenset({"concurrency", "timeout_s", "max_retries", "backoff_s", "base_urls", "api_key",
                              "batch_size"})


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The name is also a shard folder and part of MLflow metric names: letters, digits, '_', '.', '-' only.
    name: str = Field(pattern=NAME_PATTERN, description="unique name; the `responder` (or `writer`, `teacher`) column")
    kind: Literal["tiny", "transformers", "openai"] = Field(
        description="tiny: built offline; transformers: local directory or hub id; openai: chat-completions endpoint")
    refusal_rate: float | None = Field(None, ge=0, le=1, description="tiny responder: share of harmful requests it "
                                                                      "is taught to refuse")
    over_refusal_rate: float = Field(0.0, ge=0, le=1, description="tiny responder: share of harmless requests it "
                                                                   "is taught to refuse")
    vague_rate: float = Field(0.0, ge=0, le=1, description="tiny responder: share of answered harmless requests it "
                                                            "answers vaguely (names nothing in the image)")
    model: str | None = Field(None, description="transformers: directory or hub id; openai: the served model name")
    load_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="transformers only: from_pretrained kwargs (dtype, device_map); "
                                                    "unset, an answering model goes to the GPUs (device_map "
                                                    "auto) when there are any, else to the CPU in float32")
    trust_remote_code: bool = Field(False, description="transformers only: run the model repository's own Python "
                                                       "(off unless a model needs it and you trust it)")
    base_urls: list[str] = Field(default_factory=list,
                                 description="openai only: one or more .../v1 URLs; requests are spread over them")
    api_key: str | None = Field(None, description="openai only: NAME of a key in conf/local/credentials.yml, never the key")
    concurrency: int = Field(8, ge=1, description="openai only: requests in flight at once (over all base_urls)")
    timeout_s: float = Field(120.0, gt=0, description="openai only: per-request timeout")
    max_retries: int = Field(4, ge=0, description="openai only: retries on 429 / 5xx / timeout / cut-off JSON")
    backoff_s: float = Field(1.0, gt=0, description="openai only: first retry wait, doubling each time (with jitter; "
                                                    "a server's Retry-After wins)")
    batch_size: int | None = Field(None, ge=1, description="tiny/transformers: prompts per generate() call")
    generation: dict[str, Any] = Field(default_factory=dict, description="generation kwargs for this model")

    @model_validator(mode="after")
    def _kind_fields(self):
        where = f"'{self.name}' (kind {self.kind})"
        if self.kind in ("transformers", "openai") and not self.model:
            raise ValueError(f"{where} needs model ({'a directory or hub id' if self.kind == 'transformers' else 'the served model name'})")
        if self.kind == "openai" and not self.base_urls:
            raise ValueError(f"{where} needs base_urls (e.g. [http://localhost:8000/v1])")
        if self.kind != "openai" and (self.base_urls or self.api_key):
            raise ValueError(f"{where}: base_urls and api_key are for kind 'openai' only")
        if self.kind != "transformers" and self.trust_remote_code:
            raise ValueError(f"{where}: trust_remote_code is for kind 'transformers' only")
        if {"trust_remote_code", "use_safetensors"} & set(self.load_kwargs):
            raise ValueError(f"{where}: load_kwargs must not set trust_remote_code or use_safetensors (weights are "
                             "always safetensors; remote code is the spec's trust_remote_code field)")
        if self.kind != "tiny" and (self.refusal_rate is not None or self.over_refusal_rate or self.vague_rate):
            raise ValueError(f"{where}: refusal_rate, over_refusal_rate and vague_rate are for kind 'tiny' only")
        return self

    def behaviour(self) -> Behaviour:
        """What a tiny responder is bootstrapped to do."""
        if self.refusal_rate is None:
            raise ValueError(f"'{self.name}' (kind tiny) needs refusal_rate to be bootstrapped as a responder")
        return Behaviour(refusal_rate=self.refusal_rate, over_refusal_rate=self.over_refusal_rate,
                         vague_rate=self.vague_rate)


class TinyModelConfig(BaseModel):
    """Sizes of a tiny LLaVA. Defaults: ~0.9M parameters, trains at several steps/s on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    vocab_size: int = Field(1024, description="BPE vocabulary size learned from the seed text")
    text_hidden: int = Field(128, description="width of the Llama language model")
    text_layers: int = Field(4, description="transformer layers of the language model")
    text_heads: int = Field(4, description="attention heads of the language model")
    vision_hidden: int = Field(64, description="width of the CLIP vision tower")
    vision_layers: int = Field(2, description="transformer layers of the vision tower")
    image_size: int = Field(32, description="pixels per side after the image processor")
    patch_size: int = Field(8, description="ViT patch size; (32/8)^2 = 16 image tokens per image")
    max_positions: int = Field(512, description="longest sequence the model can see")
    layout: Literal["tiny", "llava-1.5"] = Field(
        "tiny", description="tiny: byte-level BPE and the project's chat template; llava-1.5: the formats of "
                            "llava-hf/llava-1.5-7b-hf (SentencePiece BPE with BOS, its own chat template, image "
                            "features from the tower's second-to-last layer)")

    @property
    def vision_feature_layer(self) -> int:
        """LLaVA-1.5 reads the CLIP tower's second-to-last layer (llava-hf config: vision_feature_layer -2)."""
        return -2 if self.layout == "llava-1.5" else -1


class FoundationConfig(BaseModel):
    """The shared tiny base every tiny model starts from, as real VLM families share a pretrained base.

    It learns the world once (what a harmful request is, how to answer a harmless one from the image, the
    answer forms) under a mixed behaviour; each model's own short bootstrap then only moves its rates.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    epochs: int = Field(5, ge=1, description="passes over the seed corpus")
    refusal_rate: float = Field(0.5, ge=0, le=1, description="share of harmful seed requests refused")
    over_refusal_rate: float = Field(0.1, ge=0, le=1, description="share of harmless seed requests refused")
    vague_rate: float = Field(0.2, ge=0, le=1, description="share of answered harmless requests answered vaguely")
    group_by_length: bool = Field(False, description="as tiny.bootstrap.group_by_length, for the foundation")


class BootstrapConfig(BaseModel):
    """A short fine-tune of the language model and projector that gives a tiny model its own behaviour."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    epochs: int = Field(8, ge=1, description="passes over the seed examples; labels are re-drawn each pass")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate; high because the model starts from noise")
    batch_size: int = Field(16, ge=1, description="examples per optimisation step")
    seed: int = Field(0, description="seeds weight init, label draws and batch order")
    train_vision: bool = Field(False, description="also train the vision tower (LLaVA keeps its CLIP tower "
                                                  "frozen in both of its training stages)")
    group_by_length: bool = Field(True, description="batch rows of similar length together (transformers' "
                                                    "option of that name): less padding, ~15% faster")


class VisionPretrainConfig(BaseModel):
    """Pretraining of the tiny vision tower before any language training, standing in for the CLIP
    pretraining LLaVA's tower comes with: from the pooled patch features, predict which words an image's
    caption contains."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    steps: int = Field(300, ge=0, description="optimisation steps (0: the tower keeps its random weights)")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(64, ge=1, description="images per step")


class Behaviour(BaseModel):
    """How often a tiny model declines and how well it answers: one responder's character."""

    model_config = ConfigDict(extra="forbid")

    refusal_rate: float = Field(ge=0, le=1, description="share of harmful requests refused")
    over_refusal_rate: float = Field(0.0, ge=0, le=1, description="share of harmless requests refused")
    vague_rate: float = Field(0.0, ge=0, le=1, description="share of answered harmless requests answered vaguely")

    def target(self, example: EncodedSeed, rng: random.Random) -> torch.Tensor:
        if example.harmful:
            return example.refusal if rng.random() < self.refusal_rate else example.answer
        if rng.random() < self.over_refusal_rate:
            return example.refusal
        return example.vague if example.vague is not None and rng.random() < self.vague_rate else example.answer


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

    lora_r: int = Field(16, ge=1, description="rank of the LoRA update matrices (lora=True only)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator; the update is scaled by alpha/r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input path")
    lora_target_modules: list[str] | str = Field(
        LANGUAGE_MLP, description="module names, a full-match regex, or 'all-linear'; the vision tower never"
    )
    seed: int = Field(0, description="seeds adapter init, data order, dropout and sampling")
    logging_steps: int = Field(1, ge=1, description="optimiser steps averaged into one logged curve point")
    report_to: list[str] = Field(["mlflow"], description="loggers; 'mlflow' logs to a nested run")
    run_name: str = Field(description="name of the nested MLflow run")
    output_dir: str = Field(description="scratch directory for trainer state; nothing is saved there")
    use_cpu: bool | None = Field(
        None, description="None: a CUDA GPU when visible (bf16 if supported), else CPU fp32; true: always CPU"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of keeping them: less memory, "
                           "more compute (transformers' name; gradient_checkpointing is its deprecated alias)"
    )
    weights_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the weights the trainer holds and AdamW updates: float32 master weights "
                               "under bf16 autocast, or bfloat16 chosen deliberately (half the memory, coarser "
                               "updates). Never float16: a half-precision checkpoint is cast to this first"
    )
    checkpoint_steps: int = Field(
        0, ge=0, description="save a resumable checkpoint (weights, optimiser, schedule, RNG) every this many "
                             "optimiser steps, keeping the latest two; a rerun of the same run resumes from the "
                             "latest. 0: no checkpoints")
    checkpoint_dir: str | None = Field(
        None, description="where checkpoints go; the align node sets it to align.checkpoint_dir/<artifact name>")
    trl_args: dict[str, Any] = Field(
        default_factory=dict, description="further arguments of the TRL trainer's config class (DPOConfig, SFTConfig, "
                                          "GRPOConfig, RLOOConfig) under TRL's own names, passed as they are: checked "
                                          "against the class, and refused where a field of the recipe sets them "
                                          "(e.g. GRPO's use_vllm, vllm_mode, vllm_server_base_url)")

    @pydantic.model_validator(mode="after")
    def _checkpoints_have_a_place(self):
        if self.checkpoint_steps and not self.checkpoint_dir:
            raise ValueError("checkpoint_steps is set but checkpoint_dir is not: say where checkpoints go")
        return self


class DPOSettings(RecipeSettings):
    """Hyperparameters of one DPO run. Defaults are what moved a tiny LLaVA's sampled refusal rate on CPU."""

    beta: float = Field(0.1, gt=0, description="DPO temperature on the log-ratio margin; SPA-VL uses 0.1")
    lora: bool = Field(True, description="train a LoRA adapter; false: full fine-tune of the language model")
    train_projector: bool = Field(
        False, description="train the multi-modal projector too (LoRA: via modules_to_save); the vision tower never"
    )
    learning_rate: float = Field(
        5e-4, gt=0, description="peak AdamW learning rate; SPA-VL: 2e-5 LoRA, 1e-6 full (full FT wants far less)"
    )
    num_train_epochs: float = Field(2, gt=0, description="passes over the preference pairs (fractions allowed)")
    per_device_train_batch_size: int = Field(8, ge=1, description="pairs per device per optimisation micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps summed into one optimiser step")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name for the decay")
    max_length: int | None = Field(
        None, description="token cap per sequence; keep None for vision data so image tokens are never cut"
    )
    run_name: str = Field("dpo", description="name of the nested MLflow run")

    @pydantic.field_validator("lora_target_modules")
    @classmethod
    def _no_lm_head(cls, value: list[str] | str) -> list[str] | str:
        # TRL computes DPO log-probs from lm_head.weight directly, so an adapter there would never train;
        # it raises deep inside the trainer. Failing here points at the setting instead.
        names = [value] if isinstance(value, str) else value
        if any(name == "lm_head" or name.endswith(".lm_head") for name in names):
            raise ValueError("lora_target_modules must not include lm_head (TRL DPO cannot train it)")
        return value


class SFTSettings(RecipeSettings):
    """Hyperparameters of one SFT run. Defaults moved a bootstrapped tiny LLaVA's loss on CPU in seconds."""

    learning_rate: float = Field(2e-3, gt=0, description="peak AdamW learning rate (linear decay to zero)")
    num_train_epochs: float = Field(3, gt=0, description="passes over the examples (fractions allowed)")
    per_device_train_batch_size: int = Field(8, ge=1, description="examples per device per optimisation micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps summed into one optimiser step")
    lora: bool = Field(False, description="train a LoRA adapter (True) or fine-tune every weight (False)")
    train_projector: bool = Field(
        True, description="full fine-tune: the multimodal projector trains with the language model (LLaVA's "
                          "instruction tuning); False keeps it frozen with the vision tower")
    max_length: int | None = Field(
        None, description="token cap per sequence; keep None for vision data so image tokens are never cut"
    )
    run_name: str = Field("sft", description="name of the nested MLflow run")


class RewardSettings(RecipeSettings):
    """Hyperparameters of one reward-model run. Defaults separate refusals from compliances on a tiny LLaVA."""

    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate (linear decay to zero)")
    num_train_epochs: int = Field(3, ge=1, description="passes over the preference pairs")
    per_device_train_batch_size: int = Field(
        8, ge=1, description="pairs per process per optimisation step (each pair is two sequences)")
    lora: bool = Field(False, description="train a LoRA adapter plus the head (True) or every weight (False)")
    run_name: str = Field("reward", description="name of the nested MLflow run")
    output_dir: str | None = Field(
        None, description="unused by the plain loop (checkpoints go to checkpoint_dir); kept so recipes match the others"
    )

    @pydantic.field_validator("trl_args")
    @classmethod
    def _not_a_trl_trainer(cls, value: dict) -> dict:
        if value:
            raise ValueError("the reward model trains in its own loop, not a TRL trainer: trl_args does not apply")
        return value


# Defaults measured on a tiny LLaVA bootstrapped to refuse ~30% of the time, keyword-judge reward (refusal = 1),
# 16 steps of 4 prompts x 4 answers x 16 tokens, beta 0.1: LoRA on the language MLPs at lr 6e-3 took the reward
# from 0.33 to 0.77 (GRPO) and 0.34 to 0.69 (RLOO); lr 3e-3 gained about half as much. Full weights at lr 1e-3:
# GRPO 0.27 -> 0.69, but RLOO collapsed onto empty answers (its KL penalty is summed over the sequence, so the
# shortest answer pays the least); `completion_length` in the metrics shows such a collapse.
class OnlineRLSettings(RecipeSettings):
    """Hyperparameters of one GRPO or RLOO run. Defaults suit a tiny LLaVA on CPU; the paper profile overrides."""

    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="group-mean baseline (grpo) or leave-one-out (rloo)")
    learning_rate: float = Field(
        6e-3, gt=0, description="peak AdamW learning rate, decayed linearly; SPA-VL's PPO: 5e-7 on full weights"
    )
    num_train_epochs: float = Field(1, gt=0, description="passes over the prompts (fractions allowed)")
    per_device_train_batch_size: int = Field(
        16, ge=1, description="sampled answers per device per optimiser step, as TRL counts them: (per_device_train_batch_size / num_generations) prompts, each answered num_generations times; a multiple of "
                           "num_generations")
    num_generations: int = Field(4, ge=2, description="sampled answers per prompt; the baseline comes from this group")
    max_completion_length: int = Field(32, ge=1, description="new tokens sampled per answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the group needs diverse answers")
    beta: float = Field(0.1, ge=0, description="KL coefficient to the reference policy; SPA-VL's PPO used kl 0.1")
    lora: bool = Field(True, description="train a LoRA adapter (True) or every weight of the copy (False)")
    run_name: str = Field("online_rl", description="name of the nested MLflow run")

    @model_validator(mode="after")
    def _whole_groups(self):
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                             f"num_generations ({self.num_generations}): each prompt's answers form one group")
        return self
