"""LoRA adapters as plain data: a PEFT config and its tensors, independent of any loaded base model.

The DPO node returns one, the catalog saves it in PEFT's own file layout (so `PeftModel.from_pretrained`
reads it too), and evaluation merges it into a copy of the base policy it was trained from: `base` names it
(`base`, or an entry of `align.bases`), kept in the weights file's metadata.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spavl_kedro.models.specs import BASE
from spavl_kedro.models.tiny import VLM

WEIGHTS_NAME = "adapter_model.safetensors"
BASE_KEY = "spavl_kedro.base"  # safetensors metadata: the base policy's name


@dataclass
class LoraAdapter:
    config: PeftConfig
    state_dict: dict[str, torch.Tensor]
    base: str = BASE  # the base policy it was trained from, as evaluation names it

    @classmethod
    def from_peft(cls, model: PeftModel) -> LoraAdapter:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        return cls(config=copy.deepcopy(model.peft_config["default"]), state_dict=state)


def save_adapter(adapter: LoraAdapter, directory: str) -> None:
    adapter.config.save_pretrained(directory)
    save_file(adapter.state_dict, str(Path(directory) / WEIGHTS_NAME), metadata={BASE_KEY: adapter.base})


def load_adapter(directory: str) -> LoraAdapter:
    weights = str(Path(directory) / WEIGHTS_NAME)
    with safe_open(weights, framework="pt") as opened:
        base = (opened.metadata() or {}).get(BASE_KEY, BASE)  # adapters saved before bases existed: the one base
    return LoraAdapter(config=PeftConfig.from_pretrained(directory), state_dict=load_file(weights), base=base)


def apply_adapter(base: VLM, adapter: LoraAdapter) -> VLM:
    """A new VLM: a copy of `base` with `adapter` merged into its weights (the base is left untouched)."""
    model = get_peft_model(copy.deepcopy(base.model), copy.deepcopy(adapter.config))
    result = set_peft_model_state_dict(model, adapter.state_dict)
    if result.unexpected_keys:
        raise ValueError(f"adapter does not fit the base policy: unexpected keys {result.unexpected_keys[:5]}")
    merged = model.merge_and_unload()
    merged.eval()
    return VLM(model=merged, processor=base.processor)
