"""SFT and reward-model backends on a tiny LLaVA: the signals move, two-image prompts work, artifacts round-trip.

One module-scoped world: a tiny LLaVA (TinyModelConfig defaults) bootstrapped briefly to answer harmful
questions with a refusal or a compliance, and synthetic PNG-style images (a colour field with noise squares).
"""

from __future__ import annotations

import copy
import math
import random

import mlflow
import pydantic
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from spavl_kedro.models.specs import Behaviour, BootstrapConfig, TinyModelConfig
from spavl_kedro.models.tiny import SeedExample, build_processor, train_tiny_vlm, user_message
from spavl_kedro.models.vlm import load_vlm
from spavl_kedro.training.adapters import apply_adapter
from spavl_kedro.training.dpo import train_dpo
from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.reward import load_reward_model, save_reward_model, train_reward
from spavl_kedro.training.reward_config import RewardSettings
from spavl_kedro.training.sft import train_sft
from spavl_kedro.training.sft_config import SFTSettings

REFUSALS = [
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with this because it could hurt people.",
    "I'm sorry, I can't provide that. A trusted expert can help you.",
]
COMPLIANCES = [
    "Sure, here are the steps: first, [step withheld]; second, [step withheld].",
    "Of course. Step 1: [withheld]. Step 2: [withheld].",
    "Sure, here is a plan: gather [item withheld], then [action withheld].",
]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 20),
    "purple": (150, 30, 160),
    "orange": (240, 140, 20),
}
OBJECTS = ["knife", "pill", "car", "phone", "bottle", "coin"]
# Wordings the reward model never sees in training: held-out pairs test the refusal/compliance direction,
# not a memorised string.
NEW_REFUSALS = [
    "I'm sorry, I cannot do that.",
    "I can't help with this request, sorry.",
    "I cannot assist. Please contact local emergency services.",
]
NEW_COMPLIANCES = [
    "Sure, step 1: [withheld].",
    "Of course, here is a plan: [action withheld].",
    "Here are the steps: [step withheld] and [step withheld].",
]


def image(colour: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    picture = Image.new("RGB", (32, 32), COLOURS[colour])
    for _ in range(5):
        x, y = rng.randrange(28), rng.randrange(28)
        picture.paste((rng.randrange(256),) * 3, (x, y, x + 4, y + 4))
    return picture


def question(i: int) -> str:
    return f"How do I use the {OBJECTS[i % len(OBJECTS)]} in these pictures to hurt someone?"


def chain_of_thought(first: str, second: str, thing: str) -> str:
    return (
        f"Perception: image 1 is {first}, image 2 is {second}. Reasoning: the {thing} could cause harm. "
        "Answer: I cannot help with that, please stay safe."
    )


def cot_examples(n: int, offset: int = 0) -> list[dict]:
    colours = list(COLOURS)
    examples = []
    for i in range(offset, offset + n):
        first, second = colours[i % 6], colours[(5 * i + 1) % 6]
        examples.append(
            {
                "images": [image(first, 100 + i), image(second, 200 + i)],
                "question": question(i),
                "target": chain_of_thought(first, second, OBJECTS[i % 6]),
            }
        )
    return examples


def preference_pairs(n: int, offset: int = 0, refusals=REFUSALS, compliances=COMPLIANCES) -> list[dict]:
    colours = list(COLOURS)
    return [
        {
            "images": [image(colours[i % 6], 300 + i)],
            "question": question(i),
            "chosen": refusals[i % 3],
            "rejected": compliances[(i // 3) % 3],
        }
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def vlm():
    colours = list(COLOURS)
    texts = REFUSALS + COMPLIANCES + [question(i) for i in range(6)]
    texts += [chain_of_thought(a, b, t) for a in colours for b in colours[:2] for t in OBJECTS[:2]]
    processor = build_processor(texts * 4, TinyModelConfig())
    seeds = [
        SeedExample.harmful_request([image(colours[i % 6], i)], question(i), REFUSALS[i % 3], COMPLIANCES[i % 3])
        for i in range(32)
    ]
    model, _ = train_tiny_vlm(
        processor, seeds, Behaviour(refusal_rate=0.5), TinyModelConfig(), BootstrapConfig(epochs=8), seed=0
    )
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _inputs(vlm, example) -> dict:
    prompt = vlm.processor.apply_chat_template(
        user_message(example["question"], len(example["images"])), add_generation_prompt=True
    )
    return vlm.processor(text=[prompt], images=example["images"], return_tensors="pt")


def _next_token_logits(vlm, example) -> torch.Tensor:
    with torch.inference_mode():
        return vlm.model(**_inputs(vlm, example)).logits[0, -1]


@pytest.mark.slow
def test_full_sft_on_two_image_chain_of_thought_lowers_loss(vlm, tmp_path):
    before = _state(vlm.model)
    settings = SFTSettings(output_dir=str(tmp_path), report_to=[], num_train_epochs=5, learning_rate=2e-3)
    policy, adapter, metrics = train_sft(vlm, cot_examples(32), settings, eval_examples=cot_examples(8, offset=32))
    assert adapter is None
    assert metrics["global_step"] == 20  # 32 examples / batch 8 x 5 epochs
    # measured: ~6.2 -> ~2.8 (the bootstrapped model expects a refusal or a compliance, not a chain of thought)
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"]
    assert metrics["eval_loss"] < 0.6 * metrics["loss_first"]  # it generalises to unseen image pairs
    assert not policy.model.training and policy.model.generation_config.use_cache
    # the caller's model is untouched; the policy is a different, trained one that still generates
    assert all(torch.equal(before[k], v) for k, v in vlm.model.state_dict().items())
    example = cot_examples(1)[0]
    assert not torch.equal(_next_token_logits(policy, example), _next_token_logits(vlm, example))
    inputs = _inputs(policy, example)
    out = policy.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_lora_sft_returns_an_adapter_that_reproduces_the_policy(vlm, tmp_path):
    settings = SFTSettings(output_dir=str(tmp_path), report_to=[], lora=True, num_train_epochs=1, learning_rate=2e-3)
    policy, adapter, metrics = train_sft(vlm, cot_examples(16), settings)
    assert adapter is not None and metrics["global_step"] == 2
    assert all(".mlp." in key and "language_model" in key for key in adapter.state_dict)
    rebuilt = apply_adapter(vlm, adapter)
    example = cot_examples(1, offset=40)[0]
    torch.testing.assert_close(_next_token_logits(rebuilt, example), _next_token_logits(policy, example))
    assert not torch.allclose(_next_token_logits(policy, example), _next_token_logits(vlm, example))


@pytest.fixture(scope="module")
def reward(vlm):
    settings = RewardSettings(report_to=[], learning_rate=1e-3, num_train_epochs=3)
    held_out = preference_pairs(18, offset=48, refusals=NEW_REFUSALS, compliances=NEW_COMPLIANCES)
    return train_reward(vlm, preference_pairs(48), settings, eval_pairs=held_out)


@pytest.mark.slow
def test_reward_model_prefers_refusals_on_held_out_pairs(reward):
    model, metrics = reward
    assert metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # zero head: every pair starts tied
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]  # measured ~0.12
    assert metrics["train_accuracy"] > 0.9
    # held out: new images and response wordings never trained on (measured: accuracy 1.0, margin ~1.7)
    assert metrics["eval_accuracy"] > 0.6
    assert metrics["eval_margin"] > 0.5


@pytest.mark.slow
def test_dpo_prefers_the_chosen_answer_of_held_out_pairs(vlm, tmp_path):
    """DPO's implicit reward (beta x the policy-to-reference log-ratio) on pairs it never trained on: new
    images and response wordings. Before training the policy is the reference, every margin is 0 and the
    accuracy (chosen strictly above rejected) is 0; after it, the chosen answer is preferred."""
    held_out = preference_pairs(18, offset=48, refusals=NEW_REFUSALS, compliances=NEW_COMPLIANCES)
    settings = DPOSettings(output_dir=str(tmp_path), report_to=[], learning_rate=1e-3, num_train_epochs=3)
    _, metrics = train_dpo(vlm, preference_pairs(48), settings, eval_pairs=held_out)
    assert metrics["eval_rewards/accuracies"] > 0.75, metrics
    assert metrics["eval_rewards/margins"] > 0, metrics


def test_reward_model_round_trips_through_its_directory(reward, tmp_path):
    model, _ = reward
    pairs = preference_pairs(6, offset=48, refusals=NEW_REFUSALS, compliances=NEW_COMPLIANCES)
    items = [
        {"images": p["images"], "question": p["question"], "response": p[key]}
        for p in pairs
        for key in ("chosen", "rejected")
    ]
    save_reward_model(model, str(tmp_path / "rm"))
    loaded = load_reward_model(str(tmp_path / "rm"))
    assert loaded.score(items) == pytest.approx(model.score(items), abs=1e-6)
    # batching (and its padding) does not change a score
    assert model.score(items, batch_size=1) == pytest.approx(model.score(items), abs=1e-5)


@pytest.mark.slow
def test_training_curves_go_to_child_runs_under_the_active_run(vlm, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read by transformers' MLflowCallback
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_name="pipeline") as parent:
            train_sft(
                vlm,
                cot_examples(8),
                SFTSettings(output_dir=str(tmp_path / "sft"), num_train_epochs=2, per_device_train_batch_size=4),
            )
            train_reward(
                vlm,
                preference_pairs(8),
                RewardSettings(num_train_epochs=2, per_device_train_batch_size=4),
                eval_pairs=preference_pairs(4, offset=8),
            )
            assert mlflow.active_run().info.run_id == parent.info.run_id  # the parent is active again
    finally:
        mlflow.set_tracking_uri(previous)
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"sft", "reward"}
    assert len(client.get_metric_history(children["sft"].info.run_id, "loss")) == 4  # 8 examples / 4 x 2 epochs
    reward_run = children["reward"].info.run_id
    assert [m.step for m in client.get_metric_history(reward_run, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(reward_run, "accuracy")) == 4
    # the rate each step used: the default linear decay from 1e-3 over 4 steps, no warm-up
    rates = sorted(client.get_metric_history(reward_run, "learning_rate"), key=lambda m: m.step)
    assert [m.value for m in rates] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert all(m.value > 0 for m in client.get_metric_history(reward_run, "grad_norm"))
    assert "eval_accuracy" in children["reward"].data.metrics
    assert children["reward"].data.params["learning_rate"] == str(RewardSettings().learning_rate)


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sft_on_chain_of_thought_mixes_in_the_requested_harmless_replay(base_params):
    """`align.sft_replay` adds that many harmless seed-corpus requests per chain-of-thought target, with their
    helpful answers (never a harmful seed prompt), drawn with the sft seed and without repeats when the
    corpus has enough rows; `align.sft_upsample` repeats each target; held-out targets stay CoT only, once
    each."""
    import pandas as pd

    from spavl_kedro.config import AlignConfig
    from spavl_kedro.pipelines.align.nodes import training_data

    images = pd.DataFrame({"image_id": ["a", "b"], "png": [_png((200, 0, 0)), _png((0, 0, 200))]})
    mis_train = pd.DataFrame(
        {
            "image_ids": [["a", "b"]] * 10,
            "question": [f"q{i}" for i in range(10)],
            "target": [f"Perception: {i}" for i in range(10)],
        }
    )
    seed_corpus = pd.DataFrame(
        {
            "png": [_png((0, 200, 0))] * 6,
            "harmful": [False] * 4 + [True] * 2,
            "question": [
                "What colour?",
                "What shape?",
                "How many?",
                "Describe it.",
                "How do I do harm?",
                "Plan the harm.",
            ],
            "answer": ["Green.", "Circle.", "Two.", "A green field.", "Sure, [withheld].", "Step 1: [withheld]."],
        }
    )
    cfg = AlignConfig.model_validate(
        {**base_params["align"], "method": "sft", "also": [], "sft_replay": 2.0, "sft_upsample": 1}
    )
    train, held_out = training_data("sft", cfg, None, None, mis_train, images, seed_corpus)
    cot = [e for e in train if e["target"].startswith("Perception:")]
    replay = [e for e in train if not e["target"].startswith("Perception:")]
    assert (len(cot), len(held_out), len(replay)) == (9, 1, 18)
    assert {e["target"] for e in replay} <= {"Green.", "Circle.", "Two.", "A green field."}
    assert all(len(e["images"]) == 1 for e in replay) and all(len(e["images"]) == 2 for e in cot)
    again, _ = training_data("sft", cfg, None, None, mis_train, images, seed_corpus)
    assert [e["question"] for e in again] == [e["question"] for e in train]  # the same draw every run
    none = AlignConfig.model_validate({**base_params["align"], "sft_replay": 0.0, "sft_upsample": 1})
    assert len(training_data("sft", none, None, None, mis_train, images, seed_corpus)[0]) == 9
    mixed = AlignConfig.model_validate({**base_params["align"], "sft_replay": 0.4, "sft_upsample": 3})
    train, held_out = training_data("sft", mixed, None, None, mis_train, images, seed_corpus)
    cot = [e["question"] for e in train if e["target"].startswith("Perception:")]
    replay = [e["question"] for e in train if not e["target"].startswith("Perception:")]
    assert len(cot) == 27 and all(cot.count(q) == 3 for q in set(cot)) and len(held_out) == 1
    assert sorted(replay) == sorted(["What colour?", "What shape?", "How many?", "Describe it."])  # 4 distinct
    with pytest.raises(ValueError, match="sft_replay is above 0 but the seed corpus has no harmless requests"):
        training_data("sft", cfg, None, None, mis_train, images, seed_corpus[seed_corpus["harmful"]])


@pytest.fixture(scope="module")
def half_checkpoint(vlm, tmp_path_factory):
    """The tiny policy saved in float16, as llava-hf records LLaVA-1.5, and loaded back as transformers 5
    loads any checkpoint: in its own dtype."""
    path = tmp_path_factory.mktemp("fp16")
    copy.deepcopy(vlm.model).half().save_pretrained(path)
    vlm.processor.save_pretrained(path)
    loaded = load_vlm(str(path))
    assert next(loaded.model.parameters()).dtype == torch.float16  # otherwise this test proves nothing
    return loaded


@pytest.mark.parametrize("method", ["sft", "sft_lora", "dpo", "dpo_lora", "reward"])
def test_a_float16_checkpoint_never_trains_in_float16(half_checkpoint, method, tmp_path):
    """AdamW on fp16 weights drops small updates (lr 1e-6 on a 7B full fine-tune is below fp16's resolution):
    every trainer casts its copy to `weights_dtype`, float32 by default, and says what the optimiser held."""
    lora = method.endswith("_lora")
    common = {"report_to": [], "output_dir": str(tmp_path), "num_train_epochs": 1, "lora": lora}
    if method.startswith("sft"):
        _, _, metrics = train_sft(half_checkpoint, cot_examples(8), SFTSettings(**common, learning_rate=1e-3))
    elif method.startswith("dpo"):
        _, metrics = train_dpo(
            half_checkpoint, preference_pairs(8), DPOSettings(**common, per_device_train_batch_size=4)
        )
    else:
        _, metrics = train_reward(half_checkpoint, preference_pairs(8), RewardSettings(**common))
    assert metrics["optimiser_dtypes"] == "float32", metrics
    assert math.isfinite(metrics["train_loss"])
    assert next(half_checkpoint.model.parameters()).dtype == torch.float16  # the caller's model is untouched


def test_bfloat16_weights_are_a_deliberate_choice_and_float16_is_refused(half_checkpoint, tmp_path):
    settings = SFTSettings(report_to=[], output_dir=str(tmp_path), num_train_epochs=1, weights_dtype="bfloat16")
    _, _, metrics = train_sft(half_checkpoint, cot_examples(8), settings)
    assert metrics["optimiser_dtypes"] == "bfloat16"
    with pytest.raises(pydantic.ValidationError, match="weights_dtype"):
        SFTSettings(output_dir=str(tmp_path), weights_dtype="float16")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo_lora", "reward"])
def test_activation_checkpointing_is_a_recipe_field_that_changes_memory_not_the_result(vlm, method, tmp_path):
    """Every method takes `activation_checkpointing`; the trainer really recomputes (its model says so) and
    the losses are those of the run that keeps its activations."""

    def run(checkpointing: bool) -> dict:
        common = {
            "report_to": [],
            "output_dir": str(tmp_path),
            "num_train_epochs": 1,
            "lora": method.endswith("_lora"),
            "activation_checkpointing": checkpointing,
        }
        if method == "sft":
            return train_sft(vlm, cot_examples(8), SFTSettings(**common, learning_rate=1e-3))[2]
        if method == "dpo_lora":
            return train_dpo(vlm, preference_pairs(8), DPOSettings(**common, per_device_train_batch_size=4))[1]
        return train_reward(vlm, preference_pairs(8), RewardSettings(**common))[1]

    kept, recomputed = run(False), run(True)
    assert (kept["activation_checkpointing"], recomputed["activation_checkpointing"]) == (False, True)
    assert recomputed["train_loss"] == pytest.approx(kept["train_loss"], rel=1e-4)


def _record_optimiser_steps(run) -> tuple[list[float], list[float]]:
    """The learning rate and the global gradient norm (after any clipping) each optimiser step saw, while
    `run()` trains."""
    rates, norms = [], []

    def hook(optimizer, args, kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return rates, norms


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_a_frozen_vision_tower_keeps_its_weights_while_the_head_and_language_model_train(vlm, frozen):
    before = _state(vlm.model)
    settings = RewardSettings(
        report_to=[], num_train_epochs=1, per_device_train_batch_size=4, freeze_vision_tower=frozen
    )
    model, metrics = train_reward(vlm, preference_pairs(16), settings)  # 4 steps

    after = model.backbone.state_dict()
    moved = {
        part: any(not torch.equal(after[k], before[k]) for k in before if k.startswith(part))
        for part in ("model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head")
    }
    # the tower is bit-identical only because it was frozen: trainable, the same run moves it
    assert moved == {
        "model.vision_tower": not frozen,
        "model.multi_modal_projector": True,
        "model.language_model": True,
        "lm_head": False,
    }
    assert not model.backbone.lm_head.weight.requires_grad  # never handed to the optimiser
    assert model.head.weight.abs().sum() > 0 and metrics["loss_last"] < metrics["loss_first"]  # the zero head learned


@pytest.mark.slow
def test_constant_with_warmup_rises_then_holds_the_learning_rate(vlm):
    """SPA-VL's schedule (constant_with_warmup): a linear warm-up over the first ceil(0.25 x 8) = 2 of 8 steps,
    then the peak for every later step, where the default `linear` decays to zero."""

    def rates(scheduler: str) -> list[float]:
        settings = RewardSettings(
            report_to=[],
            num_train_epochs=1,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            lr_scheduler_type=scheduler,
            warmup_steps=0.25,
        )
        return _record_optimiser_steps(lambda: train_reward(vlm, preference_pairs(16), settings))[0]

    constant = rates("constant_with_warmup")
    assert len(constant) == 8
    assert constant[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # transformers' warm-up starts from 0
    assert constant[2:] == [1e-3] * 6
    linear = rates("linear")
    assert linear[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert linear[2:] == pytest.approx([1e-3 * (8 - s) / 6 for s in range(2, 8)])  # the decay the paper avoids
    with pytest.raises(pydantic.ValidationError, match="write warmup_steps: 0.03"):
        RewardSettings(warmup_ratio=0.03)  # SPA-VL's flag name, which transformers 5 dropped


@pytest.mark.slow
def test_max_grad_norm_clips_every_update(vlm):
    def norms(max_grad_norm: float) -> list[float]:
        settings = RewardSettings(
            report_to=[], num_train_epochs=1, per_device_train_batch_size=4, max_grad_norm=max_grad_norm
        )
        return _record_optimiser_steps(lambda: train_reward(vlm, preference_pairs(16), settings))[1]

    unclipped, clipped = norms(0), norms(0.01)
    # The first step is the same in both runs (same weights, same batch): its norm is well above 0.01, and
    # clipping brings it down to exactly 0.01; no later step exceeds it.
    assert unclipped[0] > 0.05
    assert clipped[0] == pytest.approx(0.01, rel=1e-4)
    assert len(clipped) == 4 and max(clipped) <= 0.01 * (1 + 1e-4)
