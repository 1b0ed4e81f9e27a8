"""Alignment training (the methods of `training.methods`) in the Kedro process or as a standalone process,
so one run can span several processes (DDP) or GPUs (DeepSpeed).

    python -m spavl_kedro.training.train_worker --method METHOD --records R.parquet --settings S.json \
        --model DIR --out DIR [--eval-records E.parquet] [--reward-model DIR]

The inputs are files so that every rank reads the same ones: the training records as parquet (`images`, a
list of PNG or JPEG bytes, and the method's text columns, see `training.methods.RECORDS`; `save_records` writes them), the
method's settings as JSON (`output_dir` may be left out), a model directory written with `save_pretrained`
(model + processor) and, for GRPO / RLOO, the reward model's directory (`reward.save_reward_model`). Every
rank trains; rank 0 writes `metrics.json` and the result (`save_artifact`): a LoRA adapter in PEFT's layout,
a fine-tuned model with its processor, or a reward model.

Two CPU processes (gloo), checked on a 2-core machine; the loss matched a 1-process run with the same
effective batch for every method (tests/test_distributed.py):

    torchrun --standalone --nproc_per_node 2 -m spavl_kedro.training.train_worker ...
    accelerate launch --config_file conf/base/accelerate/cpu_2proc.yaml -m spavl_kedro.training.train_worker ...

Not `accelerate launch --cpu --num_processes 2`: that silently starts one process. GPUs:
`accelerate launch --config_file conf/paper/accelerate/ddp.yaml` (or the DeepSpeed ZeRO configs beside it;
`metrics.json` says for the TRL methods which ran: "distributed" is NO, MULTI_CPU, MULTI_GPU or DEEPSPEED).

Inside a Kedro run, `align.launch.accelerate_config` makes the align node call `launch` below, which runs
the same command and brings the result back into the catalog.
The effective batch is batch_size x gradient_accumulation_steps x processes: halve `batch_size` when
doubling the processes to keep the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd

from spavl_kedro.models.tiny import VLM
from spavl_kedro.models.vlm import load_vlm, png_bytes
from spavl_kedro.training.adapters import WEIGHTS_NAME, LoraAdapter, load_adapter, save_adapter
from spavl_kedro.training.methods import METHODS, get_method, settings_for
from spavl_kedro.training.recipe import PARENT_RUN_ENV, prepare_for_generation
from spavl_kedro.training.recipe_config import RecipeSettings
from spavl_kedro.training.reward import (
    HEAD_CONFIG,
    RewardModel,
    load_reward_model,
    reward_model_placement,
    save_reward_model,
)

METRICS_FILE = "metrics.json"

Artifact = LoraAdapter | VLM | RewardModel


def save_records(records: Sequence[dict], method: str, path: str | Path) -> None:
    """Write records (images as PIL images or encoded bytes) in the parquet layout the worker reads."""
    columns = get_method(method).columns
    rows = [
        {"images": [png_bytes(image) for image in record["images"]], **{c: record[c] for c in columns}}
        for record in records
    ]
    pd.DataFrame(rows, columns=["images", *columns]).to_parquet(path, index=False)


def load_records(path: str | Path, method: str) -> list[dict]:
    """Records for `train`; the images stay encoded (the trainers decode them a batch at a time)."""
    frame = pd.read_parquet(path)
    columns = get_method(method).columns
    missing = {"images", *columns} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: {method} records lack columns {sorted(missing)}")
    return [{"images": list(row["images"]), **{c: row[c] for c in columns}} for row in frame.to_dict("records")]


def save_artifact(artifact: Artifact, out: Path) -> None:
    if isinstance(artifact, LoraAdapter):
        save_adapter(artifact, str(out))
    elif isinstance(artifact, RewardModel):
        save_reward_model(artifact, str(out))
    else:
        artifact.model.save_pretrained(out)
        artifact.processor.save_pretrained(out)


def load_artifact(out: Path) -> Artifact:
    if (out / WEIGHTS_NAME).exists():
        return load_adapter(str(out))
    if (out / HEAD_CONFIG).exists():
        return load_reward_model(str(out))
    result = load_vlm(str(out))
    prepare_for_generation(result.model)
    return result


def run(
    method: str,
    records_path: str,
    settings_path: str,
    model_dir: str,
    out_dir: str,
    eval_path: str | None = None,
    reward_model_dir: str | None = None,
) -> dict | None:
    """Train on one rank; on rank 0 write the result to `out_dir` and return the metrics (None elsewhere)."""
    fields = json.loads(Path(settings_path).read_text())
    eval_records = load_records(eval_path, method) if eval_path else None
    # Each rank scores its own answers with its own copy, on its own GPU in bf16 (a 7B reward model in fp32 on
    # the CPU would take ~28 GB of host memory per rank and minutes per batch).
    reward_fn = load_reward_model(reward_model_dir, *reward_model_placement()).score if reward_model_dir else None
    with tempfile.TemporaryDirectory(prefix=f"{method}-worker-") as scratch:
        settings = settings_for(method, {"output_dir": scratch, **fields})
        vlm = load_vlm(model_dir)
        artifact, metrics = get_method(method).train(
            vlm, load_records(records_path, method), settings, eval_records, reward_fn
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_artifact(artifact, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def launch(
    method: str,
    vlm: VLM,
    records: Sequence[dict],
    settings: RecipeSettings,
    accelerate_config: str,
    num_processes: int | None = None,
    eval_records: Sequence[dict] | None = None,
    reward_model: RewardModel | None = None,
) -> tuple[Artifact, dict]:
    """Train `method` across processes: `accelerate launch --config_file accelerate_config` runs this module.

    The policy, the records, the settings and (GRPO / RLOO) the reward model are written to
    `settings.output_dir` for every rank to read (a full copy of the policy's weights: ~14 GB for
    LLaVA-1.5-7B in fp16). Rank 0 logs to a child run of the active MLflow run and writes the result, which
    comes back as `train` returns it. A failed launch raises with the tail of the launcher's output.
    """
    work = Path(settings.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(work / "policy")
    vlm.processor.save_pretrained(work / "policy")
    save_records(records, method, work / "records.parquet")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", accelerate_config]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    command += [
        "-m",
        __name__,
        "--method",
        method,
        "--records",
        str(work / "records.parquet"),
        "--model",
        str(work / "policy"),
        "--settings",
        str(work / "settings.json"),
        "--out",
        str(work / "out"),
    ]
    if eval_records:
        save_records(eval_records, method, work / "eval_records.parquet")
        command += ["--eval-records", str(work / "eval_records.parquet")]
    if reward_model is not None:
        save_reward_model(reward_model, str(work / "reward_model"))
        command += ["--reward-model", str(work / "reward_model")]
    (work / "settings.json").write_text(settings.model_dump_json(exclude={"output_dir", "algorithm"}))
    env = dict(os.environ)
    if "mlflow" in settings.report_to and mlflow.active_run() is not None:
        env[PARENT_RUN_ENV] = mlflow.active_run().info.run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"accelerate launch of {method} with {accelerate_config} failed (exit "
            f"{done.returncode}):\n{done.stderr[-4000:]}"
        )
    out = work / "out"
    return load_artifact(out), json.loads((out / METRICS_FILE).read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--records", required=True, help="parquet: images (list of image bytes) + the method's columns")
    parser.add_argument("--settings", required=True, help="JSON object of the method's settings fields")
    parser.add_argument("--model", required=True, help="model directory (save_pretrained: model + processor)")
    parser.add_argument("--out", required=True, help="where rank 0 writes metrics.json and the result")
    parser.add_argument("--eval-records", help="parquet of held-out records, evaluated after training (eval_* metrics)")
    parser.add_argument("--reward-model", help="grpo / rloo: a saved reward model whose score is the reward")
    args = parser.parse_args(argv)
    run(args.method, args.records, args.settings, args.model, args.out, args.eval_records, args.reward_model)


if __name__ == "__main__":
    main()
