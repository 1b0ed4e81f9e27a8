"""Every method across two CPU processes (torchrun, DDP over gloo) against one process with the same
effective batch.

A tiny LLaVA is bootstrapped for two epochs and saved with 32 preference pairs; the worker then trains once
in this process (batch 8) and once as two ranks (batch 4 each, gradients averaged by DDP). DPO, SFT and the
reward model see the same 8 records per optimiser step either way, so the runs differ only in float
summation order: measured |loss difference| ~1e-7 on this machine, asserted below 1e-5. GRPO and RLOO
sample their answers, and two ranks sample from two random streams, so their losses cannot agree token for
token; for them the test checks the two-process run trains the same steps on the same prompts and that its
reward comes from the reward model. The full fine-tune and projector options are checked here too,
in-process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from spavl_kedro.models import tiny
from spavl_kedro.models.vlm import load_vlm
from spavl_kedro.training.adapters import apply_adapter
from spavl_kedro.training.dpo import train_dpo
from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.reward import save_reward_model, train_reward
from spavl_kedro.training.reward_config import RewardSettings
from spavl_kedro.training.train_worker import METRICS_FILE, launch, load_records, run, save_records

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

PAIRS = 32
TOLERANCE = 1e-5  # measured ~1e-7; fp32 reductions in another order, nothing more
REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here are the steps: first, [step withheld]."
TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A saved tiny LLaVA (half the default widths: the test is about processes, not quality) and pairs."""
    root = tmp_path_factory.mktemp("dpo_ddp")
    rng = random.Random(0)
    config = tiny.TinyModelConfig(text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1)
    processor = tiny.build_processor([REFUSAL, COMPLIANCE, "Question about the keyword?"] * 30, config)
    images = [Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), 80)) for _ in range(PAIRS)]
    questions = [f"Question {i} about the keyword?" for i in range(PAIRS)]
    examples = [
        tiny.SeedExample.harmful_request([image], question, REFUSAL, COMPLIANCE)
        for image, question in zip(images, questions)
    ]
    vlm, _ = tiny.train_tiny_vlm(
        processor, examples, tiny.Behaviour(refusal_rate=0.3), config, tiny.BootstrapConfig(epochs=2), seed=0
    )
    vlm.model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    pairs = [
        {"images": [image], "question": question, "chosen": REFUSAL, "rejected": COMPLIANCE}
        for image, question in zip(images, questions)
    ]
    save_records(pairs, "dpo", root / "pairs.parquet")
    save_records(pairs, "reward", root / "reward.parquet")
    save_records([{**pair, "target": REFUSAL} for pair in pairs], "sft", root / "sft.parquet")
    save_records(pairs[:8], "grpo", root / "grpo.parquet")
    save_records(pairs[:8], "rloo", root / "rloo.parquet")
    reward_model, _ = train_reward(
        vlm, pairs[:8], RewardSettings(output_dir=str(root / "rm"), report_to=[], num_train_epochs=1)
    )
    save_reward_model(reward_model, str(root / "reward_model"))
    return root


def _settings(root: Path, name: str, batch_size: int, **extra) -> Path:
    # lr 1e-3 so that four steps move the loss visibly away from ln 2 (a run that did nothing would match too)
    path = root / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "num_train_epochs": 1,
                "per_device_train_batch_size": batch_size,
                "learning_rate": 1e-3,
                "report_to": [],
                **extra,
            }
        )
    )
    return path


def _two_ranks(workdir: Path, method: str, records: str, settings: Path, out: str, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank on two cores
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "spavl_kedro.training.train_worker",
        "--method",
        method,
        "--records",
        str(workdir / records),
        "--settings",
        str(settings),
        "--model",
        str(workdir / "model"),
        "--out",
        str(workdir / out),
        *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # torchrun fails if either rank fails
    return json.loads((workdir / out / METRICS_FILE).read_text())


def test_two_cpu_processes_match_one_process(workdir):
    one = run(
        "dpo",
        str(workdir / "pairs.parquet"),
        str(_settings(workdir, "one", 8)),
        str(workdir / "model"),
        str(workdir / "out_one"),
    )
    two = _two_ranks(workdir, "dpo", "pairs.parquet", _settings(workdir, "two", 4), "out_two")

    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert (one["distributed"], two["distributed"]) == ("NO", "MULTI_CPU")  # DDP over gloo, not one process
    assert one["global_step"] == two["global_step"] == PAIRS / 8
    assert one["loss"] < 0.68  # learned: the DPO loss starts at ln 2 = 0.693
    for key in ("loss", "train_loss", "rewards/margins", "rewards/chosen"):
        assert abs(one[key] - two[key]) < TOLERANCE, (key, one[key], two[key])
    adapter_one = load_file(workdir / "out_one" / "adapter_model.safetensors")
    adapter_two = load_file(workdir / "out_two" / "adapter_model.safetensors")
    assert adapter_one.keys() == adapter_two.keys()
    for key, weight in adapter_one.items():
        torch.testing.assert_close(weight, adapter_two[key], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_projector_trains_and_vision_tower_stays_frozen(workdir, tmp_path, lora):
    vlm = load_vlm(str(workdir / "model"))
    before = {name: weight.clone() for name, weight in vlm.model.state_dict().items()}
    settings = DPOSettings(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=1e-3, report_to=[], lora=lora, train_projector=True
    )
    model, metrics = train_dpo(vlm, load_records(workdir / "pairs.parquet", "dpo")[:16], settings)

    trained = model.merge_and_unload() if lora else model
    after = trained.state_dict()
    moved = {
        part: any(not torch.equal(after[k], before[k]) for k in before if k.startswith(part))
        for part in ("model.vision_tower", "model.multi_modal_projector", "model.language_model")
    }
    assert moved == {"model.vision_tower": False, "model.multi_modal_projector": True, "model.language_model": True}
    assert all(torch.equal(weight, before[name]) for name, weight in vlm.model.state_dict().items())  # untouched
    assert (metrics["device"], metrics["precision"]) == ("cpu", "fp32")


def test_launch_from_a_node_runs_two_processes_and_logs_under_the_active_run(workdir, tmp_path, monkeypatch):
    """align.launch's path: accelerate launch with the CPU twin of the paper's DDP config, from inside a run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("launch")
    vlm = load_vlm(str(workdir / "model"))
    pairs = load_records(workdir / "pairs.parquet", "dpo")
    settings = DPOSettings(
        output_dir=str(tmp_path / "work"),
        num_train_epochs=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        run_name="dpo-2proc",
    )
    with mlflow.start_run(run_name="kedro") as parent:
        adapter, metrics = launch(
            "dpo", vlm, pairs, settings, str(ROOT / "conf/base/accelerate/cpu_2proc.yaml"), eval_records=pairs[:8]
        )

    assert (metrics["num_processes"], metrics["distributed"]) == (2, "MULTI_CPU")
    assert metrics["global_step"] == PAIRS / 8  # 4 pairs per rank x 2 ranks per step
    assert metrics["loss"] < 0.68 and "eval_rewards/accuracies" in metrics
    assert any(weight.abs().sum() > 0 for key, weight in adapter.state_dict.items() if "lora_B" in key)  # trained
    apply_adapter(vlm, adapter)  # and fits the policy it was launched from (raises on unexpected keys)
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert list(children["tags.mlflow.runName"]) == ["dpo-2proc"]  # one child: rank 1 logs nothing
    assert children["metrics.loss"].iloc[0] == pytest.approx(metrics["loss"])


@pytest.mark.parametrize("method", ["sft", "reward"])
def test_sft_and_the_reward_model_on_two_processes_match_one(workdir, method):
    records = f"{method}.parquet"
    one = run(
        method,
        str(workdir / records),
        str(_settings(workdir, f"{method}-one", 8)),
        str(workdir / "model"),
        str(workdir / f"{method}_one"),
    )
    two = _two_ranks(workdir, method, records, _settings(workdir, f"{method}-two", 4), f"{method}_two")

    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    if method == "reward":  # its own loop, prepared by accelerate as the TRL trainers are
        assert (one["distributed"], two["distributed"]) == ("NO", "MULTI_CPU")
    assert one["global_step"] == two["global_step"] == PAIRS / 8
    assert one["loss_last"] < one["loss_first"] - 0.01  # it trained: agreement means something
    for key in ("loss_first", "loss_last", "train_loss"):
        assert abs(one[key] - two[key]) < TOLERANCE, (key, one[key], two[key])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_rl_on_two_processes_trains_the_same_steps_against_the_reward_model(workdir, method):
    fields = {"num_generations": 2, "max_completion_length": 8}
    records = f"{method}.parquet"
    one = run(
        method,
        str(workdir / records),
        str(_settings(workdir, f"{method}-one", 8, **fields)),
        str(workdir / "model"),
        str(workdir / f"{method}_one"),
        reward_model_dir=str(workdir / "reward_model"),
    )
    two = _two_ranks(
        workdir,
        method,
        records,
        _settings(workdir, f"{method}-two", 4, **fields),
        f"{method}_two",
        "--reward-model",
        str(workdir / "reward_model"),
    )

    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["global_step"] == two["global_step"] == 2  # 8 prompts, 4 per step (8 answers; 4 per process on two)
    for metrics in (one, two):
        # The reward model scores answers with a non-zero head: a reward of exactly 0 would mean it never ran.
        assert metrics["reward_first"] != 0 and metrics["completion_length"] > 0
