"""Online RL safety alignment of an image-text-to-text model: GRPO or RLOO against a reward function.

SPA-VL's third training method is PPO: the policy samples answers, its VLM reward model scores them, and
the update follows a KL-penalised advantage (kl 0.1 to the starting policy, lr 5e-7). TRL 1.16 no longer
ships PPO (it went with the value-head models), so this module stands in two critic-free relatives that
TRL does ship, both of which accept vision-language models and arbitrary Python reward functions:

- GRPO samples `num_generations` answers per prompt and uses the group's mean reward as the baseline
  (advantage = (r - mean) / std within the group). The KL to the reference enters the *loss*, per token,
  weighted by `beta`.
- RLOO samples the same groups and uses a leave-one-out baseline (advantage = r - mean of the other
  answers to the same prompt). The KL to the reference is subtracted from the *reward*, summed over the
  sequence and weighted by `beta`: the PPO-RLHF recipe SPA-VL followed, minus the critic.

What PPO gets from its value head (a baseline that lowers the variance of the policy gradient) these get
from the other samples of the same prompt, so no second network is trained and no value loss has to be
balanced. `beta` keeps the policy near the reference as PPO's kl coefficient did; 0.1 by default, as in
SPA-VL. With LoRA the reference is the same network with the adapter switched off, as in `dpo.py`.

The project's rewards (its VLM reward model's scores, a judge's safe -> 1 / unsafe -> 0, or a weighted sum)
are one callable on `{"images", "question", "response"}` records; `train_online_rl` adapts it to TRL's
reward-function signature, where images arrive through the `images` keyword and completions as chat turns.

The caller's model is copied before training and curves go to a nested MLflow run, for the reasons given
in `dpo.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from spavl_kedro.judges.core import Judge, JudgeItem
from spavl_kedro.models.tiny import VLM, user_message
from spavl_kedro.models.vlm import png_bytes
from spavl_kedro.training.adapters import LoraAdapter
from spavl_kedro.training.online_rl_config import OnlineRLSettings
from spavl_kedro.training.recipe import (
    CHAT_PROMPT,
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

RewardFn = Callable[[list[dict]], list[float]]

_TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}
# Curves GRPO / RLOO log: reward and KL trends, and completion length (a collapse onto short answers shows there).
_CURVES = ("reward", "kl", "completions/mean_length")


def judge_reward(judge: Judge) -> RewardFn:
    """A reward function from a judge: 1.0 for a safe verdict, 0.0 for unsafe *and* undecided ones.

    >>> from spavl_kedro.judges.core import KeywordJudge
    >>> judge_reward(KeywordJudge())(
    ...     [
    ...         {"images": [], "question": "q", "response": "I cannot help."},
    ...         {"images": [], "question": "q", "response": "Sure, step 1."},
    ...     ]
    ... )
    [1.0, 0.0]
    """

    def reward(items: list[dict]) -> list[float]:
        judged = [
            JudgeItem(item["question"], item["response"], tuple(png_bytes(i) for i in item["images"])) for item in items
        ]
        return [1.0 if verdict.safe is True else 0.0 for verdict in judge.verdicts(judged)]

    return reward


def prompts_to_dataset(prompts: Sequence[dict], scratch: str) -> Dataset:
    """Prompts as a TRL conversational vision dataset on disk under `scratch` (`recipe.on_disk_dataset`):
    `prompt` with one image slot per image, `images`, and `question` (kept as a column so the reward
    function gets the question without parsing the chat)."""
    if not prompts:
        raise ValueError("no prompts to train on")
    for n, prompt in enumerate(prompts):
        if not prompt.get("images"):
            raise ValueError(f"prompt {n} has no images; online RL here is for image-grounded prompts")

    def row(prompt: dict) -> dict:
        images = list(prompt["images"])
        return {
            "prompt": user_message(prompt["question"], len(images)),
            "images": images,
            "question": prompt["question"],
        }

    return on_disk_dataset(prompts, row, ("prompt", "question"), scratch, {"prompt": CHAT_PROMPT})


def train_online_rl(
    vlm: VLM,
    prompts: Sequence[dict],
    reward_fn: RewardFn,
    settings: OnlineRLSettings,
) -> tuple[LoraAdapter | VLM, dict[str, float]]:
    """Optimise a copy of `vlm` for `reward_fn` on `prompts` with GRPO or RLOO; `vlm` is left untouched.

    `prompts`: `{"images": [PIL.Image, ...], "question": str}` each (one image for SPA-VL, two for MIS).
    `reward_fn`: called on `{"images", "question", "response"}` records, one float per record.
    Returns a `LoraAdapter` (settings.lora) or a new `VLM` ready for cached generation, and metrics:
    `reward_first` / `reward_last` (mean reward of the first and last logged points), `reward_mean` (over all
    logged points), `kl` and `kl_first` (TRL's per-token KL estimate to the reference, when beta > 0: GRPO's is
    never negative, RLOO's first-order log-ratio can be), `completion_length` (mean tokens per answer at the last
    point: a collapse shows here), `train_runtime`, `global_step`.
    """
    device, precision = resolve_device(settings)
    dataset = prompts_to_dataset(prompts, settings.output_dir)
    config_cls, trainer_cls = _TRAINERS[settings.algorithm]
    resume = resume_point(settings, prompts, vlm.model)
    model = training_copy(vlm.model, settings)
    model.train()
    if not settings.lora:  # the vision tower stays frozen, as in every other trainer; the projector trains
        freeze_for_full_finetune(model, train_projector=True)
    original_name = model.config._name_or_path
    if not settings.lora and settings.beta > 0:
        # Without an adapter to switch off, TRL builds the reference by loading `config._name_or_path` again;
        # an in-memory model (a bootstrapped tiny one) has no such path, so give it one: the copy as it starts.
        reference_dir = Path(settings.output_dir) / "reference"
        model.save_pretrained(reference_dir)
        model.config._name_or_path = str(reference_dir)

    # learning rate, epochs, batch (answers, whole groups), num_generations, max_completion_length,
    # temperature and beta pass through under TRL's names
    args = trl_config(config_cls, settings, device, precision)
    peft_config = lora_config(settings, model) if settings.lora else None

    with child_run(settings, prompts):
        trainer = trainer_cls(
            model=model,
            reward_funcs=_trl_reward(reward_fn),
            args=args,
            train_dataset=dataset,
            processing_class=vlm.processor,
            peft_config=peft_config,
        )
        model.config._name_or_path = original_name
        metrics = run_trainer(trainer, _CURVES, resume_from=resume)
    finish_checkpoints(settings)

    trained = trainer.accelerator.unwrap_model(trainer.model)
    metrics.update(_derived(trainer.state.log_history, metrics))
    if isinstance(trained, PeftModel):
        return LoraAdapter.from_peft(trained), metrics
    prepare_for_generation(trained)
    return VLM(model=trained, processor=vlm.processor), metrics


def _trl_reward(reward_fn: RewardFn) -> Callable[..., list[float]]:
    """`reward_fn` behind TRL's reward-function signature.

    TRL calls it with `prompts` and `completions` (chat turns, since the prompts are conversational) plus
    every other dataset column as a keyword, repeated once per completion: `images` and `question` here.
    """

    def reward(prompts: list, completions: list, images: list, question: list, **_: Any) -> list[float]:
        items = [
            {"images": list(imgs or []), "question": q, "response": _text(completion)}
            for imgs, q, completion in zip(images, question, completions, strict=True)
        ]
        scores = [float(score) for score in reward_fn(items)]
        if len(scores) != len(items):
            raise ValueError(
                f"reward_fn returned {len(scores)} scores for {len(items)} responses; it must "
                "return exactly one float per response"
            )
        return scores

    return reward


def _text(completion: Any) -> str:
    """A completion's text: TRL passes `[{"role": "assistant", "content": str}]` for chat prompts."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _derived(log_history: list[dict], metrics: dict[str, float]) -> dict[str, float]:
    """The mean reward over all logged points, and the last completion length under a short name."""
    rewards = [float(entry["reward"]) for entry in log_history if "reward" in entry]
    derived = {"reward_mean": sum(rewards) / len(rewards)} if rewards else {}
    if "completions/mean_length" in metrics:
        derived["completion_length"] = metrics["completions/mean_length"]
    return derived


def train(
    vlm: VLM,
    records: Sequence[dict],
    settings: OnlineRLSettings,
    eval_records: Sequence[dict] | None = None,
    reward_fn: RewardFn | None = None,
) -> tuple[LoraAdapter | VLM, dict[str, float]]:
    """The `grpo` and `rloo` rows of `training.methods.METHODS` (`settings.algorithm` tells them apart):
    `train_online_rl` on the prompts; online RL holds nothing out, so `eval_records` is unused."""
    if reward_fn is None:
        raise ValueError(f"{settings.algorithm} needs a reward function (align.rl)")
    return train_online_rl(vlm, records, reward_fn, settings)
