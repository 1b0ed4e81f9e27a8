"""What the four trainers (DPO, SFT, reward model, GRPO/RLOO) share.

- `RecipeSettings`: the fields every recipe has (LoRA shape and placement, seed, logging, MLflow run name,
  scratch directory). Each trainer's settings class adds its own hyperparameters on top.
- `resolve_device`: a CUDA GPU when one is visible (bf16 where supported), else the CPU in fp32.
- `training_copy`: the copy of a model a trainer updates, in the recipe's `weights_dtype` (fp32 master weights
  by default, whatever dtype the checkpoint recorded: llava-hf's record float16, and transformers 5 loads a
  checkpoint's own dtype).
- `lora_config`: where adapters go. The vision tower never gets one, even with target "all-linear"; the
  multi-modal projector is either trained whole (PEFT's `modules_to_save`) or left alone. Module names come
  from the model's row of the architecture table (`families.py`).
- `child_run`: the nested MLflow run a training is logged to.
- `prepare_for_generation`: a trained model back into eval mode with its KV cache on.
- `trainer_args`, `trl_config`, `run_trainer`: the TrainingArguments every TRL trainer here shares, a TRL
  config from them plus the recipe's own `trl_args`, and train (+ evaluate) with the run summarised the same
  way: `curve_summary`'s first / last points, loss, steps, runtime.
- `on_disk_dataset`: training rows written to an Arrow file and memory-mapped, images still encoded, so a
  TRL trainer's memory does not grow with the data; its collator decodes and encodes one batch at a time.
- `resume_point`, `finish_checkpoints`: checkpoints every `checkpoint_steps` in `checkpoint_dir`, and where a
  rerun of the same run (recipe, data, starting weights) picks up after a crash.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
import torch
from datasets import Dataset, Features, Image, List, Value
from peft import LoraConfig, PeftModel
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from spavl_kedro.models.families import family_of
from spavl_kedro.models.tiny import weights_fingerprint
from spavl_kedro.training.recipe_config import RecipeSettings

log = logging.getLogger(__name__)

# `RecipeSettings.weights_dtype` -> torch dtype
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def training_copy(model: torch.nn.Module, settings: RecipeSettings) -> torch.nn.Module:
    """A deep copy of `model` for a trainer, every floating-point weight in `settings.weights_dtype`; `model`
    itself is untouched. LoRA adapters that PEFT adds later are float32 even over bfloat16 weights (PEFT's
    `autocast_adapter_dtype`); a projector trained whole (`train_projector`) keeps `weights_dtype`."""
    return copy.deepcopy(model).to(WEIGHT_DTYPES[settings.weights_dtype])


class _TrainingFacts(TrainerCallback):
    """What the trainer set up, read once training begins: the dtypes of the parameters the optimiser updates
    (`dtypes`, e.g. "float32") and whether the model recomputes activations (`checkpointing`)."""

    def __init__(self) -> None:
        self.dtypes, self.checkpointing = "", False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self.dtypes = optimiser_dtypes(optimizer)
        if model is not None:
            self.checkpointing = is_checkpointing(model)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any module of `model` (a PEFT wrapper included) recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def optimiser_dtypes(optimizer: torch.optim.Optimizer) -> str:
    """The dtypes of an optimiser's parameters, sorted and comma-joined ("float32")."""
    found = {str(p.dtype).removeprefix("torch.") for group in optimizer.param_groups for p in group["params"]}
    return ",".join(sorted(found))


def resolve_device(settings: RecipeSettings) -> tuple[str, str]:
    """("cuda", "bf16"|"fp32") when a CUDA GPU is visible and `use_cpu` is not true, else ("cpu", "fp32")."""
    cuda = torch.cuda.is_available()
    if settings.use_cpu is False and not cuda:
        raise ValueError("use_cpu is false but no CUDA device is visible: leave it unset (auto) or set it true")
    if settings.use_cpu or not cuda:
        return "cpu", "fp32"
    # A GPU without bf16 (pre-Ampere) trains in fp32: fp16 autocast needs loss scaling these losses gain nothing from.
    return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def trainer_args(settings: RecipeSettings, device: str, precision: str) -> dict[str, Any]:
    """The TrainingArguments every TRL trainer of this project sets the same way (see `resolve_device`)."""
    return {
        "output_dir": settings.checkpoint_dir if settings.checkpoint_steps else settings.output_dir,
        "logging_strategy": "steps",
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps" if settings.checkpoint_steps else "no",
        "save_steps": settings.checkpoint_steps or 500,
        "save_total_limit": 2,  # the latest, and the one before in case the latest was cut off while written
        "save_only_model": False,  # optimiser, schedule and RNG too: a resumed run continues, it does not restart
        "seed": settings.seed,
        "data_seed": settings.seed,
        # TRL switches bf16 on whenever fp16 is off, so both are always set: bf16 autocast on a GPU that
        # supports it (SPA-VL trains in bf16), full precision on the CPU, which keeps runs exact and repeatable.
        "bf16": precision == "bf16",
        "fp16": False,
        "activation_checkpointing": settings.activation_checkpointing,
        # On the CPU this also makes `torchrun` / `accelerate launch` ranks use gloo instead of NCCL.
        "use_cpu": device == "cpu",
        "dataloader_num_workers": 0,  # on two cores, worker processes would only compete with training
        "report_to": settings.report_to,
        "run_name": settings.run_name,
        "disable_tqdm": True,  # progress bars would flood pipeline logs; the curves live in MLflow
    }


def trl_config(config_class: type, settings: RecipeSettings, device: str, precision: str, **recipe: Any) -> Any:
    """`config_class` (a TRL config) from the recipe's fields that carry TRL's names (`learning_rate`,
    `num_train_epochs`, `per_device_train_batch_size`, `beta`, ...: passed through as they are), then
    `trainer_args` and the trainer's own `recipe` arguments (what the project derives or fixes), and on top
    the recipe's `trl_args`. A `trl_args` name the class does not have, or one already set, fails here,
    naming it, rather than being ignored or silently winning over a recipe field."""
    known = {field.name for field in dataclasses.fields(config_class)}
    named = {name: getattr(settings, name) for name in type(settings).model_fields if name in known}
    ours = {**named, **trainer_args(settings, device, precision), **recipe}
    unknown = sorted(set(settings.trl_args) - known)
    if unknown:
        raise ValueError(f"trl_args {unknown} are not arguments of TRL's {config_class.__name__}")
    taken = sorted(set(settings.trl_args) & set(ours))
    if taken:
        raise ValueError(
            f"trl_args {taken} are set by the recipe's own fields (or fixed by the project); set those fields instead"
        )
    return config_class(**ours, **settings.trl_args)


def lora_config(
    settings: RecipeSettings, model: torch.nn.Module, train_projector: bool = False, task_type: str | None = "CAUSAL_LM"
) -> LoraConfig:
    """The recipe's LoRA on `model`'s language model: its family's tower (and projector, unless trained whole
    through PEFT's `modules_to_save`) excluded from the targets."""
    family = family_of(model)
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
        exclude_modules=family.lora_exclude(train_projector),
        modules_to_save=[family.projector_to_save()] if train_projector else None,
        bias="none",
        task_type=task_type,
    )


@contextlib.contextmanager
def child_run(settings: RecipeSettings, records: Sequence[dict] = ()) -> Iterator[None]:
    """An MLflow run nested under the active one, held open for the whole train + evaluate cycle, tagged with
    the model it trains (`spavl.role: training`, `spavl.model`: `settings.artifact_name`) and with `records`
    as its training dataset input (`training_dataset`).

    With a run already active, transformers' MLflowCallback logs into it and leaves its lifetime to us.
    Two environment variables would make the callback start a run of its own instead (a grandchild, or a
    re-attach to some other run id), so they are neutralised for the duration and restored afterwards.
    We open the run rather than letting the callback do it (MLFLOW_NESTED_RUN=TRUE) because the callback
    closes its run at the end of `train()`: a final evaluation would land in the parent, and a crash
    mid-training would leave the child as the active run.

    The callback logs asynchronously. Closing the run drains MLflow's queue (`end_run` shuts the queue
    down), so the curves are complete without an explicit flush. By default MLflow's logging thread polls
    its queue with a 1 s timeout and only sees the shutdown after that poll: ~1 s idle per flush or close,
    which was 20-40% of a tiny CPU run (benchmarks/align_overhead.py). With a buffering interval set, the
    thread waits on the stop event instead, wakes at once on close, and writes the buffered steps as one
    batch; so one is set for the run unless the user chose their own.
    """
    # In a distributed run only rank 0 logs (transformers' callback checks the same); other ranks open nothing.
    if "mlflow" not in settings.report_to or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    names = ("MLFLOW_NESTED_RUN", "MLFLOW_RUN_ID", "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["MLFLOW_NESTED_RUN"] = "FALSE"
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    try:
        # `with` marks the run FAILED on an exception and pops it, so the parent is active again either way;
        # either way `end_run` drains the async logging queue first.
        tags = {"spavl.role": "training", "spavl.model": settings.artifact_name or settings.run_name}
        with mlflow.start_run(run_name=settings.run_name, nested=True, tags=tags, **_launched_parent()):
            if records:
                mlflow.log_input(training_dataset(records, settings.artifact_name or settings.run_name), "training")
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def training_dataset(records: Sequence[dict], name: str):
    """What a model trained on, as an MLflow dataset: the records' texts and a sha256 of each one's images, so
    the digest changes when any image or text does while the logged table stays small."""
    rows = [
        {
            **{key: value for key, value in record.items() if key != "images" and isinstance(value, str)},
            "images_sha256": hashlib.sha256(
                b"".join(_image_bytes(image) for image in record.get("images", ()))
            ).hexdigest(),
        }
        for record in records
    ]
    return mlflow.data.from_pandas(pd.DataFrame(rows), name=f"{name} training data")


def _image_bytes(image) -> bytes:
    """An encoded image as it is, a decoded one as its pixels (the smoke and some tests hand PIL images)."""
    return image if isinstance(image, bytes) else image.tobytes()


# A launched worker (train_worker under accelerate/torchrun) has no active run of its own: the launching node
# passes its run's id here so rank 0's child run still hangs under the Kedro run.
PARENT_RUN_ENV = "SPAVL_MLFLOW_PARENT_RUN_ID"


def _launched_parent() -> dict[str, str]:
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or mlflow.active_run() is not None:
        return {}
    return {"parent_run_id": parent, "experiment_id": mlflow.get_run(parent).info.experiment_id}


def prepare_for_generation(model: torch.nn.Module) -> None:
    """Eval mode, the trainer's patched `forward` removed, and the KV cache back on."""
    model.eval()
    # TRL's trainers install a `forward` on the instance, a closure over the original bound method. A deep
    # copy (Kedro's MemoryDataset makes one by default) would keep calling the *original* object's forward
    # through that closure, so drop it and fall back to the class forward; generation does not need it.
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.__dict__.pop("forward", None)
    # Without the KV cache, generation re-encodes the whole prefix each token: ~16x slower on tiny models.
    model.generation_config.use_cache = True
    text_config = base.config.get_text_config()
    if hasattr(text_config, "use_cache"):
        text_config.use_cache = True


def run_trainer(
    trainer: Any, curve_keys: Iterable[str], evaluate: bool = False, resume_from: str | None = None
) -> dict[str, float | str]:
    """Train a TRL / transformers trainer (then evaluate it once, when asked) and summarise the run: the
    curves' first and last points (`curve_summary`), train loss, optimiser steps, runtime, eval_* numbers,
    `optimiser_dtypes` (what the optimiser updated: "float32"), `activation_checkpointing` (whether the
    model recomputed its activations) and `resumed_from_step` (0 unless `resume_from`, a checkpoint, is given).
    Call it inside `child_run`, so the evaluation lands in the same MLflow run as the curves."""
    # With progress bars off, transformers prints every log row to stdout instead: noise in pipeline logs
    # when the same rows already go to MLflow and `log_history`.
    trainer.remove_callback(PrinterCallback)
    facts = _TrainingFacts()
    trainer.add_callback(facts)
    result = trainer.train(resume_from_checkpoint=resume_from)
    evaluated = trainer.evaluate() if evaluate else {}
    metrics = curve_summary(trainer.state.log_history, curve_keys)
    metrics["train_loss"] = float(result.training_loss)
    metrics["global_step"] = float(trainer.state.global_step)
    metrics["train_runtime"] = float(result.metrics.get("train_runtime", math.nan))
    metrics.update(
        {
            key: float(value)
            for key, value in evaluated.items()
            if key.startswith("eval_") and isinstance(value, (int, float))
        }
    )
    metrics["optimiser_dtypes"] = facts.dtypes
    metrics["activation_checkpointing"] = facts.checkpointing
    metrics["resumed_from_step"] = float(checkpoint_step(resume_from)) if resume_from else 0.0
    metrics["num_processes"] = float(trainer.accelerator.num_processes)
    return metrics


def curve_summary(log_history: list[dict], keys: Iterable[str]) -> dict[str, float]:
    """For each curve in `keys` that was logged: its last value as `key`, plus `key_first` and `key_last`.

    The trainer's end-of-run summary row has none of the curve keys, so it never counts as a point.
    """
    summary: dict[str, float] = {}
    for key in keys:
        points = [float(entry[key]) for entry in log_history if key in entry]
        if points:
            summary[key] = summary[f"{key}_last"] = points[-1]
            summary[f"{key}_first"] = points[0]
    return summary


def freeze_for_full_finetune(model: torch.nn.Module, train_projector: bool) -> None:
    """Freeze the vision tower (and the projector unless `train_projector`); everything else trains. The module
    names are the model's row of the architecture table; a projector inside the tower (Qwen2-VL's merger) is
    thawed again when it trains."""
    family = family_of(model)
    family.modules(model, "vision_tower").requires_grad_(False)
    family.modules(model, "projector").requires_grad_(train_projector)


def freeze_lm_head(model: torch.nn.Module) -> None:
    """Freeze the LM head, for a reward model, which reads the hidden state before it. A head tied to the
    input embeddings is left alone, as those are used."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(False)


# The column type of a chat prompt (a list of turns whose content is a list of typed parts), for GRPO / RLOO.
CHAT_PROMPT = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})


def on_disk_dataset(
    records: Iterable[dict],
    row: Callable[[dict], dict],
    columns: Iterable[str],
    scratch: str,
    column_types: dict[str, Any] | None = None,
) -> Dataset:
    """`row(record)` of every record, written to an Arrow file in a new folder under `scratch` and memory-mapped.

    `images` holds each row's images as given (PNG or JPEG bytes, or PIL images, which are stored as PNG) and
    comes back decoded, row by row, when a batch is read. `columns` are strings unless `column_types` says
    otherwise (`CHAT_PROMPT`). So neither decoded pixels nor the encodings of the whole run are ever in
    memory, only the pages of the file a batch touches: a run on 4N pairs needs the memory of one on N.
    The file is deleted with `scratch`.
    """
    types = column_types or {}
    features = Features({"images": List(Image()), **{name: types.get(name, Value("string")) for name in columns}})

    def generate() -> Iterator[dict]:
        for record in records:
            yield row(record)

    os.makedirs(scratch, exist_ok=True)
    # A fingerprint of our own: datasets would otherwise hash the generator, pickling every record it closes over.
    return Dataset.from_generator(
        generate,
        features=features,
        fingerprint=uuid.uuid4().hex,
        cache_dir=tempfile.mkdtemp(prefix="rows-", dir=scratch),
    )


# ---------------------------------------------------------------- checkpoints and resuming

FINGERPRINT_FILE = "run_fingerprint.txt"
# The file a checkpoint writes last (transformers' trainer state; the reward loop's own state): a checkpoint
# folder without it was cut off while being written and is never resumed from.
COMPLETE_MARKERS = ("trainer_state.json", "loop_state.pt")


def run_fingerprint(settings: RecipeSettings, records: Iterable[dict], model: torch.nn.Module) -> str:
    """What makes a run the same run: the recipe (not where it writes or logs), every record's text and image
    bytes, and the starting weights. A checkpoint is resumed only under the same fingerprint."""
    digest = hashlib.sha256(
        settings.model_dump_json(
            exclude={"output_dir", "checkpoint_dir", "report_to", "run_name", "logging_steps"}
        ).encode()
    )
    for record in records:
        for key in sorted(record):
            values = record[key] if key == "images" else [record[key]]
            for value in values:
                digest.update(
                    value
                    if isinstance(value, bytes)
                    else value.tobytes()
                    if hasattr(value, "tobytes")
                    else str(value).encode()
                )
    digest.update(weights_fingerprint(model.state_dict()).encode())
    return digest.hexdigest()[:24]


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))


def resume_point(settings: RecipeSettings, records: Iterable[dict], model: torch.nn.Module) -> str | None:
    """The latest complete checkpoint of this run (`run_fingerprint` of the recipe, `records` and `model`'s
    starting weights) in `settings.checkpoint_dir`, or None (checkpoints off, or none saved yet).
    Checkpoints of another run (the recipe, the data or the starting weights changed) are
    deleted with a warning, as resuming them would mix two runs. Under a multi-process launch only rank 0
    deletes and stamps; the other ranks resume only under a stamp that already matches."""
    if not settings.checkpoint_steps:
        return None
    fingerprint = run_fingerprint(settings, records, model)
    directory = Path(settings.checkpoint_dir)
    stamp = directory / FINGERPRINT_FILE
    same_run = stamp.exists() and stamp.read_text() == fingerprint
    if int(os.environ.get("RANK", "0")) == 0 and not same_run:
        if directory.exists() and any(directory.iterdir()):
            log.warning(
                "%s holds checkpoints of another run (recipe, data or starting weights differ): "
                "deleting them and training from the start",
                directory,
            )
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
        return None
    if not same_run:
        return None
    complete = [
        path
        for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and any((path / marker).exists() for marker in COMPLETE_MARKERS)
    ]
    return str(max(complete, key=checkpoint_step)) if complete else None


def finish_checkpoints(settings: RecipeSettings) -> None:
    """Delete a finished run's checkpoints: its result is in the catalog now, and a 7B checkpoint with its
    optimiser state is ~80 GB. Rank 0 only."""
    if settings.checkpoint_steps and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
