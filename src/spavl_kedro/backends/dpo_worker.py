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
The effective batch is batch_size x gradient_accumulation_steps x processes: halve `batch_size` when
doubling the processes to keep the recipe.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd
from peft import PeftModel
from PIL import Image

from spavl_kedro.backends.adapters import LoraAdapter, save_adapter
from spavl_kedro.backends.training import DPOSettings, train_dpo
from spavl_kedro.backends.vlm import decode_image, load_vlm

METRICS_FILE = "metrics.json"


def save_pairs(pairs: Sequence[dict], path: str | Path) -> None:
    """Write pair dicts (images as PIL images or PNG bytes) in the parquet layout the worker reads."""
    rows = [{"images": [_png(image) for image in pair["images"]], "question": pair["question"],
             "chosen": pair["chosen"], "rejected": pair["rejected"]} for pair in pairs]
    pd.DataFrame(rows, columns=["images", "question", "chosen", "rejected"]).to_parquet(path, index=False)


def load_pairs(path: str | Path) -> list[dict]:
    frame = pd.read_parquet(path)
    missing = {"images", "question", "chosen", "rejected"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: pairs parquet lacks columns {sorted(missing)}")
    return [{"images": [decode_image(data) for data in row.images], "question": row.question,
             "chosen": row.chosen, "rejected": row.rejected} for row in frame.itertuples(index=False)]


def run(pairs_path: str, settings_path: str, model_dir: str, out_dir: str) -> dict | None:
    """Train on one rank; on rank 0 write the result to `out_dir` and return the metrics (None elsewhere)."""
    fields = json.loads(Path(settings_path).read_text())
    with tempfile.TemporaryDirectory(prefix="dpo-worker-") as scratch:
        settings = DPOSettings.model_validate({"output_dir": scratch, **fields})
        vlm = load_vlm(model_dir)
        model, metrics = train_dpo(vlm, load_pairs(pairs_path), settings)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="parquet: images (PNG bytes list), question, chosen, rejected")
    parser.add_argument("--settings", required=True, help="JSON object of DPOSettings fields")
    parser.add_argument("--model", required=True, help="model directory (save_pretrained: model + processor)")
    parser.add_argument("--out", required=True, help="where rank 0 writes metrics.json and the adapter or model")
    args = parser.parse_args(argv)
    run(args.pairs, args.settings, args.model, args.out)


def _png(image: Image.Image | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
