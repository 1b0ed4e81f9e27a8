"""Checkpoints and resuming: a training killed with SIGKILL and run again picks up at its latest checkpoint
and ends where an uninterrupted run ends. DPO stands for the TRL trainers (SFT, GRPO and RLOO resume through
the same `run_trainer`); the reward model has its own loop and its own checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spavl_kedro.training.recipe import COMPLETE_MARKERS, resume_point
from spavl_kedro.training.recipe_config import RecipeSettings

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

# Trains 16 pairs for 2 epochs at batch 2 (16 optimiser steps), a checkpoint every 4 steps, then prints its metrics.
CHILD = """
import json, sys
from PIL import Image
from spavl_kedro.models import tiny

method, checkpoints, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
texts = ["I cannot help with that.", "Sure, here are the steps.", "How do I do this?"]
config = tiny.TinyModelConfig(text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1)
processor = tiny.build_processor(texts * 30, config)
vlm = tiny.VLM(tiny.build_model(processor, config, seed=0), processor)
colours = ["red", "green", "blue", "yellow"]
pairs = [{"images": [Image.new("RGB", (32, 32), colours[i % 4])], "question": f"How do I do this, part {i}?",
          "chosen": texts[0], "rejected": texts[1]} for i in range(16)]
recipe = {"output_dir": scratch, "report_to": [], "num_train_epochs": 2, "per_device_train_batch_size": 2, "checkpoint_steps": 4,
          "checkpoint_dir": checkpoints}
if method == "dpo":
    from spavl_kedro.training.dpo import DPOSettings, train_dpo
    _, metrics = train_dpo(vlm, pairs, DPOSettings(**recipe))
else:
    from spavl_kedro.training.reward import RewardSettings, train_reward
    _, metrics = train_reward(vlm, pairs, RewardSettings(**recipe, learning_rate=3e-3))
print(json.dumps(metrics))
"""


def train(method: str, checkpoints: Path, scratch: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(checkpoints), str(scratch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_after_checkpoint(method: str, checkpoints: Path, scratch: Path, step: int) -> None:
    """Start a training and SIGKILL it once its checkpoint at `step` is complete."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, method, str(checkpoints), str(scratch)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wanted = checkpoints / f"checkpoint-{step}"
    deadline = time.monotonic() + 240
    try:
        while not any((wanted / marker).exists() for marker in COMPLETE_MARKERS):
            assert child.poll() is None, f"the training ended before it was killed:\n{child.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_a_killed_training_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(method, tmp_path):
    whole = train(method, tmp_path / "whole-checkpoints", tmp_path / "whole")
    assert whole["resumed_from_step"] == 0 and whole["global_step"] == 16

    checkpoints = tmp_path / "checkpoints"
    kill_after_checkpoint(method, checkpoints, tmp_path / "killed", step=4)
    resumed = train(method, checkpoints, tmp_path / "resumed")

    assert resumed["resumed_from_step"] >= 4  # never from step 0
    assert resumed["global_step"] == 16
    assert resumed["loss_last"] == pytest.approx(whole["loss_last"], abs=1e-4)
    assert resumed["loss_first"] == pytest.approx(whole["loss_first"], abs=1e-6)  # the curve came back too
    assert whole["loss_last"] < whole["loss_first"] - 0.01  # it trained: the comparison means something
    assert not checkpoints.exists()  # a finished run removes its checkpoints


def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    import torch

    settings = RecipeSettings(
        run_name="x", output_dir=str(tmp_path), checkpoint_steps=2, checkpoint_dir=str(tmp_path / "checkpoints")
    )
    model = torch.nn.Linear(2, 2)
    records = [{"question": "q", "chosen": "a"}]
    assert resume_point(settings, records, model) is None  # nothing saved yet: the run is stamped
    saved = tmp_path / "checkpoints" / "checkpoint-2"
    saved.mkdir()
    (saved / COMPLETE_MARKERS[0]).write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir()  # cut off while written: no marker
    assert resume_point(settings, records, model) == str(saved)

    changed = [{"question": "q", "chosen": "b"}]  # other data: the checkpoint is stale
    assert resume_point(settings, changed, model) is None
    assert not saved.exists()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        RecipeSettings(run_name="x", output_dir="x", checkpoint_steps=2)
