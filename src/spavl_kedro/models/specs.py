"""What configuration says about a model: the backend kinds (`BACKEND_KINDS`), a backend's spec and input
format, and the tiny models' sizes and training; importable without torch, transformers or TRL.

`spavl_kedro.config` checks the Kedro parameters against these classes before a run starts; what a field
means is said once, in its `Field` description (docs/configuration.md is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spavl_kedro.blocks import NAME_PATTERN, row_name

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


BackendKindName = row_name(BACKEND_KINDS, "backend kind")


class InputFormat(BaseModel):
    """How a locally run model is prompted and fed images: the same for generation, every trainer's encoding, the
    reward model and evaluation, since all of them read the processor these settings make
    (`models.vlm.as_configured`), and a policy's processor is saved with it."""

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
        "added; `models.vlm.with_system_sentence`). For a template that writes no system turn, as "
        "llava-hf's, which leaves out LLaVA's `conv_vicuna_v1` sentence (llava/conversation.py, "
        "github.com/haotian-liu/LLaVA)",
    )
    image_preprocessing: Literal["default", "pad"] = Field(
        "default",
        description="`default`: the checkpoint's image processor (llava-hf's LLaVA-1.5: resize, then "
        "centre-crop); `pad`: pad to a square in the processor's mean colour first, as "
        "LLaVA's `--image_aspect_ratio pad` (`expand2square`, github.com/haotian-liu/LLaVA), "
        "with which LLaVA-1.5 was trained (`models.vlm.pad_images_to_square`; families whose "
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
        description="a row of `models/specs.py: BACKEND_KINDS`. `tiny`: a tiny LLaVA built offline; `transformers`: a local directory or hub id; `openai`: an "
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
