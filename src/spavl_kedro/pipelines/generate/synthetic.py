"""The synthetic image source: keyword typography on a motif, one colour per domain, one motif per category.

It stands in for SPA-VL's LAION-5B retrieval in the embedded default, so images of different harm areas
differ visually and not only in their text, and a tiny model can tell them apart.
"""

from __future__ import annotations

import hashlib
import io
import random

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from spavl_kedro.grounding import CAPTION
from spavl_kedro.schema import validate
from spavl_kedro.seeding import stream

# One background colour per domain and one motif per category, so images of different harm areas differ
# visually and not only in their typography.
# The colour is named in the caption, so a grounded answer ("a red circle ...") can be checked against it.
PALETTE = {
    "red": (180, 40, 40),
    "blue": (40, 90, 170),
    "green": (40, 140, 80),
    "purple": (150, 60, 150),
    "orange": (200, 130, 30),
    "grey": (60, 60, 60),
}
MOTIFS = [
    "circle",
    "square",
    "triangle",
    "cross",
    "stripes",
    "ring",
    "diamond",
    "grid",
    "bars",
    "dots",
    "arrow",
    "frame",
    "wave",
]
# A badge in the top-right corner, the image's own fact: the images of one subcategory take distinct badges
# (from a seeded offset), so of two images shown together each has something the other lacks (MIS perception).
BADGES = {
    "gold": (250, 200, 0),
    "pink": (255, 140, 200),
    "cyan": (0, 230, 230),
    "lime": (160, 255, 0),
    "brown": (110, 60, 20),
    "black": (0, 0, 0),
}


def render_images(taxonomy: pd.DataFrame, per_subcategory: int, size: int, seed: int) -> pd.DataFrame:
    """`per_subcategory` synthetic images per subcategory, as the `images` table."""
    domains = sorted(taxonomy["class1"].unique())
    categories = sorted(taxonomy[["class1", "class2"]].drop_duplicates().itertuples(index=False, name=None))
    rows, seen = [], set()
    for sub in taxonomy.itertuples(index=False):
        first_badge = stream(seed, sub.class3, "badge").randrange(len(BADGES))
        for i in range(per_subcategory):
            rng = stream(seed, sub.class3, i)
            keyword = sub.keywords[i % len(sub.keywords)]
            colour = list(PALETTE)[domains.index(sub.class1) % len(PALETTE)]
            motif = MOTIFS[categories.index((sub.class1, sub.class2)) % len(MOTIFS)]
            badge = list(BADGES)[(first_badge + i) % len(BADGES)]
            png = render_image(keyword, PALETTE[colour], motif, BADGES[badge], size, rng)
            sha = hashlib.sha256(png).hexdigest()
            if sha in seen:  # identical pixels would let one image leak across splits
                continue
            seen.add(sha)
            rows.append(
                {
                    "image_id": f"{_slug(sub.class3)}-{i:03d}",
                    "class1": sub.class1,
                    "class2": sub.class2,
                    "class3": sub.class3,
                    "source": "synthetic",
                    "sha256": sha,
                    "width": size,
                    "height": size,
                    "caption": CAPTION.format(colour=colour, motif=motif, badge=badge, keyword=keyword),
                    "png": png,
                }
            )
    return validate(pd.DataFrame(rows), "images")


def render_image(
    keyword: str, colour: tuple[int, int, int], motif: str, badge: tuple[int, int, int], size: int, rng: random.Random
) -> bytes:
    jitter = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    img = Image.new("RGB", (size, size), jitter)
    draw = ImageDraw.Draw(img)
    s, fg = size, (240, 240, 240)
    x0, y0 = rng.randint(s // 8, s // 4), rng.randint(s // 8, s // 4)
    x1, y1 = s - x0, s - y0
    if motif in ("circle", "ring", "dots"):
        draw.ellipse(
            (x0, y0, x1, y1),
            outline=fg,
            width=4 if motif == "ring" else 1,
            fill=None if motif == "ring" else fg if motif == "circle" else None,
        )
        if motif == "dots":
            for _ in range(12):
                cx, cy = rng.randint(0, s), rng.randint(0, s)
                draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=fg)
    elif motif in ("square", "frame", "grid"):
        draw.rectangle(
            (x0, y0, x1, y1), outline=fg, width=5 if motif == "frame" else 1, fill=fg if motif == "square" else None
        )
        if motif == "grid":
            for k in range(0, s, s // 6):
                draw.line((k, 0, k, s), fill=fg)
                draw.line((0, k, s, k), fill=fg)
    elif motif in ("triangle", "diamond", "arrow"):
        pts = {
            "triangle": [(s // 2, y0), (x1, y1), (x0, y1)],
            "diamond": [(s // 2, y0), (x1, s // 2), (s // 2, y1), (x0, s // 2)],
            "arrow": [(x0, s // 2), (x1, y0), (x1, y1)],
        }[motif]
        draw.polygon(pts, fill=fg)
    else:  # cross, stripes, bars, wave
        for k in range(0, s, s // 8):
            if motif == "cross":
                draw.line((0, k, s, s - k), fill=fg, width=2)
            elif motif == "stripes":
                draw.line((k, 0, k + s // 4, s), fill=fg, width=3)
            elif motif == "bars":
                draw.rectangle((k, s - rng.randint(s // 6, s // 2), k + s // 16, s), fill=fg)
            else:
                draw.arc((k - s // 8, s // 3, k + s // 8, 2 * s // 3), 0, 180, fill=fg, width=2)
    side = size // 4  # a quarter of the side: one patch of the tiny models' 32-pixel input
    draw.rectangle((s - side, 0, s, side), fill=badge, outline=(255, 255, 255))
    font = ImageFont.load_default(size=max(10, size // 8))
    draw.rectangle((0, s - s // 4, s, s), fill=(20, 20, 20))
    draw.text((4, s - s // 4 + 2), keyword, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
