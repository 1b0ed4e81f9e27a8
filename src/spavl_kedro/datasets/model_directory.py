"""A Kedro dataset for model directories written with `save_pretrained`.

kedro-datasets has no dataset for a local Hugging Face model directory (HFDataset is hub-only and
load-only), and models are data here: keeping them in the catalog lets kedro-viz show which table trained
which model and which model produced which answers.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Any, Literal

from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.models.tiny import VLM
from spavl_kedro.models.vlm import load_processor, load_vlm
from spavl_kedro.training.adapters import LoraAdapter, load_adapter, save_adapter


class ModelDirectoryDataset(AbstractDataset):
    """Saves and loads one model directory.

    kind:
      vlm        a `VLM` (model + processor) <-> config, safetensors and processor files
      processor  a processor alone (the tiny tokenizer + image processor every tiny model shares)
      adapter    a `LoraAdapter` (PEFT config + tensors) <-> adapter_config.json + adapter_model.safetensors
      auto       whichever of vlm, adapter or reward model (training/reward.py) each object is; loading
                 tells them apart by their files (the aligned models: adapters, full fine-tunes, reward models)

    With `collection: true` the entry holds several models of that kind, one sub-directory each
    (e.g. the responder pool): save a dict name -> model; load gives a dict name -> loader function, so a
    node loads one model at a time. (PartitionedDataset cannot do this: it treats every file as a
    partition, not every directory.)

    Saving replaces the directory, so a rerun never mixes files of two models. A collection with
    `merge: true` replaces only the entries it is given and keeps the others: each alignment run adds its
    model next to those of earlier runs, and evaluation finds them all.
    """

    def __init__(
        self,
        filepath: str,
        kind: Literal["vlm", "processor", "adapter", "auto"] = "vlm",
        collection: bool = False,
        merge: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if kind not in ("vlm", "processor", "adapter", "auto"):
            raise DatasetError(
                f"ModelDirectoryDataset({filepath}): kind must be vlm, processor, adapter or auto, not '{kind}'"
            )
        if merge and not collection:
            raise DatasetError(f"ModelDirectoryDataset({filepath}): merge applies to a collection only")
        self._path = Path(filepath)
        self._kind = kind
        self._collection = collection
        self._merge = merge
        self.metadata = metadata

    def load(self) -> Any:
        if self._merge and not self._path.is_dir():
            return {}  # a merging collection nobody has written to yet
        if not self._path.is_dir():
            raise DatasetError(f"model directory {self._path} does not exist: run the pipeline that writes it first")
        if self._collection:
            return {d.name: partial(self._load_one, d) for d in sorted(self._path.iterdir()) if d.is_dir()}
        return self._load_one(self._path)

    def save(self, data: Any) -> None:
        if self._collection and not isinstance(data, dict):
            raise DatasetError(f"{self._path}: a collection saves a dict name -> model, got {type(data).__name__}")
        items = data.items() if self._collection else [(None, data)]
        if self._merge:
            for name, _ in items:
                if (self._path / name).exists():
                    shutil.rmtree(self._path / name)
        elif self._path.exists():
            shutil.rmtree(self._path)
        self._path.mkdir(parents=True, exist_ok=True)
        for name, model in items:
            self._save_one(model, self._path / name if name is not None else self._path)

    def _load_one(self, path: Path) -> Any:
        kind = self._kind if self._kind != "auto" else _kind_on_disk(path)
        if kind == "reward":
            from spavl_kedro.training.reward import load_reward_model

            return load_reward_model(str(path))
        if kind == "vlm":
            return load_vlm(str(path))
        if kind == "processor":
            return load_processor(str(path))
        return load_adapter(str(path))

    def _save_one(self, data: Any, path: Path) -> None:
        if self._kind == "auto":
            return _save_auto(data, path)
        expected = {"vlm": VLM, "adapter": LoraAdapter}.get(self._kind)
        if expected is not None and not isinstance(data, expected):
            raise DatasetError(f"{path}: expected a {expected.__name__}, got {type(data).__name__}")
        path.mkdir(parents=True, exist_ok=True)
        if self._kind == "vlm":
            data.model.save_pretrained(path)
            data.processor.save_pretrained(path)
        elif self._kind == "processor":
            data.save_pretrained(path)
        else:
            save_adapter(data, str(path))

    def _exists(self) -> bool:
        return self._path.is_dir() and any(self._path.iterdir())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "kind": self._kind, "collection": self._collection, "merge": self._merge}


def _kind_on_disk(path: Path) -> str:
    from spavl_kedro.training.reward import HEAD_CONFIG

    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / HEAD_CONFIG).exists():
        return "reward"
    return "vlm"


def _save_auto(data: Any, path: Path) -> None:
    from spavl_kedro.training.reward import RewardModel, save_reward_model

    path.mkdir(parents=True, exist_ok=True)
    if isinstance(data, LoraAdapter):
        save_adapter(data, str(path))
    elif isinstance(data, VLM):
        data.model.save_pretrained(path)
        data.processor.save_pretrained(path)
    elif isinstance(data, RewardModel):
        save_reward_model(data, str(path))
    else:
        raise DatasetError(f"{path}: expected a LoraAdapter, VLM or RewardModel, got {type(data).__name__}")
