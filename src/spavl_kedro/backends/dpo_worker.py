"""DPO as a standalone process, so one run can span several processes (DDP) or GPUs (DeepSpeed).

    python -m spavl_kedro.backends.dpo_worker --pairs PAIRS.parquet --settings DPO.json --model DIR --out DIR

The inputs are files so that every rank reads the same ones: pairs as parquet (columns images: list of PNG
bytes, question, chosen, rejected; `save_pairs` writes them), DPOSettings fields as JSON (`output_dir` may
be left out), and a model directory written with `save_pretrained` (model + processor). Every rank trains;
rank 0 writes `metrics.json` and the result: the LoRA adapter in PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`) or, with `"lora": false`, the fine-tuned model and its processor.

Two CPU processes (gloo), checked on a 2-core machine; the loss matched a 1-process run with the same
effective batch (see tests/test_distributed.py):

    torchrun --standalone --nproc_per_node 2 -m spavl_kedro.backends.dpo_worker ...
    accelerate launch --config_file conf/base/accelerate/cpu_2proc.yaml -m spavl_kedro.backends.dpo_worker ...

Not `accelerate launch --cpu --num_processes 2`: that silently starts one process. GPUs:
`accelerate launch --config_file conf/paper/accelerate/ddp.yaml` (or deepspeed_zero2.yaml, SPA-VL's setup;
`metrics.json` says which ran: "distributed" is NO, MULTI_CPU, MULTI_GPU or DEEPSPEED).
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
from pathlib import Path
from typing import Sequence

import mlflow
import pandas as pd
from peft import PeftModel

from spavl_kedro.backends.adapters import WEIGHTS_NAME, LoraAdapter, load_adapter, save_adapter
from spavl_kedro.backends.recipe import PARENT_RUN_ENV, prepare_for_generation
from spavl_kedro.backends.tiny import VLM
from spavl_kedro.backends.training import DPOSettings, train_dpo
from spavl_kedro.backends.vlm import load_vlm, png_bytes

METRICS_FILE = "metrics.json"


def save_pairs(pairs: Sequence[dict], path: str | Path) -> None:
    """Write pair dicts (images as PIL images or PNG bytes) in the parquet layout the worker reads."""
    rows = [{"images": [png_bytes(image) for image in pair["images"]], "question": pair["question"],
             "chosen": pair["chosen"], "rejected": pair["rejected"]} for pair in pairs]
    pd.DataFrame(rows, columns=["images", "question", "chosen", "rejected"]).to_parquet(path, index=False)


def load_pairs(path: str | Path) -> list[dict]:
    frame = pd.read_parquet(path)
    missing = {"images", "question", "chosen", "rejected"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: pairs parquet lacks columns {sorted(missing)}")
    # images stay PNG bytes: the trainer decodes them a batch at a time
    return [{"images": list(row.images), "question": row.question,
             "chosen": row.chosen, "rejected": row.rejected} for row in frame.itertuples(index=False)]


def run(pairs_path: str, settings_path: str, model_dir: str, out_dir: str,
        eval_pairs_path: str | None = None) -> dict | None:
    """Train on one rank; on rank 0 write the result to `out_dir` and return the metrics (None elsewhere)."""
    fields = json.loads(Path(settings_path).read_text())
    eval_pairs = load_pairs(eval_pairs_path) if eval_pairs_path else None
    with tempfile.TemporaryDirectory(prefix="dpo-worker-") as scratch:
        settings = DPOSettings.model_validate({"output_dir": scratch, **fields})
        vlm = load_vlm(model_dir)
        model, metrics = train_dpo(vlm, load_pairs(pairs_path), settings, eval_pairs=eval_pairs)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        save_adapter(LoraAdapter.from_peft(model), str(out))
    else:
        model.save_pretrained(out)
        vlm.processor.save_pretrained(out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def launch(vlm: VLM, pairs: Sequence[dict], settings: DPOSettings, accelerate_config: str,
           num_processes: int | None = None, eval_pairs: Sequence[dict] | None = None
           ) -> tuple[LoraAdapter | VLM, dict]:
    """Train with DPO across processes: `accelerate launch --config_file accelerate_config` runs this module.

    The policy, pairs and settings are written to `settings.output_dir` for every rank to read (a full copy
    of the policy's weights: ~14 GB for LLaVA-1.5-7B in fp16). Rank 0 logs to a child run of the active MLflow
    run and writes the result, which comes back as a LoraAdapter or a VLM (a full fine-tune) with its metrics.
    A failed launch raises with the tail of the launcher's output.
    """
    work = Path(settings.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(work / "policy")
    vlm.processor.save_pretrained(work / "policy")
    save_pairs(pairs, work / "pairs.parquet")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", accelerate_config]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", __name__, "--pairs", str(work / "pairs.parquet"), "--model", str(work / "policy"),
                "--settings", str(work / "settings.json"), "--out", str(work / "out")]
    if eval_pairs:
        save_pairs(eval_pairs, work / "eval_pairs.parquet")
        command += ["--eval-pairs", str(work / "eval_pairs.parquet")]
    (work / "settings.json").write_text(settings.model_dump_json(exclude={"output_dir"}))
    env = dict(os.environ)
    if "mlflow" in settings.report_to and mlflow.active_run() is not None:
        env[PARENT_RUN_ENV] = mlflow.active_run().info.run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"accelerate launch with {accelerate_config} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    out = work / "out"
    metrics = json.loads((out / METRICS_FILE).read_text())
    if (out / WEIGHTS_NAME).exists():
        return load_adapter(str(out)), metrics
    result = load_vlm(str(out))
    prepare_for_generation(result.model)
    return result, metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="parquet: images (PNG bytes list), question, chosen, rejected")
    parser.add_argument("--settings", required=True, help="JSON object of DPOSettings fields")
    parser.add_argument("--model", required=True, help="model directory (save_pretrained: model + processor)")
    parser.add_argument("--out", required=True, help="where rank 0 writes metrics.json and the adapter or model")
    parser.add_argument("--eval-pairs", help="parquet of held-out pairs, evaluated after training (eval_* metrics)")
    args = parser.parse_args(argv)
    run(args.pairs, args.settings, args.model, args.out, args.eval_pairs)


if __name__ == "__main__":
    main()
