"""What each alignment method will need in GPU memory, host RAM and disk, estimated before anything loads.

The policy is built from its config.json on PyTorch's meta device (no weights read), and the trainers' own
choices are applied to it: `freeze_for_full_finetune` for DPO and SFT, and for the reward model its frozen
LM head and (with `freeze_vision_tower`) tower, PEFT's `get_peft_model` with the recipe's `lora_config` for LoRA. So the trainable count is the one the run will have, not a rule of thumb.

Per GPU, for a method on N processes with ZeRO stage z (0 for DDP):
- weights: every parameter in `weights_dtype` (4 bytes in float32, 2 in bfloat16), divided by N under ZeRO-3;
- reference: a second copy of the weights for DPO's full fine-tune and GRPO/RLOO's with beta > 0;
- gradients: one per trainable parameter in `weights_dtype`, divided by N from ZeRO-2 on;
- DDP gradient buckets: under plain DDP on several processes, PyTorch's reducer keeps its own flat copy of
  every trainable gradient for the all-reduce (`gradient_as_bucket_view` is off in transformers' Trainer),
  one more gradient's worth of memory;
- optimiser: AdamW's two moments per trainable parameter in `weights_dtype`, divided by N from ZeRO-1 on
  (the ZeRO paper's partitioning: Rajbhandari et al. 2020, arXiv:1910.02054);
- activations: per sequence and layer ~34 x sequence x hidden bytes in bf16 (Korthikanti et al. 2022,
  arXiv:2205.05198, without the attention-score term that fused attention does not store); with
  activation checkpointing only each layer's 2-byte input plus one layer's full set. Sequences per
  micro-batch: 2 x batch for DPO and the reward model (chosen and rejected), batch x num_generations for
  GRPO/RLOO, batch for SFT; each is the image tokens plus a 128-token question plus the answer
  (`max_completion_length`, or 512);
- logits: the language-model head's output in fp32 for every token of every sequence of a micro-batch, and
  the log-softmax the loss takes of it (two vocabulary-wide fp32 tensors per token; 32,064 for LLaVA-1.5);
- reward model (GRPO / RLOO with `align.rl.model_weight` > 0): a second whole model in bf16 on each rank,
  scoring the sampled answers;
- 1 GiB for the CUDA context and allocator slack.

Host RAM: every launched rank loads the checkpoint on the CPU (its saved dtype) and makes its training copy
there before the trainer moves it, and reads the training records (images included) into memory, so
ranks x (checkpoint + copy + records) bytes at the peak. Disk: the two checkpoints kept (trainable weights
with their optimiser state, plus the frozen weights for a full fine-tune). Temp space (the system's temp
folder): under a launch, the policy written once for the ranks to read, the records as a parquet file, and
for GRPO / RLOO the reward model.

These are estimates: they leave out fragmentation and framework buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30
CONTEXT_BYTES = GIB  # CUDA context and allocator slack
QUESTION_TOKENS = 128
ANSWER_TOKENS = 512
ACTIVATION_BYTES_PER_TOKEN_LAYER = 34  # x hidden; bf16, Korthikanti et al. 2022 without attention scores
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the policy, read from its config."""

    total: int  # parameters
    trainable_full: dict[str, int]  # method -> trainable parameters in a full fine-tune
    trainable_lora: dict[str, int]  # method -> trainable parameters with the recipe's LoRA
    hidden: int
    layers: int
    image_tokens: int
    checkpoint_bytes: int  # bytes per parameter as saved (llava-hf: float16)
    vocab: int = 0  # the language model's vocabulary (the logits' width)


@dataclass(frozen=True)
class Estimate:
    gpu_bytes: int
    parts: dict[str, int]  # weights, reference, gradients, ddp_buckets, optimiser, activations, logits,
    #                        reward_model, context
    host_bytes: int
    disk_bytes: int
    temp_bytes: int = 0


def model_shape(model: str, recipes: dict[str, object]) -> ModelShape:
    """The policy's shape from its config.json (a local directory or the hub cache; nothing is downloaded),
    with the trainable count each recipe in `recipes` (method -> settings) will have."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from spavl_kedro.models.families import image_tokens_per_image
    from spavl_kedro.training.recipe import freeze_for_full_finetune, freeze_lm_head, lora_config

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    with torch.device("meta"):
        base = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in base.parameters())
    full, lora = {}, {}
    for method, settings in recipes.items():
        projector = bool(getattr(settings, "train_projector", False))
        if method in ("dpo", "sft"):
            freeze_for_full_finetune(base, projector)
        if method in ("grpo", "rloo"):  # as training/online_rl.py: the tower frozen, the projector trained
            freeze_for_full_finetune(base, train_projector=True)
        if method == "reward":  # as training/reward.py trains it: the LM head unused, the tower as configured
            freeze_lm_head(base)
            if getattr(settings, "freeze_vision_tower", False):
                freeze_for_full_finetune(base, train_projector=True)
        full[method] = sum(p.numel() for p in base.parameters() if p.requires_grad)
        base.requires_grad_(True)
        if getattr(settings, "lora", False):
            from peft import get_peft_model

            with torch.device("meta"):
                copy = AutoModelForImageTextToText.from_config(config)
                task = None if method == "reward" else "CAUSAL_LM"
                peft = get_peft_model(copy, lora_config(settings, copy, projector, task_type=task))
            lora[method] = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    text = config.get_text_config()
    image_tokens = image_tokens_per_image(config, _processor_settings(model))
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    saved = saved.replace("torch.", "")
    return ModelShape(
        total, full, lora, text.hidden_size, text.num_hidden_layers, image_tokens, BYTES.get(saved, 4), text.vocab_size
    )


def _processor_settings(model: str) -> dict | None:
    """The model's saved image-processor settings (preprocessor_config.json), or None when it has none here."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(model, local_files_only=True)[0]
    except OSError:
        return None


def estimate(
    method: str,
    settings,
    shape: ModelShape,
    processes: int = 1,
    zero_stage: int = 0,
    images_per_prompt: int = 1,
    reward_model: bool = False,
    records_bytes: int = 0,
) -> Estimate:
    """GPU memory per process, host RAM, disk and temp space for one method's recipe (see the module
    docstring). `reward_model`: GRPO / RLOO score with a reward model of the policy's shape on each rank;
    `records_bytes`: the training records' size (images included), 0 when not known."""
    width = BYTES[settings.weights_dtype]
    lora = bool(getattr(settings, "lora", False))
    trainable = shape.trainable_lora[method] if lora else shape.trainable_full[method]
    shard = lambda stage: processes if zero_stage >= stage else 1  # noqa: E731
    weights = shape.total * width // shard(3)
    needs_reference = (method == "dpo" and not lora) or (
        method in ("grpo", "rloo") and not lora and getattr(settings, "beta", 0) > 0
    )
    reference = weights if needs_reference else 0
    gradients = trainable * width // shard(2)
    buckets = trainable * width if processes > 1 and zero_stage == 0 else 0
    optimiser = 2 * trainable * width // shard(1)
    answer = getattr(settings, "max_completion_length", None) or ANSWER_TOKENS
    sequence = shape.image_tokens * images_per_prompt + QUESTION_TOKENS + answer
    # sequences per device step: a pair is two; GRPO / RLOO's batch already counts answers
    sequences = settings.per_device_train_batch_size * {"dpo": 2, "reward": 2}.get(method, 1)
    per_layer = sequences * sequence * shape.hidden
    if settings.activation_checkpointing:
        activations = per_layer * 2 * shape.layers + per_layer * ACTIVATION_BYTES_PER_TOKEN_LAYER
    else:
        activations = per_layer * ACTIVATION_BYTES_PER_TOKEN_LAYER * shape.layers
    # a reward model scores from its last hidden state: no vocabulary-wide logits
    logits = 0 if method == "reward" else 2 * sequences * sequence * shape.vocab * 4
    scorer = shape.total * 2 if reward_model else 0
    parts = {
        "weights": weights,
        "reference": reference,
        "gradients": gradients,
        "ddp_buckets": buckets,
        "optimiser": optimiser,
        "activations": activations,
        "logits": logits,
        "reward_model": scorer,
        "context": CONTEXT_BYTES,
    }
    host = processes * (shape.total * (shape.checkpoint_bytes + width) + records_bytes)
    checkpoint = trainable * width * 3 + (0 if lora else (shape.total - trainable) * width)
    kept = 2 * checkpoint if getattr(settings, "checkpoint_steps", 0) else 0
    temp = (shape.total * shape.checkpoint_bytes + records_bytes + scorer) if processes > 1 else 0
    return Estimate(sum(parts.values()), parts, host, kept, temp)


def gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
