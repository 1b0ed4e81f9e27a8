"""A vision-language reward model: a LLaVA backbone plus a scalar head, trained with a Bradley-Terry loss.

SPA-VL's reward model is LLaVA with a linear head on the last token, trained on (image, question, chosen,
rejected) quadruples (lr 3e-5, batch 32, 1 epoch). TRL's RewardTrainer only takes text models, so this
module holds a small trainer of its own:

- `RewardModel`: the image-text-to-text model run with `output_hidden_states=True`; the language model's
  last-layer hidden state at the last non-pad token goes through `Linear(hidden, 1)`. The text scored is the
  prompt and the response ending in EOS, in the layout the policies are trained on (`tiny.prompt_and_completion`).
- `train_reward`: a plain torch loop (AdamW, linear decay), not a `transformers.Trainer` subclass. A Trainer
  override for paired inputs, and would still not report pairwise accuracy; the loop is a screen of code
  and logs exactly the curves we want (loss, accuracy) with explicit steps. It encodes each batch when the
  batch comes up (images may arrive still encoded, as PNG or JPEG bytes), so its memory does not grow with
  the number of pairs: 93k pairs pre-encoded at 336 px would be ~250 GB of pixels.
- The head starts at zero, so every pair starts at reward 0 vs 0: the first logged loss is log 2 = 0.693
  and the backbone is not pushed around by a random head before the head has learned a direction.
- LoRA (`lora=True`) is merged into the backbone after training: the returned model is always a plain
  transformers model plus a head, which is what `save_reward_model` writes and GRPO/RLOO reward functions
  call.

Example (a random tiny model; see tests/test_sft_reward.py for one that learns):

>>> from PIL import Image
>>> from spavl_kedro.backends.tiny import TinyModelConfig, VLM, build_model, build_processor
>>> processor = build_processor(["what is in the picture", "I cannot help", "Sure, here"] * 10, TinyModelConfig())
>>> rm = RewardModel(VLM(build_model(processor, TinyModelConfig(), seed=0), processor))
>>> rm.score([{"images": [Image.new("RGB", (32, 32))], "question": "what is it?", "response": "a cat"}])
[0.0]
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlflow
import torch
from accelerate import PartialState
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from spavl_kedro.backends.recipe import (
    COMPLETE_MARKERS, checkpoint_step, child_run, finish_checkpoints, is_checkpointing, lora_config,
    optimiser_dtypes, resolve_device, resume_point, training_copy,
)
from spavl_kedro.backends.settings import RewardSettings
from spavl_kedro.backends.tiny import VLM, prompt_and_completion
from spavl_kedro.backends.vlm import load_vlm
from spavl_kedro.imaging import as_image

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

    def forward(self, input_ids, attention_mask, pixel_values=None) -> torch.Tensor:
        """Rewards of a padded batch, shape (batch,); inputs follow the model to its device."""
        device = self.head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            output_hidden_states=True,
            logits_to_keep=1,  # the LM head is not used; skip most of its (vocab x length) work
            use_cache=False,
        )
        hidden = outputs.hidden_states[-1]
        # Position of the last attended token, whichever side the padding is on.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled).squeeze(-1)

    @torch.inference_mode()
    def score(self, items: Sequence[dict], batch_size: int = 8) -> list[float]:
        """Rewards of `{"images", "question", "response"}` items, in order; the model is left in eval mode."""
        self.eval()
        pad_id = self.processor.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(items), batch_size):
            encoded = [_encode(self.processor, item["images"], item["question"], item["response"])
                       for item in items[start : start + batch_size]]
            scores.extend(self(**_collate(encoded, pad_id)).float().tolist())
        return scores


def train_reward(
    vlm: VLM,
    pairs: Sequence[dict],
    settings: RewardSettings,
    eval_pairs: Sequence[dict] | None = None,
) -> tuple[RewardModel, dict[str, float | str]]:
    """Train a reward model on a copy of `vlm` from `{"images", "question", "chosen", "rejected"}` pairs.

    Loss per pair: -log sigmoid(r_chosen - r_rejected). Returns the trained `RewardModel` (eval mode, LoRA
    merged) and metrics: `loss_first` / `loss_last` (first and last logged curve point), `train_loss`
    (mean over the run), `train_accuracy` / `train_margin` (the trained model re-scored on the training
    pairs), `global_step`, `num_processes`, `optimiser_dtypes` (what AdamW updated: "float32"),
    `activation_checkpointing`, `resumed_from_step`, and with `eval_pairs` `eval_loss`, `eval_accuracy`
    (fraction of pairs with r_chosen > r_rejected; ties count as wrong) and `eval_margin` (mean
    r_chosen - r_rejected). `vlm` itself is left untouched.

    Under `accelerate launch` / `torchrun` every rank runs this: each step's batch is `batch_size` pairs per
    process (the same seeded shuffle on every rank, each taking its own slice), gradients are averaged by DDP
    and the logged loss over all ranks, so N processes at batch b train like one at batch N x b. Only rank 0
    writes checkpoints and re-scores the pairs; the other ranks' metrics leave the scores out.
    """
    if not pairs:
        raise ValueError("no preference pairs to train the reward model on")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    resume = resume_point(settings, pairs, vlm.model)
    backbone = training_copy(vlm.model, settings)
    if settings.activation_checkpointing:
        backbone.activation_checkpointing_enable({"use_reentrant": False})  # frozen inputs still pass gradients
    if settings.lora:
        backbone = get_peft_model(backbone, lora_config(settings, task_type=None))
    device, precision = resolve_device(settings)
    processes = PartialState(cpu=device == "cpu")  # joins the launcher's process group when there is one
    model = RewardModel(VLM(backbone, vlm.processor)).to(processes.device)
    # bf16 autocast on a GPU that supports it (weights and optimiser state stay fp32), fp32 on the CPU.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    trained = model if processes.num_processes == 1 else torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=True)  # the LM head is part of the backbone but not of the reward

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    per_step = settings.per_device_train_batch_size * processes.num_processes
    steps = settings.num_train_epochs * math.ceil(len(pairs) / per_step)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)

    track = "mlflow" in settings.report_to and processes.is_main_process  # one rank logs, as transformers does
    # The loop's progress: (loss, accuracy) per logged point, the points of the open window, every step's loss.
    progress = _load_loop_state(resume, model, optimizer, schedule) if resume else {
        "step": 0, "curve": [], "window": [], "losses": []}
    resumed_from, step = progress["step"], 0
    curve, window, all_losses = progress["curve"], progress["window"], progress["losses"]
    pad_id = vlm.processor.tokenizer.pad_token_id
    with child_run(settings):
        if track:
            mlflow.log_params(settings.model_dump())
        model.train()
        for epoch in range(settings.num_train_epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), per_step):
                if step < resumed_from:  # done before the checkpoint: the same shuffle, so the same batches
                    step += 1
                    continue
                mine = order[start : start + per_step][processes.process_index :: processes.num_processes]
                batch = _encode_pairs(vlm.processor, [pairs[i] for i in mine])
                with autocast:
                    chosen, rejected = _pair_rewards(trained, batch, pad_id)
                    loss = -torch.nn.functional.logsigmoid(chosen.float() - rejected.float()).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                window.append(_mean_over_ranks(processes, loss.item(), (chosen > rejected).float().mean().item()))
                all_losses.append(window[-1][0])
                if step % settings.logging_steps == 0 or step == steps:
                    point = (sum(w[0] for w in window) / len(window), sum(w[1] for w in window) / len(window))
                    curve.append(point)
                    window = []
                    if track:
                        mlflow.log_metrics({"loss": point[0], "accuracy": point[1],
                                            "epoch": epoch + start / len(order)}, step=step)
                if (settings.checkpoint_steps and step % settings.checkpoint_steps == 0 and step < steps
                        and processes.is_main_process):
                    _save_loop_state(Path(settings.checkpoint_dir), step, model, optimizer, schedule,
                                     {"step": step, "curve": curve, "window": window, "losses": all_losses})
        finish_checkpoints(settings)
        model.eval()
        if settings.lora:
            model.backbone = model.backbone.merge_and_unload()
        metrics = {"loss_first": curve[0][0], "loss_last": curve[-1][0],
                   "train_loss": sum(all_losses) / len(all_losses), "global_step": float(step),
                   "num_processes": float(processes.num_processes),
                   "optimiser_dtypes": optimiser_dtypes(optimizer), "activation_checkpointing": is_checkpointing(model),
                   "resumed_from_step": float(resumed_from)}
        if processes.is_main_process:
            metrics.update(_prefixed("train_", evaluate_pairs(model, pairs)))
            if eval_pairs:
                metrics.update(_prefixed("eval_", evaluate_pairs(model, eval_pairs)))
        if track:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("train_", "eval_"))}, step=step)
            mlflow.flush_async_logging()
    return model, metrics


def _mean_over_ranks(processes: PartialState, loss: float, accuracy: float) -> tuple[float, float]:
    """A step's loss and accuracy averaged over every process (each rank's batch has the same size)."""
    if processes.num_processes == 1:
        return loss, accuracy
    values = torch.tensor([loss, accuracy], device=processes.device)
    torch.distributed.all_reduce(values)
    return tuple((values / processes.num_processes).tolist())


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
        "text_layout": "prompt + response + eos, as spavl_kedro.backends.tiny.prompt_and_completion renders them",
    }
    (path / HEAD_CONFIG).write_text(json.dumps(config, indent=2))


def load_reward_model(directory: str) -> RewardModel:
    """Inverse of `save_reward_model`; the model comes back in eval mode."""
    path = Path(directory)
    config = json.loads((path / HEAD_CONFIG).read_text())
    if config.get("kind") != "spavl_reward_model":
        raise ValueError(f"{directory} is not a saved reward model (no spavl_reward_model {HEAD_CONFIG})")
    head = torch.nn.Linear(config["hidden_size"], 1)
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    model = RewardModel(load_vlm(str(path)), head=head)
    model.eval()
    return model


@dataclass
class _Encoded:
    input_ids: torch.Tensor  # prompt + completion (prompt_and_completion), image tokens expanded
    pixel_values: torch.Tensor | None


def _encode(processor, images, question: str, response: str) -> _Encoded:
    images = [as_image(image) for image in images]
    prompt, completion = prompt_and_completion(processor, question, len(images), response)
    enc = processor(text=[prompt + completion], images=images or None, return_tensors="pt", add_special_tokens=False)
    return _Encoded(enc["input_ids"][0], enc.get("pixel_values"))


def _encode_pairs(processor, pairs: Sequence[dict]) -> list[tuple[_Encoded, _Encoded]]:
    return [(_encode(processor, p["images"], p["question"], p["chosen"]),
             _encode(processor, p["images"], p["question"], p["rejected"])) for p in pairs]


def _collate(rows: Sequence[_Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: positions then count from 0 for every row without needing position ids."""
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.input_ids)] = row.input_ids
        attention[i, : len(row.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    pixels = [row.pixel_values for row in rows if row.pixel_values is not None]
    if pixels:  # images are matched to <image> tokens in order, so concatenating row by row keeps them aligned
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def _pair_rewards(model: RewardModel, batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards of a batch of encoded pairs, in one forward pass."""
    rewards = model(**_collate([c for c, _ in batch] + [r for _, r in batch], pad_id))
    return rewards[: len(batch)], rewards[len(batch) :]


LOOP_STATE = COMPLETE_MARKERS[1]  # written last, so a checkpoint folder holding it is complete


def _save_loop_state(directory: Path, step: int, model: RewardModel, optimizer, schedule, progress: dict) -> None:
    """A checkpoint of the loop after `step`: weights, optimiser, schedule, torch's RNG and the curves so far,
    written to a temporary folder and renamed, so a kill mid-write leaves no half checkpoint. The latest two
    are kept."""
    final = directory / f"checkpoint-{step}"
    staging = directory / f".checkpoint-{step}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "torch_rng": torch.get_rng_state(), **progress}, staging / LOOP_STATE)
    staging.rename(final)
    for old in sorted(directory.glob("checkpoint-*"), key=checkpoint_step)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _load_loop_state(checkpoint: str, model: RewardModel, optimizer, schedule) -> dict:
    state = torch.load(Path(checkpoint) / LOOP_STATE, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    return {key: state[key] for key in ("step", "curve", "window", "losses")}


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {prefix + key: value for key, value in values.items()}


def train(vlm: VLM, records: Sequence[dict], settings: RewardSettings, eval_records: Sequence[dict] | None = None,
          reward_fn=None) -> tuple[RewardModel, dict[str, float | str]]:
    """The `reward` row of `backends.methods.METHODS`: `train_reward` on the pairs."""
    return train_reward(vlm, records, settings, eval_pairs=eval_records or None)
