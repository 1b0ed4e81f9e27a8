"""DPO safety alignment of an image-text-to-text model with TRL: a LoRA adapter or a full fine-tune.

This is the preference-optimisation step of SPA-VL: given (images, question, chosen, rejected) quadruples,
teach the policy to prefer the safer answer. TRL's DPOTrainer does the work; this module only turns the
project's pair records into the dataset layout TRL expects for vision models and pins the trainer options
that matter on a small CPU machine.

Choices worth knowing about:

- LoRA (the default) with `ref_model=None`. The reference policy is then the same network with the adapter
  switched off, so no second copy of the model is held in memory.
- Full fine-tuning (`lora=False`, SPA-VL's main recipe) needs a separate frozen reference: TRL would reload
  one from `model.config.name_or_path`, which an in-memory model does not have, so we pass a deep copy.
  Memory then holds the caller's model, the policy and the reference (three copies of the weights; the
  caller's stays where it was loaded, usually host RAM) plus the gradient and AdamW's two moments of every
  trainable weight. For LLaVA-1.5-7B in fp32: 28 GB per copy of the weights and ~80 GB of gradients and
  optimiser state, hence the paper's DeepSpeed ZeRO-2 across 8 GPUs (conf/paper/accelerate/
  deepspeed_zero2.yaml): it shards the ~80 GB, while every GPU still holds the policy and the reference.
- Only the language model trains. The vision tower stays frozen in both modes; the multi-modal projector
  trains too with `train_projector=True` (LoRA: a full copy saved through PEFT's `modules_to_save`).
- Device and precision follow the hardware: a CUDA GPU when one is visible (bf16 mixed precision when it
  supports bf16), otherwise the CPU in fp32. `use_cpu: true` forces the CPU. Under `torchrun` or
  `accelerate launch` the trainer runs DDP (gloo on CPU); see `train_worker.py`. The weights trained are the
  copy in `weights_dtype` (`recipe.training_copy`: fp32 by default, never the checkpoint's float16).
- The caller's model is copied (`training_copy`) before training. PEFT injects adapter layers into whatever module it is
  given and TRL patches that module's `forward`; without the copy the `VLM` passed in would silently become
  the trained policy, and the "before" side of any before/after comparison would be lost.
- Training curves go to a nested MLflow run under whatever run is active (a Kedro-MLflow pipeline run, a
  notebook run, or none); `recipe.child_run` says why we open it rather than transformers' callback.
- Defaults are tuned for the tiny offline models (see `DPOSettings`); the paper profile overrides them.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer

from spavl_kedro.models.tiny import VLM, prompt_and_completion
from spavl_kedro.training.adapters import LoraAdapter
from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.recipe import (
    child_run,
    finish_checkpoints,
    freeze_for_full_finetune,
    lora_config,
    on_disk_dataset,
    prepare_for_generation,
    resolve_device,
    resume_point,
    run_trainer,
    training_copy,
    trl_config,
)

# Curves TRL logs every `logging_steps`; each comes back as its last value plus `_first` / `_last`.
_CURVE_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
)


def pairs_to_dataset(pairs: Sequence[dict], processor, scratch: str) -> Dataset:
    """Preference pairs as a TRL vision dataset of strings (prompt / chosen / rejected / images), on disk under
    `scratch` (`recipe.on_disk_dataset`: the images stay encoded until a batch reads them). Rendered by
    `tiny.prompt_and_completion`, so training sees the prompt generation sees (BOS included) and answers that
    end in EOS, whatever the model's chat template writes. TRL's collator processes a batch's images with its
    prompts, one `<image>` placeholder per image, in order.
    """
    if not pairs:
        raise ValueError("no preference pairs to train on")

    def row(pair: dict) -> dict:
        images = list(pair["images"])
        question, n_images = pair["question"], len(images)
        prompt, chosen = prompt_and_completion(processor, question, n_images, pair["chosen"], end_at_eos=False)
        _, rejected = prompt_and_completion(processor, question, n_images, pair["rejected"], end_at_eos=False)
        return {"images": images, "prompt": prompt, "chosen": chosen, "rejected": rejected}

    return on_disk_dataset(pairs, row, ("prompt", "chosen", "rejected"), scratch)


def train_dpo(
    vlm: VLM,
    pairs: list[dict],
    settings: DPOSettings,
    eval_pairs: list[dict] | None = None,
) -> tuple[PeftModel | PreTrainedModel, dict[str, float | str]]:
    """Train `vlm` with DPO; return the trained model and its final metrics.

    `vlm` is left untouched. With `settings.lora` (the default) the model returned is a PeftModel holding
    the adapter (and the projector copy when `train_projector`); with `lora=False` it is the fully
    fine-tuned model itself (same class as `vlm.model`, e.g. LlavaForConditionalGeneration): save it with
    `save_pretrained` next to `vlm.processor`. Either way it is in eval mode, on the training device, and
    ready for cached generation with `vlm.processor`.

    Metrics: `train_loss` (mean over the run), `loss` and `rewards/*` (last logged step; averaged over all
    processes in a distributed run), `train_runtime`, `global_step`, `num_processes`, `eval_*` when
    `eval_pairs` are given, and three strings read back from the trainer: `device` ("cpu", "cuda"),
    `precision` ("fp32", "bf16"; see `resolve_device`) and `distributed` ("NO", "MULTI_CPU", "MULTI_GPU",
    "DEEPSPEED").
    """
    device, precision = resolve_device(settings)
    train_dataset = pairs_to_dataset(pairs, vlm.processor, settings.output_dir)
    eval_dataset = pairs_to_dataset(eval_pairs, vlm.processor, settings.output_dir) if eval_pairs else None
    resume = resume_point(settings, pairs, vlm.model)
    model = training_copy(vlm.model, settings)
    model.train()
    ref_model = None
    if not settings.lora:
        # The reference must be the policy *before* training and must never change: a frozen copy.
        ref_model = training_copy(vlm.model, settings).eval().requires_grad_(False)
        freeze_for_full_finetune(model, settings.train_projector)

    args = trl_config(
        DPOConfig,
        settings,
        device,
        precision,  # beta, learning rate, epochs, batch, schedule: TRL's names
        per_device_eval_batch_size=settings.per_device_train_batch_size,
        eval_strategy="no",  # evaluated once after training, inside the same MLflow run
    )
    peft_config = lora_config(settings, model, settings.train_projector) if settings.lora else None

    with child_run(settings, pairs):
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=vlm.processor,
            peft_config=peft_config,
        )
        metrics: dict[str, float | str] = dict(
            run_trainer(trainer, _CURVE_KEYS, evaluate=eval_dataset is not None, resume_from=resume)
        )
    finish_checkpoints(settings)

    trained = trainer.accelerator.unwrap_model(trainer.model)
    prepare_for_generation(trained)
    metrics["distributed"] = trainer.accelerator.distributed_type.value  # NO, MULTI_CPU, MULTI_GPU, DEEPSPEED
    # What the trainer actually used: a launcher's mixed-precision setting (ACCELERATE_MIXED_PRECISION)
    # would override `bf16=False`, so read it back rather than echo our request.
    mixed = str(trainer.accelerator.mixed_precision)
    metrics["device"] = trainer.accelerator.device.type
    metrics["precision"] = "fp32" if mixed == "no" else mixed
    return trained, metrics


def train(
    vlm: VLM, records: list[dict], settings: DPOSettings, eval_records: list[dict] | None = None, reward_fn=None
) -> tuple[LoraAdapter | VLM, dict[str, float | str]]:
    """The `dpo` row of `training.methods.METHODS`: `train_dpo`, its result as `aligned_models` holds it
    (the LoRA adapter, or the fully fine-tuned policy with its processor)."""
    model, metrics = train_dpo(vlm, list(records), settings, eval_pairs=eval_records or None)
    artifact = (
        LoraAdapter.from_peft(model) if isinstance(model, PeftModel) else VLM(model=model, processor=vlm.processor)
    )
    return artifact, metrics
