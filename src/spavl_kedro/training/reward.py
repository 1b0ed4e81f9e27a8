"""A vision-language reward model: a LLaVA backbone plus a scalar head, trained with a Bradley-Terry loss.

SPA-VL's reward model is LLaVA with a linear head on the last token, trained on (image, question, chosen,
rejected) quadruples: scripts/train_reward_model.sh of github.com/EchoseChen/SPA-VL-RLHF trains it at lr 3e-5
held constant after a 3% warm-up, batch 4 x 8 GPUs, 1 epoch, bf16, the projector trained, and its
models/ppo/reward_model.py freezes the vision tower.
TRL's RewardTrainer only takes text models, so this module holds a small trainer of its own:

- `RewardModel`: the image-text-to-text model without its LM head (LLaVA's `.model`: vision tower,
  projector, language model); the last hidden state at the last non-pad token goes through
  `Linear(hidden, 1)`. The text scored is the prompt and the response ending in EOS, in the layout the
  policies are trained on (`tiny.prompt_and_completion`).
- `train_reward`: a plain torch loop driven by accelerate, not a `transformers.Trainer` subclass. A Trainer
  would need overrides for paired inputs and would still not report pairwise accuracy; the loop is a screen
  of code and logs exactly the curves we want (loss, accuracy, learning rate, gradient norm). Model,
  optimiser, schedule and batches go through `Accelerator.prepare`, so the launch configuration decides how
  the ranks cooperate: DDP, or DeepSpeed ZeRO-2 / ZeRO-3 as the accelerate config says. The optimiser
  knobs (`lr_scheduler_type`, `warmup_steps`, `weight_decay`, `max_grad_norm`) mean what they mean in
  transformers' `TrainingArguments`. Each batch is encoded when it comes up (images may arrive still
  encoded, as PNG or JPEG bytes), so memory does not grow with the number of pairs: 93k pairs pre-encoded at
  336 px would be ~250 GB of pixels.
- The head starts at zero, so every pair starts at reward 0 vs 0: the first logged loss is log 2 = 0.693
  and the backbone is not pushed around by a random head before the head has learned a direction.
- LoRA (`lora=True`) is merged into the backbone after training: the returned model is always a plain
  transformers model plus a head, which is what `save_reward_model` writes and GRPO/RLOO reward functions
  call. A launched GRPO/RLOO rank loads it where `reward_model_placement` says: its own GPU in bf16.

Example (a random tiny model; see tests/test_sft_reward.py for one that learns):

>>> from PIL import Image
>>> from spavl_kedro.models.tiny import TinyModelConfig, VLM, build_model, build_processor
>>> processor = build_processor(["what is in the picture", "I cannot help", "Sure, here"] * 10, TinyModelConfig())
>>> rm = RewardModel(VLM(build_model(processor, TinyModelConfig(), seed=0), processor))
>>> rm.score([{"images": [Image.new("RGB", (32, 32))], "question": "what is it?", "response": "a cat"}])
[0.0]
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from spavl_kedro.imaging import as_image
from spavl_kedro.models.families import Family, family_of
from spavl_kedro.models.tiny import VLM, prompt_and_completion
from spavl_kedro.models.vlm import load_vlm
from spavl_kedro.training.recipe import (
    COMPLETE_MARKERS,
    checkpoint_step,
    child_run,
    finish_checkpoints,
    freeze_for_full_finetune,
    freeze_lm_head,
    is_checkpointing,
    lora_config,
    optimiser_dtypes,
    resolve_device,
    resume_point,
    training_copy,
)
from spavl_kedro.training.reward_config import RewardSettings

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"


class RewardModel(torch.nn.Module):
    """Scalar reward of (images, question, response): a VLM's last hidden state at the last real token -> Linear."""

    def __init__(self, vlm: VLM, head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = vlm.model
        self.processor = vlm.processor
        hidden = self.backbone.config.get_text_config().hidden_size
        if head is None:
            head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self.head = head.to(dtype=next(self.backbone.parameters()).dtype)

    def forward(self, input_ids, attention_mask, **images) -> torch.Tensor:
        """Rewards of a padded batch, shape (batch,); inputs follow the model to its device. `images`: what the
        family's row says its forward takes besides the token ids (`pixel_values`, `image_grid_thw`, ...)."""
        device = self.head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        images = {key: value.to(device) for key, value in images.items()}
        hidden = _trunk(self.backbone)(
            input_ids=input_ids, attention_mask=attention_mask, **images, use_cache=False
        ).last_hidden_state
        # Position of the last attended token, whichever side the padding is on.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    @torch.inference_mode()
    def score(self, items: Sequence[dict], batch_size: int = 8) -> list[float]:
        """Rewards of `{"images", "question", "response"}` items, in order; the model is left in eval mode."""
        self.eval()
        pad_id, family = self.processor.tokenizer.pad_token_id, family_of(self.backbone)
        scores: list[float] = []
        for start in range(0, len(items), batch_size):
            encoded = [
                _encode(self.processor, family, item["images"], item["question"], item["response"])
                for item in items[start : start + batch_size]
            ]
            scores.extend(self(**_collate(encoded, pad_id)).float().tolist())
        return scores


def _trunk(backbone: torch.nn.Module) -> torch.nn.Module:
    """The backbone without its LM head: LLaVA's `.model` (vision tower, projector, language model), whose
    last hidden state is the one the LM head would read. Skipping the head saves a (tokens x vocabulary)
    matmul per sequence, and leaves no parameter without a gradient for DDP to wait on."""
    model = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    trunk = model.base_model
    if trunk is model:
        raise ValueError(
            f"{type(model).__name__} has no base model under its LM head; the reward model needs a "
            "LLaVA-style model (a `.model` holding the vision tower and language model)"
        )
    return trunk


def reward_model_placement() -> tuple[torch.device, torch.dtype]:
    """Where a process puts a reward model it only scores with: its own GPU (`cuda:LOCAL_RANK`, the rank's
    device under `accelerate launch` / `torchrun`) in bf16, as SPA-VL runs its reward model during PPO, or the
    CPU in fp32 (half precision is slow there). A pre-Ampere GPU without bf16 gets fp32."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), dtype


def train_reward(
    vlm: VLM,
    pairs: Sequence[dict],
    settings: RewardSettings,
    eval_pairs: Sequence[dict] | None = None,
) -> tuple[RewardModel | None, dict[str, float | str]]:
    """Train a reward model on a copy of `vlm` from `{"images", "question", "chosen", "rejected"}` pairs.

    Loss per pair: -log sigmoid(r_chosen - r_rejected). Returns the trained `RewardModel` (eval mode, LoRA
    merged) and metrics: `loss_first` / `loss_last` (first and last logged curve point), `train_loss`
    (mean over the run), `train_accuracy` / `train_margin` (the trained model re-scored on the training
    pairs), `global_step`, `num_processes`, `distributed` (accelerate's NO, MULTI_CPU, MULTI_GPU or
    DEEPSPEED), `optimiser_dtypes` (what AdamW updated: "float32"), `activation_checkpointing`,
    `resumed_from_step`, and with `eval_pairs` `eval_loss`, `eval_accuracy` (fraction of pairs with
    r_chosen > r_rejected; ties count as wrong) and `eval_margin` (mean r_chosen - r_rejected). The MLflow
    curves add the step's `learning_rate` and `grad_norm` (before clipping). `vlm` itself is left untouched.

    Under `accelerate launch` / `torchrun` every rank runs this: each step's batch is
    `per_device_train_batch_size` pairs per process (the same seeded shuffle on every rank, consecutive slices
    of it), gradients are averaged as the launch configuration says (DDP, DeepSpeed ZeRO) and the logged loss
    over all ranks, so N processes at batch b train like one at batch N x b. Only rank 0 re-scores the pairs;
    the other ranks' metrics leave the scores out, and under ZeRO-3 their model is None (rank 0 holds the
    gathered weights).
    """
    if not pairs:
        raise ValueError("no preference pairs to train the reward model on")
    torch.manual_seed(settings.seed)
    resume = resume_point(settings, pairs, vlm.model)
    device, precision = resolve_device(settings)
    accelerator = _accelerator(settings, device, precision)
    model = _trainable_reward_model(vlm, settings)
    # Only what trains reaches AdamW: on LLaVA-1.5-7B the frozen CLIP tower (~0.30B) and LM head (32064 x 4096
    # = 0.13B) keep ~3.5 GB of fp32 moments and ~1.7 GB of gradients off each GPU.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    batches = torch.utils.data.DataLoader(
        range(len(pairs)),
        batch_size=settings.per_device_train_batch_size,
        sampler=_SeededShuffle(len(pairs), settings.seed),
        collate_fn=list,
    )
    per_step = settings.per_device_train_batch_size * accelerator.num_processes
    steps = settings.num_train_epochs * math.ceil(len(pairs) / per_step)
    schedule = get_scheduler(
        settings.lr_scheduler_type, optimizer, num_warmup_steps=_warmup(settings, steps), num_training_steps=steps
    )
    model, optimizer, batches, schedule = accelerator.prepare(model, optimizer, batches, schedule)

    track = "mlflow" in settings.report_to and accelerator.is_main_process  # one rank logs, as transformers does
    # The loop's progress: (loss, accuracy) per logged point, the points of the open window, every step's loss.
    progress = _load_loop_state(accelerator, resume) if resume else {"step": 0, "curve": [], "window": [], "losses": []}
    resumed_from, step = progress["step"], 0
    curve, window, all_losses = progress["curve"], progress["window"], progress["losses"]
    pad_id, family = vlm.processor.tokenizer.pad_token_id, family_of(vlm.model)
    with child_run(settings, pairs):
        if track:
            mlflow.log_params(settings.model_dump())
        model.train()
        for epoch in range(settings.num_train_epochs):
            batches.set_epoch(epoch)
            for index, mine in enumerate(batches):
                if step < resumed_from:  # done before the checkpoint: the same shuffle, so the same batches
                    step += 1
                    continue
                batch = _encode_pairs(vlm.processor, family, [pairs[i] for i in mine])
                chosen, rejected = _pair_rewards(model, batch, pad_id)
                loss = -torch.nn.functional.logsigmoid(chosen.float() - rejected.float()).mean()
                learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
                accelerator.backward(loss)
                grad_norm = (
                    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                    if settings.max_grad_norm > 0
                    else None
                )
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                step += 1
                window.append(_mean_over_ranks(accelerator, loss.item(), (chosen > rejected).float().mean().item()))
                all_losses.append(window[-1][0])
                if step % settings.logging_steps == 0 or step == steps:
                    point = (sum(w[0] for w in window) / len(window), sum(w[1] for w in window) / len(window))
                    curve.append(point)
                    window = []
                    if track:
                        logged = {
                            "loss": point[0],
                            "accuracy": point[1],
                            "learning_rate": learning_rate,
                            "epoch": epoch + index / len(batches),
                        }
                        if grad_norm is not None:
                            logged["grad_norm"] = float(grad_norm)
                        mlflow.log_metrics(logged, step=step)
                if settings.checkpoint_steps and step % settings.checkpoint_steps == 0 and step < steps:
                    _save_loop_state(
                        accelerator,
                        Path(settings.checkpoint_dir),
                        step,
                        {"step": step, "curve": curve, "window": window, "losses": all_losses},
                    )
        finish_checkpoints(settings)
        trained = _trained_model(accelerator, model, vlm, settings)
        if trained is not None:
            trained.eval()
            if settings.lora:
                trained.backbone = trained.backbone.merge_and_unload()
        metrics = {
            "loss_first": curve[0][0],
            "loss_last": curve[-1][0],
            "train_loss": sum(all_losses) / len(all_losses),
            "global_step": float(step),
            "num_processes": float(accelerator.num_processes),
            "distributed": str(accelerator.distributed_type.value),
            "optimiser_dtypes": optimiser_dtypes(optimizer),
            "activation_checkpointing": is_checkpointing(model),
            "resumed_from_step": float(resumed_from),
        }
        if accelerator.is_main_process:
            metrics.update(_prefixed("train_", evaluate_pairs(trained, pairs)))
            if eval_pairs:
                metrics.update(_prefixed("eval_", evaluate_pairs(trained, eval_pairs)))
        if track:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("train_", "eval_"))}, step=step)
            mlflow.flush_async_logging()
    return trained, metrics


def _accelerator(settings: RewardSettings, device: str, precision: str) -> Accelerator:
    """The Accelerator of one reward run: the launch's configuration (DDP, DeepSpeed and its ZeRO stage) with
    the recipe's device, precision and clipping."""
    # An earlier trainer in this process (a TRL one) may have set up accelerate's shared state for its own
    # recipe; transformers resets it for every trainer in the same way, so this recipe's choice holds.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=device == "cpu",  # on the CPU, ranks join over gloo
        # bf16 autocast (DDP) or DeepSpeed's bf16 mode with fp32 master weights, as the other trainers do
        mixed_precision="bf16" if precision == "bf16" else "no",
        # The schedule counts optimiser steps, as transformers' Trainer steps it, whatever the process count
        # (stepped with the optimiser, accelerate would advance it once per process).
        step_scheduler_with_optimizer=False,
        # A trainable vision tower leaves parameters out of the loss, which DDP must be told to expect: LLaVA
        # reads the tower's hidden states, never its post-layernorm, and LLaVA-1.5 its second-to-last layer
        # (vision_feature_layer -2), so its last layer gets no gradient either.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=not settings.freeze_vision_tower and not settings.lora)
        ],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed clips inside its own step, at its config's gradient_clipping: "auto" (or unset) takes the
        # recipe's value, and a different number fails here rather than silently winning.
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        chosen = config.get("gradient_clipping", "auto")
        if chosen != "auto" and float(chosen) != settings.max_grad_norm:
            raise ValueError(
                f"the DeepSpeed config clips gradients at {chosen} but the reward recipe's max_grad_norm "
                f"is {settings.max_grad_norm}: set gradient_clipping to auto, or make them agree"
            )
        config["gradient_clipping"] = settings.max_grad_norm
    return accelerator


def _trainable_reward_model(vlm: VLM, settings: RewardSettings) -> RewardModel:
    """A `RewardModel` on a training copy of `vlm.model`, with only what the recipe trains left trainable."""
    backbone = training_copy(vlm.model, settings)
    freeze_lm_head(backbone)
    if settings.activation_checkpointing:
        backbone.activation_checkpointing_enable({"use_reentrant": False})  # frozen inputs still pass gradients
    if settings.lora:
        backbone = get_peft_model(
            backbone, lora_config(settings, backbone, task_type=None)
        )  # the head is not PEFT's: it trains
    elif settings.freeze_vision_tower:
        freeze_for_full_finetune(backbone, train_projector=True)
    return RewardModel(VLM(backbone, vlm.processor))


def _trained_model(accelerator: Accelerator, model, vlm: VLM, settings: RewardSettings) -> RewardModel | None:
    """The trained `RewardModel` out of accelerate's wrapping. ZeRO-3 leaves every rank a shard of each weight:
    all ranks gather them and rank 0 loads the whole into a fresh copy; the other ranks get None."""
    accelerator.wait_for_everyone()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        trained.__dict__.pop("forward", None)  # bf16 autocast leaves the plain forward re-bound on the instance
        return trained
    weights = accelerator.get_state_dict(model)  # every rank takes part; rank 0 receives them
    if not accelerator.is_main_process:
        return None
    whole = _trainable_reward_model(vlm, settings)
    whole.load_state_dict(weights)
    return whole


def _warmup(settings: RewardSettings, steps: int) -> int:
    """Warm-up steps as transformers counts them: a whole number as given, a fraction of `steps` rounded up."""
    if settings.warmup_steps >= 1:
        return int(settings.warmup_steps)
    return math.ceil(steps * settings.warmup_steps)


class _SeededShuffle(torch.utils.data.Sampler):
    """Pair indices in the order of epoch `e`: the (e+1)-th shuffle drawn from `random.Random(seed)`. Every
    rank computes the same order; accelerate hands each its own consecutive batches of it."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed)
        for _ in range(self.epoch + 1):
            order = list(range(self.size))
            rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.size


def _mean_over_ranks(accelerator: Accelerator, loss: float, accuracy: float) -> tuple[float, float]:
    """A step's loss and accuracy averaged over every process (each rank's batch has the same size)."""
    if accelerator.num_processes == 1:
        return loss, accuracy
    values = accelerator.reduce(torch.tensor([loss, accuracy], device=accelerator.device), reduction="mean")
    return tuple(values.tolist())


def evaluate_pairs(model: RewardModel, pairs: Sequence[dict], batch_size: int = 8) -> dict[str, float]:
    """Bradley-Terry loss, pairwise accuracy (strictly r_chosen > r_rejected) and mean margin on `pairs`."""

    def side(key: str) -> torch.Tensor:
        items = [{"images": p["images"], "question": p["question"], "response": p[key]} for p in pairs]
        return torch.tensor(model.score(items, batch_size))

    chosen, rejected = side("chosen"), side("rejected")
    margin = chosen - rejected
    return {
        "loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
    }


def save_reward_model(model: RewardModel, directory: str) -> None:
    """Write the backbone and processor (a plain model directory, loadable by `load_vlm`) plus the head."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(path)
    model.processor.save_pretrained(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(path / HEAD_WEIGHTS))
    config = {
        "kind": "spavl_reward_model",
        "version": 1,
        "hidden_size": model.head.in_features,
        "pooling": "last non-pad token of the language model's last hidden layer",
        "text_layout": "prompt + response + eos, as spavl_kedro.models.tiny.prompt_and_completion renders them",
    }
    (path / HEAD_CONFIG).write_text(json.dumps(config, indent=2))


def load_reward_model(
    directory: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> RewardModel:
    """Inverse of `save_reward_model`; the model comes back in eval mode. Unset, it loads as saved onto the
    CPU; with `device` / `dtype` (`reward_model_placement`) the backbone goes straight to that device in that
    dtype, while the head, one vector, stays fp32 for a finer score."""
    path = Path(directory)
    config = json.loads((path / HEAD_CONFIG).read_text())
    if config.get("kind") != "spavl_reward_model":
        raise ValueError(f"{directory} is not a saved reward model (no spavl_reward_model {HEAD_CONFIG})")
    head = torch.nn.Linear(config["hidden_size"], 1)
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    placement = {}
    if dtype is not None:
        placement["dtype"] = dtype
    if device is not None and torch.device(device).type != "cpu":
        placement["device_map"] = {"": str(device)}  # loaded onto the GPU directly, no host copy per rank
    model = RewardModel(load_vlm(str(path), **placement), head=head)
    model.head.float()
    if device is not None:
        model.to(device)
    model.eval()
    return model


@dataclass
class _Encoded:
    input_ids: torch.Tensor  # prompt + completion (prompt_and_completion), image tokens expanded
    images: dict[str, torch.Tensor]  # per-image inputs of the family's forward: pixel_values, image_grid_thw, ...
    tokens: dict[str, torch.Tensor]  # per-token inputs besides the ids (mm_token_type_ids), one row


def _encode(processor, family: Family, images, question: str, response: str) -> _Encoded:
    images = [as_image(image) for image in images]
    prompt, completion = prompt_and_completion(processor, question, len(images), response)
    enc = processor(text=[prompt + completion], images=images or None, return_tensors="pt", add_special_tokens=False)
    inputs = family.model_inputs(enc)
    tokens = {key: inputs.pop(key)[0] for key in family.token_inputs if key in inputs}
    return _Encoded(enc["input_ids"][0], inputs, tokens)


def _encode_pairs(processor, family: Family, pairs: Sequence[dict]) -> list[tuple[_Encoded, _Encoded]]:
    return [
        (
            _encode(processor, family, p["images"], p["question"], p["chosen"]),
            _encode(processor, family, p["images"], p["question"], p["rejected"]),
        )
        for p in pairs
    ]


def _collate(rows: Sequence[_Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: positions then count from 0 for every row without needing position ids. Per-token
    inputs are padded with 0 like the ids; per-image ones are concatenated row by row, which keeps them in the
    order of the image tokens they belong to."""
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.input_ids)] = row.input_ids
        attention[i, : len(row.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    for key in rows[0].tokens:
        padded = torch.zeros((len(rows), width), dtype=rows[0].tokens[key].dtype)
        for i, row in enumerate(rows):
            padded[i, : len(row.tokens[key])] = row.tokens[key]
        batch[key] = padded
    for key in {key for row in rows for key in row.images}:
        batch[key] = _stack_images([row.images[key] for row in rows if key in row.images])
    return batch


def _stack_images(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors of several rows as one, image after image. Tiles per image may differ between rows
    (LLaVA-NeXT's pixel_values: images x tiles x C x H x W, each row padded to its own widest image): they are
    zero-padded to the widest, as the processor pads within one call, and the model drops the padding again by
    `image_sizes`."""
    widest = max(part.shape[1] for part in parts) if parts[0].dim() > 2 else None
    if widest is not None and any(part.shape[1] != widest for part in parts):
        parts = [
            torch.nn.functional.pad(part, (0, 0) * (part.dim() - 2) + (0, widest - part.shape[1])) for part in parts
        ]
    return torch.cat(parts)


def _pair_rewards(model: RewardModel, batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards of a batch of encoded pairs, in one forward pass."""
    rewards = model(**_collate([c for c, _ in batch] + [r for _, r in batch], pad_id))
    return rewards[: len(batch)], rewards[len(batch) :]


LOOP_STATE = COMPLETE_MARKERS[1]  # written last, so a checkpoint folder holding it is complete


def _save_loop_state(accelerator: Accelerator, directory: Path, step: int, progress: dict) -> None:
    """A checkpoint of the loop after `step`: `Accelerator.save_state` (weights, optimiser and schedule, DeepSpeed
    shards included, and every rank's RNG) plus the curves so far, written to a temporary folder and renamed
    once every rank is done, so a kill mid-write leaves no half checkpoint. The latest two are kept. Every
    rank calls it."""
    final = directory / f"checkpoint-{step}"
    staging = directory / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(progress, staging / LOOP_STATE)
        staging.rename(final)
        for old in sorted(directory.glob("checkpoint-*"), key=checkpoint_step)[:-2]:
            shutil.rmtree(old, ignore_errors=True)


def _load_loop_state(accelerator: Accelerator, checkpoint: str) -> dict:
    accelerator.load_state(checkpoint)
    state = torch.load(Path(checkpoint) / LOOP_STATE, weights_only=False)
    return {key: state[key] for key in ("step", "curve", "window", "losses")}


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {prefix + key: value for key, value in values.items()}


def train(
    vlm: VLM,
    records: Sequence[dict],
    settings: RewardSettings,
    eval_records: Sequence[dict] | None = None,
    reward_fn=None,
) -> tuple[RewardModel, dict[str, float | str]]:
    """The `reward` row of `training.methods.METHODS`: `train_reward` on the pairs."""
    return train_reward(vlm, records, settings, eval_pairs=eval_records or None)
