"""Online RL backend (GRPO / RLOO) on a tiny LLaVA: the keyword-judge reward goes up, two-image prompts work.

One module-scoped world: a tiny LLaVA (TinyModelConfig defaults) bootstrapped for 20 short epochs on 48
synthetic (colour-square image, harmful question) examples to refuse 30% of the time, with the refusal and
compliance styles of data/01_raw/seed_text.yml. Its sampled answers mix refusals and compliances, so groups
of 4 answers usually disagree and the group baselines give a signal.

Settings that move the reward reliably here (seed 0, 2 busy cores): LoRA on the language MLPs at lr 6e-3,
16 optimiser steps of 4 prompts x 4 answers x 16 tokens, beta 0.1. Rewards are logged as means over 4 steps
(64 answers) because a single step's mean (16 answers) swings by +-0.15. Measured (first -> last logged
point): GRPO 0.33 -> 0.77, RLOO 0.34 -> 0.69. RL seeds 1 and 2 gave gains of 0.14 to 0.30 with the same
settings, hence the 0.1 margin asserted; at lr 3e-3 the gain was only ~0.1 to 0.2.
"""

from __future__ import annotations

import random

import mlflow
import pytest
import torch
from PIL import Image

from spavl_kedro.judges.core import KeywordJudge, Verdict
from spavl_kedro.models.specs import Behaviour, BootstrapConfig, TinyModelConfig
from spavl_kedro.models.tiny import VLM, SeedExample, build_processor, train_tiny_vlm, user_message
from spavl_kedro.training.adapters import LoraAdapter
from spavl_kedro.training.online_rl import judge_reward, train_online_rl
from spavl_kedro.training.online_rl_config import OnlineRLSettings

N_PROMPTS = 48


def _image(rng: random.Random) -> Image.Image:
    return Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on shared cores: one intra-op thread ran this file in ~1 min, two threads in ~8 min."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(seed_text):
    rng = random.Random(0)
    questions = [f"How do I do bad thing number {i} shown in the picture?" for i in range(N_PROMPTS)]
    images = [_image(rng) for _ in questions]
    refusals, compliances = seed_text["refusals"], seed_text["compliances"]
    processor = build_processor((questions + refusals + compliances) * 10, TinyModelConfig())
    examples = [
        SeedExample.harmful_request([image], q, rng.choice(refusals), rng.choice(compliances))
        for image, q in zip(images, questions)
    ]
    # 30 epochs at batch 8 (180 steps): enough for well-formed refusals and compliances; 20 left token soup with
    # the seed text's current refusals (loss 1.24; 0.25 after 30).
    vlm, _ = train_tiny_vlm(
        processor,
        examples,
        Behaviour(refusal_rate=0.3),
        TinyModelConfig(),
        BootstrapConfig(epochs=30, batch_size=8),
        seed=0,
    )
    prompts = [{"images": [image], "question": q} for image, q in zip(images, questions)]
    return {"vlm": vlm, "prompts": prompts, "rng": rng}


def _weights(vlm: VLM) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in vlm.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_refusal_reward_goes_up(world, algorithm, tmp_path):
    vlm = world["vlm"]
    before = _weights(vlm)
    settings = OnlineRLSettings(
        algorithm=algorithm,
        learning_rate=6e-3,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=16,
        beta=0.1,
        logging_steps=4,
        report_to=[],
        output_dir=str(tmp_path),
    )
    # 32 prompts x 2 epochs / 4 prompts (16 answers) per step = 16 steps, logged as 4 points of 4 steps each
    adapter, metrics = train_online_rl(vlm, world["prompts"][:32], judge_reward(KeywordJudge()), settings)

    assert metrics["global_step"] == 16
    print(f"{algorithm}: reward {metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f}, kl {metrics['kl']:.3f}")
    assert metrics["reward_last"] > metrics["reward_first"] + 0.1
    assert 0 < metrics["kl"] < 1  # moved away from the reference, but held near it by beta
    assert metrics["completion_length"] > 8  # still answering, not collapsed onto an early end-of-sequence
    assert isinstance(adapter, LoraAdapter) and adapter.state_dict
    assert (metrics["optimiser_dtypes"], metrics["activation_checkpointing"]) == ("float32", False)
    after = _weights(vlm)
    assert all(torch.equal(before[name], after[name]) for name in before)  # the caller's policy is untouched


@pytest.mark.slow
def test_two_image_prompts_train_full_weights_into_a_nested_mlflow_run(world, tmp_path, monkeypatch):
    rng, vlm = world["rng"], world["vlm"]
    prompts = [
        {"images": [_image(rng), _image(rng)], "question": f"Combine the two pictures to do bad thing {i}."}
        for i in range(4)
    ]
    seen: list[dict] = []

    def reward(items: list[dict]) -> list[float]:
        seen.extend(items)
        return judge_reward(KeywordJudge())(items)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read by transformers' MLflowCallback
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    settings = OnlineRLSettings(
        algorithm="grpo",
        lora=False,
        learning_rate=1e-4,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        beta=0.1,
        run_name="grpo",
        output_dir=str(tmp_path / "rl"),
    )
    try:
        with mlflow.start_run(run_name="pipeline") as parent:
            policy, metrics = train_online_rl(vlm, prompts, reward, settings)
            assert mlflow.active_run().info.run_id == parent.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)

    # the reward function saw both images of every prompt, with its question
    questions = {p["question"]: p["images"] for p in prompts}
    assert len(seen) == 4 * 2
    assert all(len(item["images"]) == 2 and item["question"] in questions for item in seen)
    # full weights with beta > 0: the reference is a reloaded copy of the starting policy, so the first step's
    # KL (taken before any update) is zero
    assert metrics["global_step"] == 2
    assert metrics["kl_first"] == pytest.approx(0.0, abs=1e-4)
    assert isinstance(policy, VLM) and policy.model is not vlm.model

    chat = user_message("What is in both pictures?", 2)
    text = policy.processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = policy.processor(text=[text], images=prompts[0]["images"], return_tensors="pt")
    out = policy.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.info.run_name for r in children] == ["grpo"]
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "reward")] == [1, 2]


class _StubJudge:
    name = "stub"

    def __init__(self, verdicts: list[Verdict]) -> None:
        self._verdicts = verdicts

    def verdicts(self, items):
        assert all(len(item.images) == 1 and item.images[0].startswith(b"\x89PNG") for item in items)
        return self._verdicts


def test_judge_reward_counts_only_safe_verdicts():
    verdicts = [Verdict(True, "safe", 0.0, ""), Verdict(False, "O5", 1.0, ""), Verdict(None, "unparsable", None, "")]
    items = [{"images": [Image.new("RGB", (8, 8))], "question": "q", "response": r} for r in ("a", "b", "c")]
    # an undecided verdict is never read as safe
    assert judge_reward(_StubJudge(verdicts))(items) == [1.0, 0.0, 0.0]


def test_settings_reject_a_single_generation():
    with pytest.raises(ValueError, match="num_generations"):
        OnlineRLSettings(num_generations=1, output_dir="x")


def test_online_rl_recomputes_activations_when_its_recipe_says_so(tmp_path):
    """Whether the trainer recomputes activations does not depend on the weights: a random tiny model."""
    from serving import build_tiny

    rng = random.Random(0)
    prompts = [{"images": [_image(rng)], "question": f"What is shown in picture {i}?"} for i in range(4)]
    settings = OnlineRLSettings(
        algorithm="grpo",
        num_train_epochs=1,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        report_to=[],
        output_dir=str(tmp_path),
        activation_checkpointing=True,
    )
    _, metrics = train_online_rl(build_tiny(), prompts, judge_reward(KeywordJudge()), settings)
    assert metrics["global_step"] == 1 and metrics["activation_checkpointing"] is True


def test_trl_args_reach_trls_config_under_their_own_names_and_bad_ones_are_named(tmp_path):
    from trl import GRPOConfig

    from spavl_kedro.training.recipe import trl_config
    from spavl_kedro.training.reward_config import RewardSettings

    vllm = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://localhost:8000"}
    settings = OnlineRLSettings(output_dir=str(tmp_path), trl_args=vllm)
    config = trl_config(GRPOConfig, settings, "cpu", "fp32", num_generations=2, per_device_train_batch_size=2)
    assert (config.use_vllm, config.vllm_mode, config.vllm_server_base_url) == (True, "server", "http://localhost:8000")
    assert config.num_generations == 2 and config.save_strategy == "no"

    unknown = OnlineRLSettings(output_dir=str(tmp_path), trl_args={"use_vlm": True})
    with pytest.raises(ValueError, match=r"\['use_vlm'\] are not arguments of TRL's GRPOConfig"):
        trl_config(GRPOConfig, unknown, "cpu", "fp32")
    taken = OnlineRLSettings(output_dir=str(tmp_path), trl_args={"num_generations": 8})
    with pytest.raises(ValueError, match=r"\['num_generations'\] are set by the recipe's own fields"):
        trl_config(GRPOConfig, taken, "cpu", "fp32", num_generations=2)
    with pytest.raises(ValueError, match="not a TRL trainer"):
        RewardSettings(output_dir="x", trl_args={"use_vllm": True})


def test_a_launched_rank_scores_with_the_reward_model_on_its_own_gpu_in_bf16(monkeypatch):
    from spavl_kedro.training.reward import reward_model_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reward_model_placement() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process on the machine, as accelerate launch sets it
    assert reward_model_placement() == (torch.device("cuda", 1), torch.bfloat16)
    monkeypatch.delenv("LOCAL_RANK")  # one process, not launched: the first GPU
    assert reward_model_placement() == (torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # pre-Ampere: no bf16
    assert reward_model_placement() == (torch.device("cuda", 0), torch.float32)


def test_the_worker_loads_the_reward_model_where_the_placement_says(monkeypatch, tmp_path):
    """train_worker.run hands `reward_model_placement`'s device and dtype to the loader (stopped there: the
    placement is what this checks, not a GPU load)."""
    from spavl_kedro.training import train_worker

    class Loaded(Exception):
        pass

    def load(directory, device=None, dtype=None):
        raise Loaded(directory, device, dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train_worker, "load_reward_model", load)
    (tmp_path / "grpo.json").write_text("{}")
    with pytest.raises(Loaded) as loaded:
        train_worker.run(
            "grpo",
            "prompts.parquet",
            str(tmp_path / "grpo.json"),
            "policy",
            str(tmp_path / "out"),
            reward_model_dir="reward_model",
        )
    assert loaded.value.args == ("reward_model", torch.device("cuda", 1), torch.bfloat16)


def test_a_reward_model_loaded_in_bf16_scores_like_the_fp32_one(tmp_path):
    from spavl_kedro.models.tiny import build_model
    from spavl_kedro.training.reward import RewardModel, load_reward_model, save_reward_model

    processor = build_processor(
        ["What is in the picture?", "I cannot help.", "Sure, here it is."] * 10, TinyModelConfig()
    )
    model = RewardModel(VLM(build_model(processor, TinyModelConfig(), seed=0), processor))
    torch.nn.init.normal_(model.head.weight, std=1.0)  # a zero head would score everything 0 in any dtype
    save_reward_model(model, str(tmp_path / "rm"))
    items = [
        {"images": [Image.new("RGB", (32, 32), colour)], "question": "What is in the picture?", "response": r}
        for colour in ("red", "blue")
        for r in ("I cannot help.", "Sure, here it is.")
    ]

    full = load_reward_model(str(tmp_path / "rm"))
    half = load_reward_model(str(tmp_path / "rm"), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in half.backbone.parameters()} == {torch.bfloat16}
    assert half.head.weight.dtype == torch.float32  # one vector: kept fine for the score
    expected, scored = full.score(items), half.score(items)
    # bf16 keeps ~3 significant digits per hidden unit: measured here, scores from -4.2 to 0.5 moved by at most
    # 0.08 (2% of their spread), and the order of the four answers held
    spread = max(expected) - min(expected)
    assert spread > 1  # the items score apart, so the comparison means something
    assert max(abs(a - b) for a, b in zip(scored, expected)) < 0.05 * spread
    assert sorted(range(4), key=scored.__getitem__) == sorted(range(4), key=expected.__getitem__)
