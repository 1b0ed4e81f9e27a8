"""The architecture table: one row per model family, the only place that knows a family's module names and inputs.

Generation, DPO, SFT, the reward model, GRPO/RLOO, evaluation and preflight's memory report read a model's row
(`family_of`) and never name a family themselves. A row says:

- `model_types`: the `config.model_type` values it covers, and `model_class`, the transformers class that loads
  them (`AutoModelForImageTextToText` picks it; the row records it for the reader and the docs).
- `vision_tower`, `projector`, `language_model`: module paths under the model's trunk (`model.model`). Full
  fine-tuning freezes the tower (and the projector unless the recipe trains it); LoRA targets the language model
  only: the tower, and the projector unless trained whole, are excluded from the adapter's targets even with
  `all-linear`. A projector inside the tower (Qwen2-VL's `visual.merger`) is thawed after the tower is frozen.
- `image_tokens`: how an image becomes tokens. `fixed`: `config.image_seq_length` per image (or the tower's
  patch grid); `tiles`: that count per tile, and the processor cuts an image into up to `max_patches` tiles (plus
  a thumbnail); `grid`: one token per `merge_size`² patches of the resized image, so the count follows the
  image's size, up to the processor's `max_pixels`.
- `image_inputs` / `token_inputs`: what the processor returns besides `input_ids`, `attention_mask` and
  `pixel_values` that the model needs: per-image tensors (`image_grid_thw`, `image_sizes`: one row per image,
  concatenated over a batch) and per-token ones (`mm_token_type_ids`: padded like the input ids).
- `multi_image`: whether one prompt may hold several images (MIS's two-image prompts).
- `pads_to_square`: whether `align.policy.image_preprocessing: pad` (LLaVA's `expand2square`) applies.
- `prompt_format`: where the family's prompt format comes from.

Adding a family is one `Family(...)` in `FAMILIES` plus a tiny fixture for the tests (docs/align.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

ImageTokens = Literal["fixed", "tiles", "grid"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    model_class: str
    vision_tower: str
    projector: str
    language_model: str
    image_tokens: ImageTokens
    image_inputs: tuple[str, ...] = ()
    token_inputs: tuple[str, ...] = ()
    multi_image: bool = True
    pads_to_square: bool = False
    prompt_format: str = "the checkpoint's own chat template (chat_template.json)"

    def modules(self, model: torch.nn.Module, which: str) -> torch.nn.Module:
        """The module at this row's `which` ("vision_tower", "projector" or "language_model") path in `model`
        (a PEFT wrapper included); a model without it is not of this family, and that is said."""
        path = getattr(self, which)
        for name, module in model.named_modules(remove_duplicate=False):  # a module may sit under two names
            if name == path or name.endswith("." + path):
                return module
        raise ValueError(
            f"{type(model).__name__} has no '{path}' module, which the '{self.name}' family's "
            f"{which} is (models/families.py)"
        )

    def lora_exclude(self, train_projector: bool) -> str:
        """A PEFT `exclude_modules` regex: the tower, and the projector unless it trains whole. A regex, as a list
        entry would exclude only the module of that exact name, not the linear layers inside it."""
        excluded = [self.vision_tower] if train_projector else [self.vision_tower, self.projector]
        return r".*\b(" + "|".join(path.replace(".", r"\.") for path in excluded) + r")(\..*)?"

    def projector_to_save(self) -> str:
        """The name PEFT's `modules_to_save` matches the projector by (its last path component)."""
        return self.projector.rsplit(".", 1)[-1]

    def model_inputs(self, encoded: Any) -> dict[str, torch.Tensor]:
        """The tensors of a processor's output that this family's forward pass takes besides the token ids."""
        keys = ("pixel_values", *self.image_inputs, *self.token_inputs)
        return {key: encoded[key] for key in keys if key in encoded and encoded[key] is not None}


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llava-1.5",
        model_types=("llava",),
        model_class="LlavaForConditionalGeneration",
        vision_tower="vision_tower",
        projector="multi_modal_projector",
        language_model="language_model",
        image_tokens="fixed",
        pads_to_square=True,
        prompt_format="llava-hf's chat_template.json; LLaVA's own conv_vicuna_v1 through a template file "
        "(conf/paper/templates/llava_conv_vicuna_v1.jinja, from llava/conversation.py)",
    ),
    Family(
        name="llava-next",
        model_types=("llava_next", "llava_onevision"),
        model_class="LlavaNextForConditionalGeneration / LlavaOnevisionForConditionalGeneration",
        vision_tower="vision_tower",
        projector="multi_modal_projector",
        language_model="language_model",
        image_tokens="tiles",
        image_inputs=("image_sizes",),
    ),
    Family(
        name="qwen2-vl",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        model_class="Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration",
        vision_tower="visual",
        projector="visual.merger",
        language_model="language_model",
        image_tokens="grid",
        image_inputs=("image_grid_thw",),
        token_inputs=("mm_token_type_ids",),
    ),
    Family(
        name="internvl",
        model_types=("internvl",),
        model_class="InternVLForConditionalGeneration (-hf checkpoints)",
        vision_tower="vision_tower",
        projector="multi_modal_projector",
        language_model="language_model",
        image_tokens="tiles",
    ),
)


def family_named(model_type: str) -> Family:
    """The row covering `model_type` (a config's `model_type`); an unknown one fails, naming the table."""
    families = FAMILIES  # read at call time, so a row added to the table counts at once
    for family in families:
        if model_type in family.model_types:
            return family
    known = sorted(t for family in families for t in family.model_types)
    raise ValueError(
        f"no row of the architecture table (models/families.py) covers model_type '{model_type}'; "
        f"known: {known}. Add a Family row for it"
    )


def family_of(model: Any) -> Family:
    """The row of a model (a PEFT wrapper, a reward model's backbone) or of its config."""
    return family_named(getattr(model, "config", model).model_type)


def image_tokens_per_image(config: Any, processor_config: dict | None = None) -> int:
    """At most how many tokens one image becomes in a model of this `config`, given its processor's saved
    settings (`preprocessor_config.json`; missing values take the processors' defaults): what preflight sizes
    sequences by."""
    family = family_of(config)
    settings = processor_config or {}
    vision = getattr(config, "vision_config", None)
    if family.image_tokens == "grid":
        merge = settings.get("merge_size", getattr(vision, "spatial_merge_size", 2))
        patch = settings.get("patch_size", getattr(vision, "patch_size", 14))
        max_pixels = settings.get("max_pixels") or (settings.get("size") or {}).get("longest_edge", 12845056)
        return int(max_pixels // (patch * merge) ** 2)
    per_tile = (
        settings.get("image_seq_length")
        or getattr(config, "image_seq_length", None)
        or int(
            (_side(vision.image_size) // _side(vision.patch_size)) ** 2  # InternVL's pixel shuffle:
            * getattr(config, "downsample_ratio", 1) ** 2
        )
    )  # a quarter of the patches
    if family.image_tokens == "tiles":
        # the tiles of the largest grid the processor may choose, plus one thumbnail / base image
        tiles, newlines = settings.get("max_patches", 12), 0
        pinpoints = settings.get("image_grid_pinpoints")
        if pinpoints:  # LLaVA-NeXT's "anyres" grids, in pixels of tiles of the tower's own size
            side = _side(vision.image_size)
            tiles = max(h // side * (w // side) for h, w in pinpoints)
            # and one image_newline token after each row of patches of the tiled image (LLaVA-NeXT's
            # pack_image_features): at most the tallest grid's rows
            newlines = max(h // side for h, _ in pinpoints) * (side // _side(vision.patch_size))
        return int(per_tile * (tiles + 1) + newlines)
    return int(per_tile)


def _side(size: int | Sequence[int]) -> int:
    """A square size as one number (InternVL's vision config writes [height, width])."""
    return size if isinstance(size, int) else int(size[0])
