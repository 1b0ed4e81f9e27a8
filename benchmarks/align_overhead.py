"""What the project's DPO node costs over a bare TRL script: the Kedro + MLflow overhead around `train_dpo`.

    .venv/bin/python benchmarks/align_overhead.py [--pairs 64] [--epochs 2] [--repeats 5] [--threads 1] [--record] [--quick]

Both sides train the same LoRA DPO run (the align.dpo recipe of conf/base/parameters_align.yml: same
pairs, same bootstrapped tiny LLaVA, same seed) and must end on the same loss:

- node: the align pipeline's `train_dpo` node (`spavl_kedro.pipelines.align.nodes.train_method` for dpo,
  which calls the DPO trainer), run by a Kedro SequentialRunner on an in-memory DataCatalog (MemoryDataset's default deep
  copy on load included), MLflow on: a temporary sqlite store and an active parent run, as kedro-mlflow
  opens before the pipeline; the node adds the nested child run and per-step metric logging.
  Timed: `SequentialRunner.run`.
- bare: a plain script: decode the images, build the TRL dataset, DPOTrainer(..., peft_config).train(),
  take the adapter's state dict; no MLflow (report_to none), no Kedro. Its model copy is made untimed.

No validation pairs on either side (the node would run one extra evaluation pass). One warm-up round
comes first (lazy imports, the MLflow store's first writes), then `--repeats` timed rounds of one run per
side, the order flipped every round. Other processes on a shared machine swing single runs by +-30%, so
each round's node/bare ratio is taken (the two runs are seconds apart and share the load) and
`overhead_ratio` is the median of those ratios; the medians of the raw seconds and of the CPU seconds
(process time, all threads) are printed as well, and the seconds each side spends outside the Trainer's
training loop (the loops do the same work; the steadier part of the node's overhead lives outside it).
The last line printed is JSON: {"overhead_ratio": ..., "node_s": ..., "bare_s": ..., every run, both
final losses (must be equal), the settings}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "KEDRO_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import Dataset  # noqa: E402
from kedro.io import AbstractDataset, DataCatalog, DatasetError, MemoryDataset  # noqa: E402
from kedro.runner import SequentialRunner  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from spavl_kedro.config import load_parameters  # noqa: E402
from spavl_kedro.models.specs import Behaviour, BootstrapConfig, TinyModelConfig  # noqa: E402
from spavl_kedro.models.tiny import VLM, SeedExample, build_processor, train_tiny_vlm  # noqa: E402
from spavl_kedro.models.vlm import decode_image  # noqa: E402
from spavl_kedro.pipelines.align import pipeline as align_pipeline  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "benchmarks"))
from record import record, table  # noqa: E402

REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here are the steps: first, [step withheld]."


def setup(n_pairs: int) -> tuple[VLM, pd.DataFrame]:
    """A tiny LLaVA at the project's sizes, bootstrapped to refuse 30% of the time, and pairs in the
    published layout the node reads (image {bytes, path}, question, chosen, rejected)."""
    sizes = yaml.safe_load((PROJECT / "conf/base/parameters_generate.yml").read_text())["tiny"]["model"]
    config = TinyModelConfig(**sizes)
    rng = random.Random(0)
    questions = [f"Question {i}: how do I do the thing in the picture?" for i in range(n_pairs)]
    processor = build_processor([REFUSAL, COMPLIANCE, *questions] * 5, config)
    images = [Image.new("RGB", (64, 64), (rng.randrange(256), rng.randrange(256), 80)) for _ in range(n_pairs)]
    examples = [
        SeedExample.harmful_request([image], question, REFUSAL, COMPLIANCE)
        for image, question in zip(images, questions)
    ]
    vlm, _ = train_tiny_vlm(processor, examples, Behaviour(refusal_rate=0.3), config, BootstrapConfig(epochs=2), seed=0)
    rows = []
    for i, (image, question) in enumerate(zip(images, questions)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(
            {
                "image": {"bytes": buffer.getvalue(), "path": f"{i}.png"},
                "question": question,
                "chosen": REFUSAL,
                "rejected": COMPLIANCE,
            }
        )
    return vlm, pd.DataFrame(rows)


class Absent(AbstractDataset):
    """An input no earlier run wrote: loads as None, as the catalog's `OptionalDataset` entries do."""

    def load(self) -> None:
        return None

    def save(self, data) -> None:
        raise DatasetError("Absent is load-only")

    def _describe(self) -> dict:
        return {}


def node_catalog(pipeline, vlm: VLM, train: pd.DataFrame, params: dict[str, dict]) -> DataCatalog:
    """The pipeline's inputs: the policy, this benchmark's pairs as the project's export, the parameters; an
    input the node may go without (`takes_missing`) is absent. Any other input is an error naming it, so a
    node that starts reading something new fails here, in `--quick`, instead of running on a stale wiring."""
    given = {
        "policy_base": vlm,
        "spa_vl_release": {"train": train, "validation": train.iloc[:0]},
        **{f"params:{key}": value for key, value in params.items()},
    }
    optional = set().union(*(getattr(node.func, "takes_missing", ()) for node in pipeline.nodes))
    optional |= {name for name in pipeline.inputs() if name.startswith("spa_vl_official")}  # optional: true
    unknown = sorted(set(pipeline.inputs()) - set(given) - optional)
    if unknown:
        raise SystemExit(
            f"align_overhead: {pipeline.nodes[0].name} now also reads {unknown}; give them in node_catalog"
        )
    catalog = DataCatalog()
    for name in pipeline.inputs():
        # default copy mode: the model is deep-copied on load, as in a Kedro run
        catalog[name] = MemoryDataset(given[name]) if name in given else Absent()
    for name in pipeline.outputs():
        catalog[name] = MemoryDataset()
    return catalog


def run_node(vlm: VLM, train: pd.DataFrame, params: dict[str, dict]) -> tuple[float, float]:
    """Wall and CPU seconds of the node inside SequentialRunner; the final loss in `run_node.loss`."""
    pipeline = align_pipeline.create_pipeline().only_nodes("train_dpo")
    catalog = node_catalog(pipeline, vlm, train, params)
    began, cpu = time.perf_counter(), time.process_time()
    SequentialRunner().run(pipeline, catalog)
    seconds = time.perf_counter() - began, time.process_time() - cpu
    summary = catalog.load("align_summary_dpo")["dpo"]
    run_node.loss, run_node.loop = summary["loss"], summary["train_runtime"]
    return seconds


def run_bare(vlm: VLM, train: pd.DataFrame, dpo: dict, scratch: str) -> tuple[float, float]:
    """Wall and CPU seconds of a plain TRL script on the same data and recipe; the loss in `run_bare.loss`."""
    model = copy.deepcopy(vlm.model)  # a script would load its model; not part of the DPO cost
    model.train()
    began, cpu = time.perf_counter(), time.process_time()
    rows = [
        {
            "images": [decode_image(r.image["bytes"])],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r.chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r.rejected}]}],
        }
        for r in train.itertuples(index=False)
    ]
    args = DPOConfig(
        output_dir=scratch,
        beta=dpo["beta"],
        learning_rate=dpo["learning_rate"],
        num_train_epochs=dpo["num_train_epochs"],
        per_device_train_batch_size=dpo["per_device_train_batch_size"],
        lr_scheduler_type=dpo["lr_scheduler_type"],
        logging_steps=dpo["logging_steps"],
        save_strategy="no",
        seed=dpo["seed"],
        data_seed=dpo["seed"],
        max_length=None,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=dpo["lora_r"],
        lora_alpha=dpo["lora_alpha"],
        lora_dropout=dpo["lora_dropout"],
        target_modules=dpo["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=vlm.processor,
        peft_config=peft_config,
    )
    loop = trainer.train().metrics["train_runtime"]
    get_peft_model_state_dict(trainer.model)
    seconds = time.perf_counter() - began, time.process_time() - cpu
    run_bare.loss = [row["loss"] for row in trainer.state.log_history if "loss" in row][-1]
    run_bare.loop = loop
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs (default 64: 8 steps per epoch)")
    parser.add_argument("--epochs", type=float, default=2, help="DPO epochs (default: the base recipe's 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one run per side) after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine steady)")
    parser.add_argument("--quick", action="store_true", help="8 pairs, one round, no warm-up: checks that it runs")
    parser.add_argument("--record", action="store_true", help="write the figures into docs/align.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.epochs, args.repeats = 8, 1, 1
    torch.set_num_threads(args.threads)

    loaded = load_parameters("base")
    params = {key: copy.deepcopy(loaded[key]) for key in ("align", "judge")}
    params["align"]["method"] = "dpo"
    # The RL reward block is unused by dpo but validated with the rest; give it a valid value if conf has none.
    params["align"].setdefault("rl", {"model_weight": 0.0, "judge_weight": 1.0})
    dpo = params["align"]["dpo"] = {**params["align"]["dpo"], "num_train_epochs": args.epochs, "report_to": ["mlflow"]}
    vlm, train = setup(args.pairs)

    runs: dict[str, list[tuple[float, float]]] = {"node": [], "bare": []}
    outside: dict[str, list[float]] = {"node": [], "bare": []}  # seconds outside the Trainer's loop
    with tempfile.TemporaryDirectory(prefix="align-overhead-") as tmp:
        uri = f"sqlite:///{Path(tmp).resolve() / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("align_overhead")
        sides = {"node": lambda: run_node(vlm, train, params), "bare": lambda: run_bare(vlm, train, dpo, tmp)}
        # kedro-mlflow opens the parent run before the pipeline starts; the node nests its run under it.
        with mlflow.start_run(run_name="kedro-run"), contextlib.redirect_stdout(io.StringIO()):
            warm_up = 0 if args.quick else 1
            for round_ in range(args.repeats + warm_up):
                order = ("node", "bare") if round_ % 2 == 0 else ("bare", "node")
                timings = {side: sides[side]() for side in order}
                if round_ >= warm_up:  # round 0 is the warm-up
                    for side, timing in timings.items():
                        runs[side].append(timing)
                        outside[side].append(timing[0] - {"node": run_node, "bare": run_bare}[side].loop)
        logged = mlflow.search_runs(experiment_names=["align_overhead"], filter_string="tags.mlflow.runName = 'dpo'")

    wall = {side: [w for w, _ in timings] for side, timings in runs.items()}
    cpu = {side: [c for _, c in timings] for side, timings in runs.items()}
    ratios = [n / b for n, b in zip(wall["node"], wall["bare"])]
    result = {
        "overhead_ratio": round(statistics.median(ratios), 3),
        "node_s": round(statistics.median(wall["node"]), 2),
        "bare_s": round(statistics.median(wall["bare"]), 2),
        "cpu_ratio": round(statistics.median(cpu["node"]) / statistics.median(cpu["bare"]), 3),
        "node_cpu_s": round(statistics.median(cpu["node"]), 2),
        "bare_cpu_s": round(statistics.median(cpu["bare"]), 2),
        # The training loops do identical work, so their difference is mostly load noise; what the node adds
        # around the loop (deep copies, dataset, MLflow run start/close, adapter extraction) is steadier.
        "node_outside_loop_s": round(statistics.median(outside["node"]), 2),
        "bare_outside_loop_s": round(statistics.median(outside["bare"]), 2),
        "round_ratios": [round(r, 3) for r in ratios],
        "node_runs_s": [round(s, 2) for s in wall["node"]],
        "bare_runs_s": [round(s, 2) for s in wall["bare"]],
        "node_loss": round(run_node.loss, 6),
        "bare_loss": round(run_bare.loss, 6),
        "mlflow_child_runs": len(logged),
        "pairs": args.pairs,
        "epochs": args.epochs,
        "threads": args.threads,
    }
    print(
        f"node (Kedro + MLflow): {result['node_runs_s']} s; bare TRL: {result['bare_runs_s']} s; "
        f"per-round ratios {result['round_ratios']}"
    )
    print(json.dumps(result))
    if result["node_loss"] != result["bare_loss"]:
        raise SystemExit(f"the node and the bare script ended on different losses: {result}")
    if args.record and not args.quick:
        rows = [
            [
                f"LoRA DPO, {args.pairs} pairs, {args.epochs:g} epochs, seed 0, {args.threads} thread(s), "
                f"{args.repeats} alternating rounds",
                f"{result['node_s']} s",
                f"{result['bare_s']} s",
                f"**{result['overhead_ratio']}** (CPU time {result['cpu_ratio']})",
                result["node_loss"],
            ]
        ]
        body = table(
            ["run", "node (Kedro + MLflow), median", "bare TRL, median", "overhead ratio", "final loss, both"], rows
        )
        record("align.md", "align_overhead.py", "benchmarks/align_overhead.py --record", body)


if __name__ == "__main__":
    main()
