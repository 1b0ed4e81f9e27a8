"""CLIP text-image similarity: how SPA-VL assigned LAION-5B images to its 53 subcategories.

`ClipScorer` loads any CLIP-style model directory (or hub id) with the Auto* classes — CLIPModel with its
tokenizer and the PIL image processor (torchvision is not installed) — and returns cosine similarities.
`build_tiny_clip` makes a randomly initialised CLIP of ~36k parameters offline, with a tokenizer
trained in-process like the tiny LLaVAs: the embedded default and the tests exercise the same loading and
scoring code that runs a real CLIP ViT-L/14 in the paper profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import processors
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerFast,
)

from spavl_kedro.models.tiny import train_tokenizer

# CLIP's own start/end markers. Added after BPE training they get the highest ids, which is what CLIP's
# text pooling relies on (it reads the features at the end-of-text token).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ClipScorer:
    """Cosine similarity between images and texts from a CLIP model directory or hub id.

    >>> scorer = ClipScorer("openai/clip-vit-large-patch14")  # doctest: +SKIP
    >>> scorer.scores([image], ["a photo of a knife", "a photo of a cat"]).shape  # doctest: +SKIP
    (1, 2)
    """

    def __init__(self, path_or_id: str, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"ClipScorer: batch_size must be >= 1, got {batch_size}")
        self.model = AutoModel.from_pretrained(path_or_id, use_safetensors=True)
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(
                f"{path_or_id}: {type(self.model).__name__} is not a CLIP-style model "
                "(no get_image_features / get_text_features)"
            )
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        self.image_processor = AutoImageProcessor.from_pretrained(path_or_id)
        self.batch_size = batch_size
        # Real CLIP text towers see at most 77 tokens; longer prompts are cut, keeping the end-of-text token.
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_text_tokens = getattr(text_config, "max_position_embeddings", 77)

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Cosine similarities, shape [len(images), len(texts)], float32."""
        if not images or not texts:
            return np.zeros((len(images), len(texts)), dtype=np.float32)
        return (self.image_embeddings(images) @ self.text_embeddings(texts).T).numpy()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features, [len(texts), projection_dim]."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            enc.pop("token_type_ids", None)
            out.append(_features(self.model.get_text_features(**enc)))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image features, [len(images), projection_dim]."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)


def _features(output) -> torch.Tensor:
    # transformers 5 returns the projected features as `pooler_output` of a model output; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class TinyClip:
    """A CLIP model with its tokenizer and image processor, saved together as one model directory."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerFast
    image_processor: CLIPImageProcessorPil

    def save(self, path: str | Path) -> None:
        for part in (self.model, self.tokenizer, self.image_processor):
            part.save_pretrained(str(path))


def build_tiny_clip(
    texts: Sequence[str], seed: int, vocab_size: int = 512, hidden: int = 32, image_size: int = 32, patch_size: int = 8
) -> TinyClip:
    """A randomly initialised CLIP (1 layer per tower, `hidden` wide) with a BPE trained on `texts`.

    Random weights rank images arbitrarily but consistently; what this exercises is the real path:
    saving, loading with Auto* classes, tokenising, preprocessing and scoring.
    """
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS})
    bos, eos = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOS)
    # Every encoded text reads "<|startoftext|> ... <|endoftext|>", as with the real CLIP tokenizer.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    tokenizer.padding_side = "right"  # the tiny LLaVA tokenizer pads left for generation; CLIP does not generate
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=hidden // 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return TinyClip(CLIPModel(config).eval(), tokenizer, image_processor)
