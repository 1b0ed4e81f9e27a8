"""Images as the project carries them: PNG bytes in tables, prompts and judge items (no torch here)."""

from __future__ import annotations

import io

from PIL import Image


def png_bytes(image: Image.Image | bytes) -> bytes:
    """PNG bytes of an image (bytes pass through)."""
    if isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def as_image(image: Image.Image | bytes) -> Image.Image:
    """An image, decoded from its bytes if it comes encoded: trainers keep images encoded until a batch needs them."""
    return image if isinstance(image, Image.Image) else decode_image(image)
