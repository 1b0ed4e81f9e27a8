"""Model access for vision-language models: prompts in, texts out.

`TransformersVLM` runs any image-text-to-text model held in memory (a tiny LLaVA built offline, or a
model directory / hub id loaded with `load_vlm`) with batched generation. Callers never see tensors.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from spavl_kedro.backends.tiny import VLM, user_message


@dataclass(frozen=True)
class Prompt:
    """One user turn: zero or more images (PNG bytes) followed by a question."""

    text: str
    images: tuple[bytes, ...] = ()


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence), "length" (max_new_tokens reached) or "error"
    latency_s: float
    error: str | None = None


class VLMBackend(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]: ...


def load_vlm(path_or_id: str, **kwargs: Any) -> VLM:
    """Load a model directory or hub id; remote code stays off unless the caller passes it explicitly."""
    processor = AutoProcessor.from_pretrained(path_or_id)
    model = AutoModelForImageTextToText.from_pretrained(path_or_id, **kwargs)
    model.eval()
    return VLM(model=model, processor=processor)


def load_processor(path: str):
    return AutoProcessor.from_pretrained(path)


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@dataclass
class TransformersVLM:
    """Batched local generation. `generation` holds `generate()` kwargs (max_new_tokens, do_sample, ...)."""

    name: str
    vlm: VLM
    batch_size: int = 16
    generation: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        results: list[Generation] = []
        batches = range(0, len(prompts), self.batch_size)
        for n, start in enumerate(tqdm(batches, desc=f"generate[{self.name}]", unit="batch",
                                       disable=not self.progress or len(batches) < 2)):
            batch = prompts[start : start + self.batch_size]
            # Seed per batch so a record's sample does not depend on what ran before it in the process.
            torch.manual_seed(self.seed * 1_000_003 + n)
            began = time.perf_counter()
            try:
                texts, reasons = self._generate_batch(batch)
            except Exception as exc:  # keep the records, with the error, rather than lose the batch
                elapsed = (time.perf_counter() - began) / len(batch)
                results += [Generation("", "error", elapsed, f"{type(exc).__name__}: {exc}") for _ in batch]
                continue
            elapsed = (time.perf_counter() - began) / len(batch)
            results += [Generation(t, r, elapsed) for t, r in zip(texts, reasons)]
        return results

    def _generate_batch(self, batch: Sequence[Prompt]) -> tuple[list[str], list[str]]:
        processor = self.vlm.processor
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        texts = [processor.apply_chat_template(user_message(p.text, len(p.images)), add_generation_prompt=True)
                 for p in batch]
        images = [decode_image(img) for p in batch for img in p.images]
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        kwargs = {"use_cache": True, "pad_token_id": tokenizer.pad_token_id, **self.generation}
        with torch.inference_mode():
            output = self.vlm.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        eos = tokenizer.eos_token_id
        reasons = ["stop" if (row == eos).any() else "length" for row in new_tokens]
        decoded = processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [d.strip() for d in decoded], reasons
