"""Supervised fine-tuning of an image-text-to-text model with TRL's SFTTrainer (full or LoRA).

Two uses in this project: MIS-style safety chain-of-thought training (target = "Perception: ... Reasoning:
... Answer: ..." written for one or more images) and plain SFT on the chosen responses of SPA-VL pairs.
Each example is `{"images": [PIL.Image, ...], "question": str, "target": str}`.

Choices worth knowing about:

- *Prompt-completion* rows of strings (`prompt`, `completion`, `images`) rendered by
  `tiny.prompt_and_completion`: the prompt as generation sees it (BOS included), the answer ending in EOS
  even where the model's chat template ends an assistant turn otherwise (llava-1.5's ends it with a space).
  TRL masks the prompt out of the labels (`completion_only_loss`), so the loss covers the answer and its EOS.
- `max_length=None` by default: TRL's truncation could cut image tokens out of the sequence while their
  pixel features stay, which fails inside the model ("Image features and image tokens do not match").
- The caller's model is copied first and the run is logged to a nested MLflow run, as in `train_dpo` (see
  `dpo.py` for why the child run is opened here rather than by transformers' callback).
- Full fine-tuning is the default: on the tiny models LoRA on q/v barely moved the SFT loss when measured,
  and MIS fine-tunes the whole InternVL. The vision tower stays frozen, as in LLaVA's instruction tuning: left
  to train on a few dozen chain-of-thought samples, the tiny tower lost what it had learned to see (one
  default run: capability 0.85 -> 0.58 after SFT; with the tower frozen, 0.83 -> 0.77 in another).
  `train_projector=False` freezes the projector too. LoRA goes on the language MLPs, like DPO, when
  `lora=True`.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from spavl_kedro.models.tiny import VLM, prompt_and_completion
from spavl_kedro.training.adapters import LoraAdapter
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
from spavl_kedro.training.sft_config import SFTSettings

# Curves SFTTrainer logs every `logging_steps`; each comes back as its last value plus `_first` / `_last`.
_CURVE_KEYS = ("loss", "mean_token_accuracy", "entropy")


def examples_to_dataset(examples: Sequence[dict], processor, scratch: str) -> Dataset:
    """SFT examples as a TRL prompt-completion vision dataset of strings (prompt / completion / images), on
    disk under `scratch` (`recipe.on_disk_dataset`), rendered by `tiny.prompt_and_completion` (the prompt as
    generation sees it, the answer ending in EOS)."""
    if not examples:
        raise ValueError("no SFT examples to train on")

    def row(example: dict) -> dict:
        images = list(example["images"])
        prompt, completion = prompt_and_completion(
            processor, example["question"], len(images), example["target"], end_at_eos=False
        )
        return {"images": images, "prompt": prompt, "completion": completion}

    return on_disk_dataset(examples, row, ("prompt", "completion"), scratch)


def train_sft(
    vlm: VLM,
    examples: Sequence[dict],
    settings: SFTSettings,
    eval_examples: Sequence[dict] | None = None,
) -> tuple[VLM, LoraAdapter | None, dict[str, float]]:
    """Fine-tune a copy of `vlm` on (images, question, target) examples; loss on the target tokens only.

    Returns `(policy, adapter, metrics)`:

    - `policy`: a new `VLM` (same processor) holding the trained model, in eval mode and ready for cached
      generation. With `lora=True` the adapter is already merged into it, so it is a plain transformers
      model either way (save_pretrained, deep copies and `transformers serve` all work).
    - `adapter`: the trained `LoraAdapter` with `lora=True` (save it with `adapters.save_adapter`; it
      reproduces `policy` through `adapters.apply_adapter(vlm, adapter)`), `None` for full fine-tuning.
    - `metrics`: `loss_first` / `loss_last` (first and last logged train loss), `loss`,
      `mean_token_accuracy`, `entropy` (last logged step), `train_loss` (mean over the run), `global_step`,
      `train_runtime`, and `eval_loss` / `eval_mean_token_accuracy` when `eval_examples` are given.

    `vlm` itself is left untouched.
    """
    device, precision = resolve_device(settings)
    train_dataset = examples_to_dataset(examples, vlm.processor, settings.output_dir)
    eval_dataset = examples_to_dataset(eval_examples, vlm.processor, settings.output_dir) if eval_examples else None
    resume = resume_point(settings, examples, vlm.model)
    model = training_copy(vlm.model, settings)
    model.train()
    if not settings.lora:  # the vision tower stays frozen, as in LLaVA's instruction tuning
        freeze_for_full_finetune(model, settings.train_projector)

    args = trl_config(
        SFTConfig,
        settings,
        device,
        precision,  # learning rate, epochs, batch, max_length: TRL's names
        per_device_eval_batch_size=settings.per_device_train_batch_size,
        completion_only_loss=True,  # prompt tokens (question and image tokens) carry no loss
        eval_strategy="no",  # evaluated once after training, inside the same MLflow run
    )
    peft_config = lora_config(settings, model) if settings.lora else None

    with child_run(settings, examples):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=vlm.processor,
            peft_config=peft_config,
        )
        metrics = run_trainer(trainer, _CURVE_KEYS, evaluate=eval_dataset is not None, resume_from=resume)
    finish_checkpoints(settings)

    trained = trainer.accelerator.unwrap_model(trainer.model)
    adapter = None
    if isinstance(trained, PeftModel):
        adapter = LoraAdapter.from_peft(trained)
        trained = trained.merge_and_unload()
    prepare_for_generation(trained)
    return VLM(model=trained, processor=vlm.processor), adapter, metrics


def train(
    vlm: VLM, records: Sequence[dict], settings: SFTSettings, eval_records: Sequence[dict] | None = None, reward_fn=None
) -> tuple[LoraAdapter | VLM, dict[str, float]]:
    """The `sft` row of `training.methods.METHODS`: `train_sft`; the adapter when it trained one, else the
    fine-tuned policy."""
    policy, adapter, metrics = train_sft(vlm, records, settings, eval_examples=eval_records or None)
    return (adapter if adapter is not None else policy), metrics
