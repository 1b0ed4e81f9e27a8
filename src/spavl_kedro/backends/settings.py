"""Every typed setting the backends take, importable without torch, transformers or TRL.

`spavl_kedro.config` validates the Kedro parameters against these classes once, before a run starts, and a
user's notebook can build and check a recipe on a machine without the training stack. The modules that act
on a setting (tiny.py, factory.py, recipe.py, dpo.py, sft.py, reward.py, online_rl.py) import it from
here; what a field means is said once, in its `Field` description (docs/configuration.md is checked
against them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
BASE = "base"  # the name `align.policy` is evaluated under (`align.bases` add others)


# BackendSpec fields that decide where and how fast a request goes, not what it answers: resumable stages
# leave them out of their shard fingerprints, so a rerun against other servers still resumes.
TRANSPORT_FIELDS = frozenset(
    {"concurrency", "timeout_s", "max_retries", "backoff_s", "base_urls", "api_key", "batch_size"}
)


@dataclass(frozen=True)
class BackendKind:
    """What the configuration, the planners and the checks know about one `kind` of `BackendSpec`; the
    factory's `BUILDERS` (factory.py) holds how a spec of the kind becomes a backend."""

    served: bool  # answers through an OpenAI-compatible endpoint: metered calls, server lanes, endpoint checks
    bootstrapped: bool  # a tiny model the project trains offline: nothing to download or to preflight
    required: dict[str, str] = field(default_factory=dict)  # field -> what it must hold for this kind
    own_fields: tuple[str, ...] = ()  # the fields only this kind reads (set on another kind, they fail)


# Every backend kind, by the name `kind:` takes in configuration. A new kind is a row here, a builder in
# factory.BUILDERS and the backend class it builds (docs/backends.md).
BACKEND_KINDS: dict[str, BackendKind] = {
    "tiny": BackendKind(
        served=False, bootstrapped=True, own_fields=("refusal_rate", "over_refusal_rate", "vague_rate")
    ),
    "transformers": BackendKind(
        served=False,
        bootstrapped=False,
        required={"model": "a directory or hub id"},
        own_fields=("trust_remote_code", "chat_template", "system_sentence", "image_preprocessing"),
    ),
    "openai": BackendKind(
        served=True,
        bootstrapped=False,
        required={"model": "the served model name", "base_urls": "e.g. [http://localhost:8000/v1]"},
        own_fields=("base_urls", "api_key"),
    ),
}


def row_name(table: dict[str, Any], what: str) -> Any:
    """A string type whose value must be a key of `table`; the error names it as `what` and lists the keys."""

    def check(name: str) -> str:
        if name not in table:
            raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
        return name

    return Annotated[str, AfterValidator(check)]


BackendKindName = row_name(BACKEND_KINDS, "backend kind")


class Strict(BaseModel):
    """A settings block whose misspelt key fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class InputFormat(BaseModel):
    """How a locally run model is prompted and fed images: the same for generation, every trainer's encoding, the
    reward model and evaluation, since all of them read the processor these settings make
    (`backends.vlm.as_configured`), and a policy's processor is saved with it."""

    model_config = ConfigDict(extra="forbid")

    chat_template: str | None = Field(
        None,
        description="a Jinja chat-template file that replaces the model's own, for a model whose authors' "
        "format is not in its checkpoint (conf/paper: LLaVA's `conv_vicuna_v1`, "
        "`conf/paper/templates/llava_conv_vicuna_v1.jinja`); null: the model's own chat template",
    )
    system_sentence: str | None = Field(
        None,
        description="a sentence every conversation begins with, through the chat template in use (null: none "
        "added; `backends.vlm.with_system_sentence`). For a template that writes no system turn, as "
        "llava-hf's, which leaves out LLaVA's `conv_vicuna_v1` sentence (llava/conversation.py, "
        "github.com/haotian-liu/LLaVA)",
    )
    image_preprocessing: Literal["default", "pad"] = Field(
        "default",
        description="`default`: the checkpoint's image processor (llava-hf's LLaVA-1.5: resize, then "
        "centre-crop); `pad`: pad to a square in the processor's mean colour first, as "
        "LLaVA's `--image_aspect_ratio pad` (`expand2square`, github.com/haotian-liu/LLaVA), "
        "with which LLaVA-1.5 was trained (`backends.vlm.pad_images_to_square`; families whose "
        "row has `pads_to_square`)",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"chat_template {path!r} is not a file (paths are relative to the project root)")
        return path

    def describe(self) -> str:
        """The prompt format and image preprocessing in words, for reports and summaries."""
        prompt = f"the chat template in {self.chat_template}" if self.chat_template else "the model's own chat template"
        if self.system_sentence is not None:
            prompt += f', each conversation opened by the system sentence "{self.system_sentence}"'
        elif not self.chat_template:
            prompt += ", no system sentence"
        images = (
            "padded to a square in the image processor's mean colour, then resized (LLaVA's `pad`)"
            if self.image_preprocessing == "pad"
            else "as the checkpoint's image processor prepares them"
        )
        return f"{prompt}; images {images}"


class BackendSpec(InputFormat):
    # The name is also a shard folder and part of MLflow metric names: letters, digits, '_', '.', '-' only.
    name: str = Field(
        pattern=NAME_PATTERN,
        description="a unique name; it is the `responder` (or writer, teacher, "
        "judge) column, a shard folder and part of MLflow metric names",
    )
    kind: BackendKindName = Field(
        description="a row of `backends/settings.py: BACKEND_KINDS`. `tiny`: a tiny LLaVA built offline; `transformers`: a local directory or hub id; `openai`: an "
        "OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, `transformers serve`, a hosted "
        "API)"
    )
    refusal_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="`tiny` only, and required there: the share of harmful requests the model is "
        "bootstrapped to refuse (or redirect safely)",
    )
    over_refusal_rate: float = Field(
        0.0, ge=0, le=1, description="`tiny` only: the share of harmless requests it is taught to refuse"
    )
    vague_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="`tiny` only: the share of answered harmless requests it "
        "answers vaguely, naming nothing in the image (a less "
        "helpful responder)",
    )
    model: str | None = Field(
        None, description="`transformers`: a directory or hub id; `openai`: the served model name. Required for both"
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="`transformers` only: `from_pretrained` keyword arguments "
        "(`dtype`, `device_map`). Unset, an answering model goes to the "
        "GPUs (`device_map: auto`) when there are any, else to the CPU in "
        "float32",
    )
    trust_remote_code: bool = Field(
        False,
        description="`transformers` only: run the model repository's own Python "
        "(processor and model); leave it off unless a model needs it "
        "and you trust it. Weights are always safetensors, and "
        "`load_kwargs` may not set either",
    )
    base_urls: list[str] = Field(
        default_factory=list,
        description="`openai` only, and required there: one or more `.../v1` roots. Requests are spread over them",
    )
    api_key: str | None = Field(
        None,
        description="`openai` only: the **name** of a key under `inference_endpoints` in "
        "`conf/local/credentials.yml` (or `SPAVL_KEY_<NAME>`), never the key "
        "itself",
    )
    concurrency: int = Field(8, ge=1, description="`openai` only: requests in flight at once, over all `base_urls`")
    timeout_s: float = Field(120.0, gt=0, description="`openai` only: per-request timeout in seconds")
    max_retries: int = Field(
        4, ge=0, description="`openai` only: retries on 429, 5xx, a timeout or cut-off JSON, with exponential backoff"
    )
    backoff_s: float = Field(
        1.0,
        gt=0,
        description="`openai` only: the first retry's wait in seconds, doubling each "
        "time with jitter; a server's Retry-After wins",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="`tiny` and `transformers`: prompts per `generate()` call; null means `generate.batch_size`",
    )
    generation: dict[str, Any] = Field(
        default_factory=dict,
        description="this model's `generate()` keyword arguments, applied over "
        "`generate.generation`. Every kind uses transformers' names; for `openai` "
        "they become request fields (`max_new_tokens` → `max_tokens`, `do_sample: "
        "false` → temperature 0), and a key with no equivalent fails at start-up",
    )

    @model_validator(mode="after")
    def _kind_fields(self):
        where = f"'{self.name}' (kind {self.kind})"
        for name, meaning in BACKEND_KINDS[self.kind].required.items():
            if not getattr(self, name):
                raise ValueError(f"{where} needs {name} ({meaning})")
        for other, kind in BACKEND_KINDS.items():
            for name in kind.own_fields if other != self.kind else ():
                if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                    raise ValueError(f"{where}: {name} is for kind '{other}' only")
        if {"trust_remote_code", "use_safetensors"} & set(self.load_kwargs):
            raise ValueError(
                f"{where}: load_kwargs must not set trust_remote_code or use_safetensors (weights are "
                "always safetensors; remote code is the spec's trust_remote_code field)"
            )
        return self

    @property
    def served(self) -> bool:
        """Whether it answers through an endpoint (`BACKEND_KINDS`): its calls are metered."""
        return BACKEND_KINDS[self.kind].served

    @property
    def bootstrapped(self) -> bool:
        """Whether it is a tiny model this project trains offline (`BACKEND_KINDS`)."""
        return BACKEND_KINDS[self.kind].bootstrapped

    def behaviour(self) -> Behaviour:
        """What a tiny responder is bootstrapped to do."""
        if self.refusal_rate is None:
            raise ValueError(f"'{self.name}' (kind tiny) needs refusal_rate to be bootstrapped as a responder")
        return Behaviour(
            refusal_rate=self.refusal_rate, over_refusal_rate=self.over_refusal_rate, vague_rate=self.vague_rate
        )


class TinyModelConfig(BaseModel):
    """Sizes of a tiny LLaVA. Defaults: ~0.9M parameters, trains at several steps/s on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    vocab_size: int = Field(1024, description="BPE vocabulary size, learned from the seed text")
    text_hidden: int = Field(128, description="width of the Llama language model")
    text_layers: int = Field(4, description="transformer layers of the language model")
    text_heads: int = Field(4, description="attention heads of the language model")
    vision_hidden: int = Field(64, description="width of the CLIP vision tower")
    vision_layers: int = Field(2, description="transformer layers of the vision tower")
    image_size: int = Field(32, description="pixels per side after the image processor")
    patch_size: int = Field(8, description="ViT patch size: (32/8)² = 16 image tokens per image")
    max_positions: int = Field(512, description="the longest sequence the model can see")
    layout: Literal["tiny", "llava-1.5"] = Field(
        "tiny",
        description="`tiny`: a byte-level BPE tokenizer and the project's chat template. `llava-1.5`: the "
        "formats of `llava-hf/llava-1.5-7b-hf`, that is a SentencePiece BPE tokenizer that adds "
        "BOS, llava-hf's own chat template, and image features from the tower's second-to-last "
        "layer (`vision_feature_layer -2`). `make smoke` and the format tests use it at 336 px "
        "with 14-px patches (576 image tokens)",
    )

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
    refusal_rate: float = Field(
        0.5, ge=0, le=1, description="share of harmful seed requests refused (an unaligned VLM's: the base policy's)"
    )
    over_refusal_rate: float = Field(0.1, ge=0, le=1, description="share of harmless seed requests refused")
    vague_rate: float = Field(0.2, ge=0, le=1, description="share of answered harmless requests answered vaguely")
    group_by_length: bool = Field(
        False,
        description="as `tiny.bootstrap.group_by_length`, for the foundation: off, "
        "because batches made only of capability questions taught them "
        "worse (measured in single runs; see the YAML comment)",
    )


class BootstrapConfig(BaseModel):
    """A short fine-tune of the language model and projector that gives a tiny model its own behaviour."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    epochs: int = Field(8, ge=1, description="passes over the seed examples; the labels are re-drawn on each pass")
    lr: float = Field(
        3e-3,
        gt=0,
        description="AdamW learning rate (the foundation's too), high because the models are tiny and start from noise",
    )
    batch_size: int = Field(16, ge=1, description="examples per optimisation step")
    seed: int = Field(
        0,
        description="seeds weight init, label draws and batch order of the tiny responders and guards "
        "(the n-th of each, counting from 0, uses seed + 101·(n+1), guards seed + "
        "307·(n+1); see [Seeds](#seeds)). The base policy uses `align.policy.seed` "
        "instead",
    )
    train_vision: bool = Field(
        False,
        description="also train the vision tower in the foundation and every bootstrap "
        "(LLaVA keeps its CLIP tower frozen in both of its training stages)",
    )
    group_by_length: bool = Field(
        True,
        description="batch rows of similar prompt length together (transformers' "
        "option of the same name): less padding, ~15% faster on 2 cores",
    )


class VisionPretrainConfig(BaseModel):
    """Pretraining of the tiny vision tower before any language training, standing in for the CLIP
    pretraining LLaVA's tower comes with: from the pooled patch features, predict which words an image's
    caption contains."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails instead of being ignored

    steps: int = Field(300, ge=0, description="optimisation steps; `0` leaves the tower random")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(64, ge=1, description="images per step")


class Behaviour(BaseModel):
    """How often a tiny model declines and how well it answers: one responder's character."""

    model_config = ConfigDict(extra="forbid")

    refusal_rate: float = Field(ge=0, le=1, description="share of harmful requests refused")
    over_refusal_rate: float = Field(0.0, ge=0, le=1, description="share of harmless requests refused")
    vague_rate: float = Field(0.0, ge=0, le=1, description="share of answered harmless requests answered vaguely")


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
        if _names_lm_head(value):
            raise ValueError("lora_target_modules must not include lm_head (TRL DPO cannot train it)")
        return value


def _names_lm_head(value: list[str] | str) -> bool:
    names = [value] if isinstance(value, str) else value
    return any(name == "lm_head" or name.endswith(".lm_head") for name in names)


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
        if _names_lm_head(value):
            raise ValueError(
                "lora_target_modules must not include lm_head: the reward model scores from the last "
                "hidden state and never runs the LM head"
            )
        return value


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
