"""Real image sources for the `images` table: a labelled local manifest, or LAION-style web metadata.

The synthetic renderer (`nodes.render_images`) is the embedded default. These pure functions turn the
records an `ImageManifestDataset` loaded (raw bytes, never decoded there) into the same `images` table:
RGB PNG bytes, the sha256 of those bytes, no two rows with identical pixels.

  decode     bytes -> RGB PNG (EXIF rotation applied, transparency on white, longest side <= max_side)
  place      manifest: the row's subcategory, else its keywords matched against the taxonomy;
             laion: keywords found in the caption, or CLIP similarity to one prompt per subcategory
  de-dup     by sha256 of the stored PNG, first row wins
  cap        at most `per_subcategory` images per subcategory: the first in manifest order, or for laion
             the best scored (keyword hits or CLIP similarity) — SPA-VL's per-subcategory CLIP retrieval
             from LAION-5B, with each image going to its single best subcategory so none serves two

What happens to rows is counted, never silent. A *bad* row (unreadable file, failed fetch, undecodable
bytes, unknown subcategory, manifest keywords that match nothing) stops the run with one message naming
every bad row (`on_bad_row: error`), or goes to the quarantine table (`on_bad_row: quarantine`).
Duplicates are not errors: they go to the quarantine table too, with the row they duplicate, so a user can
see which files were dropped. Rows that are fine but not needed — over the per-subcategory cap, or LAION
captions that name no subcategory — are only counted in the returned `report`: at LAION scale they are
most rows, and listing them would bury the rows that need a human look.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from spavl_kedro.config import ImageSourceConfig, typed
from spavl_kedro.schema import TABLES, validate

log = logging.getLogger(__name__)

RECORD_COLUMNS = TABLES["image_records"]
QUARANTINE_COLUMNS = TABLES["image_quarantine"]
REPORT_KEYS = [
    "rows",
    "images",
    "bad",
    "duplicates",
    "unassigned",
    "over_cap",
    "subcategories_filled",
    "subcategories_short",
]
MAX_LISTED_BAD_ROWS = 20  # an error message listing thousands of rows helps nobody; the count says the rest
SCORE_CHUNK = 256  # images decoded at once for CLIP scoring: bounds memory on large LAION shards


class Scorer(Protocol):
    """Image-text similarity, e.g. `models.clip.ClipScorer`."""

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class _Candidate:
    """A manifest row whose bytes decoded, on its way to the images table."""

    row: int
    path: str
    caption: str
    png: bytes
    sha256: str
    width: int
    height: int
    class3: str | None = None
    score: float = 0.0  # laion ranking: keyword hits or CLIP similarity


def collect_source_images(
    records: pd.DataFrame,
    taxonomy: pd.DataFrame,
    cfg: ImageSourceConfig | dict[str, Any],
    per_subcategory: int,
    scorer: Scorer | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """The `images` table from manifest records, by `cfg.source`; loads the CLIP model when assign is clip.

    Returns (images, quarantine, report); see `images_from_manifest` and `images_from_laion`.
    """
    cfg = typed(ImageSourceConfig, cfg)
    if cfg.source == "synthetic":
        raise ValueError("images source 'synthetic' is rendered by render_images, not read from a manifest")
    if cfg.source == "manifest":
        return images_from_manifest(records, taxonomy, cfg, per_subcategory)
    if cfg.assign == "clip" and scorer is None:
        from spavl_kedro.models.clip import ClipScorer  # torch + transformers only when CLIP is used

        scorer = ClipScorer(cfg.clip_model, batch_size=cfg.clip_batch_size)
    return images_from_laion(records, taxonomy, cfg, per_subcategory, scorer)


def images_from_manifest(
    records: pd.DataFrame, taxonomy: pd.DataFrame, cfg: ImageSourceConfig, per_subcategory: int
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Images from a labelled local manifest: the row's subcategory, else a keyword match.

    Returns (images, quarantine, report): `images` in the schema's columns with source "manifest";
    `quarantine` (row, path, caption, reason) with bad rows (when on_bad_row is quarantine) and
    duplicates; `report` counts (REPORT_KEYS). Raises ValueError naming every bad row when on_bad_row is
    error.
    """
    _check_inputs(records, taxonomy, per_subcategory, "manifest")
    candidates, bad = _decode_all(records, cfg.max_side)
    names = list(taxonomy["class3"])
    known = set(names)
    matcher = _KeywordMatcher(taxonomy)
    meta = records.set_index("row")
    placed = []
    for c in candidates:
        subcategory, keywords = _text(meta.at[c.row, "subcategory"]), meta.at[c.row, "keywords"]
        keywords = [] if keywords is None or np.ndim(keywords) == 0 else [str(k) for k in keywords]
        if subcategory is not None:
            if subcategory in known:
                c.class3 = subcategory
            else:
                close = difflib.get_close_matches(subcategory, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                bad.append((c.row, c.path, c.caption, f"unknown subcategory '{subcategory}'{hint}"))
                continue
        elif keywords:
            c.class3, _ = matcher.best(" ; ".join(keywords), cfg.min_keyword_hits)
            if c.class3 is None:
                bad.append((c.row, c.path, c.caption, f"no subcategory matches keywords {keywords}"))
                continue
        else:
            bad.append((c.row, c.path, c.caption, "no subcategory and no keywords"))
            continue
        placed.append(c)
    return _finish(records, taxonomy, cfg, per_subcategory, "manifest", placed, bad, unassigned=0)


def images_from_laion(
    records: pd.DataFrame,
    taxonomy: pd.DataFrame,
    cfg: ImageSourceConfig,
    per_subcategory: int,
    scorer: Scorer | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Images from LAION-style records (url/path + caption), placed by caption keywords or by CLIP.

    keywords: a subcategory's terms (its keywords and its own name) are matched case-insensitively on word
    boundaries, a plural -s/-es allowed; the subcategory with most distinct hits wins, ties go to the
    first in taxonomy order; fewer than `min_keyword_hits` leaves the row unassigned (counted, not an
    error). clip (`scorer` required): one prompt per subcategory (`clip_prompt`), each image goes to its
    most similar one. Then per subcategory the `per_subcategory` best scored images are kept.
    Returns (images, quarantine, report) as `images_from_manifest`, with source "laion".
    """
    _check_inputs(records, taxonomy, per_subcategory, "laion")
    candidates, bad = _decode_all(records, cfg.max_side)
    if cfg.assign == "clip":
        if scorer is None:
            raise ValueError("assign 'clip' needs a scorer (e.g. models.clip.ClipScorer(clip_model))")
        _assign_by_clip(candidates, taxonomy, cfg, scorer)
    else:
        matcher = _KeywordMatcher(taxonomy)
        for c in candidates:
            c.class3, c.score = matcher.best(c.caption, cfg.min_keyword_hits)
    placed = [c for c in candidates if c.class3 is not None]
    return _finish(
        records, taxonomy, cfg, per_subcategory, "laion", placed, bad, unassigned=len(candidates) - len(placed)
    )


def slug(text: str) -> str:
    """'drug-related crimes' -> 'drug_related_crimes' (the same slug as the synthetic image ids)."""
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def to_png(data: bytes, max_side: int) -> tuple[bytes, int, int]:
    """Decode any format PIL reads into RGB PNG bytes, longest side at most `max_side`; (png, width, height).

    EXIF orientation is applied (phone photos otherwise lie on their side) and transparency is flattened
    on white (web logos and icons otherwise turn black). Raises what PIL raises for undecodable bytes.
    """
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()  # decodes all pixels now: a truncated file fails here, not later in a model
        image = ImageOps.exif_transpose(opened)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    else:
        image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), image.width, image.height


class _KeywordMatcher:
    """Distinct taxonomy terms (keywords + the subcategory's own name) found in a text, per subcategory."""

    def __init__(self, taxonomy: pd.DataFrame) -> None:
        self.patterns = []
        for sub in taxonomy.itertuples(index=False):
            terms = {" ".join(t.lower().split()) for t in [sub.class3, *list(sub.keywords)] if str(t).strip()}
            # Longest first, so "slot machine" wins over a shorter term inside it; words may be separated by
            # any whitespace; (?<!\w) / (?!\w) instead of \b so a term ending in a symbol still matches.
            ordered = sorted(terms, key=lambda t: (-len(t), t))
            alternation = "|".join(r"\s+".join(map(re.escape, t.split())) for t in ordered)
            self.patterns.append((sub.class3, re.compile(rf"(?<!\w)({alternation})(?:e?s)?(?!\w)", re.IGNORECASE)))

    def best(self, text: str, min_hits: int) -> tuple[str | None, float]:
        """(subcategory with most distinct hits, hits); ties -> first in taxonomy order; None below min_hits."""
        best, best_hits = None, 0
        for class3, pattern in self.patterns:
            hits = len({" ".join(m.lower().split()) for m in pattern.findall(text or "")})
            if hits > best_hits:
                best, best_hits = class3, hits
        return (best, float(best_hits)) if best_hits >= min_hits else (None, float(best_hits))


def _assign_by_clip(
    candidates: list[_Candidate], taxonomy: pd.DataFrame, cfg: ImageSourceConfig, scorer: Scorer
) -> None:
    names = list(taxonomy["class3"])
    prompts = [
        cfg.clip_prompt.format(
            class1=s.class1, class2=s.class2, class3=s.class3, description=s.description, keywords=", ".join(s.keywords)
        )
        for s in taxonomy.itertuples(index=False)
    ]
    for start in range(0, len(candidates), SCORE_CHUNK):
        chunk = candidates[start : start + SCORE_CHUNK]
        scores = np.asarray(scorer.scores([Image.open(io.BytesIO(c.png)) for c in chunk], prompts))
        if scores.shape != (len(chunk), len(prompts)):
            raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(chunk), len(prompts))}")
        for c, row in zip(chunk, scores):
            best = int(row.argmax())  # first maximum: ties go to taxonomy order, as for keywords
            if cfg.min_clip_score is None or row[best] >= cfg.min_clip_score:
                c.class3, c.score = names[best], float(row[best])


def _check_inputs(records: pd.DataFrame, taxonomy: pd.DataFrame, per_subcategory: int, source: str) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"{source} records are missing column(s) {missing}: load them with ImageManifestDataset")
    if per_subcategory < 1:
        raise ValueError(f"per_subcategory must be >= 1, got {per_subcategory}")
    if records.empty:
        raise ValueError(
            f"the {source} manifest has no rows: is its file missing (an optional catalog entry loads as empty)?"
        )
    if taxonomy["class3"].duplicated().any():
        raise ValueError("taxonomy class3 names must be unique to place images by subcategory")


def _text(value: Any) -> str | None:
    """A cell as text, or None when missing (None, NaN or pd.NA: pandas 3 stores missing text as NaN)."""
    return value if isinstance(value, str) and value else None


def _decode_all(records: pd.DataFrame, max_side: int) -> tuple[list[_Candidate], list[tuple]]:
    """Decoded candidates in manifest order, and bad rows (row, path, caption, reason)."""
    candidates, bad = [], []
    for r in records.sort_values("row").itertuples(index=False):
        row, path, caption = int(r.row), _text(r.path), _text(r.caption) or ""
        if _text(r.read_error) or not isinstance(r.data, (bytes, bytearray, memoryview)):
            bad.append((row, path, caption, _text(r.read_error) or "no data"))
            continue
        try:
            png, width, height = to_png(bytes(r.data), max_side)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the row bad, never the run
            # PIL names the in-memory buffer by its address; dropped so reruns give identical tables.
            message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)) or type(exc).__name__
            bad.append((row, path, caption, f"unreadable image: {message}"))
            continue
        candidates.append(_Candidate(row, path, caption, png, hashlib.sha256(png).hexdigest(), width, height))
    return candidates, bad


def _finish(
    records: pd.DataFrame,
    taxonomy: pd.DataFrame,
    cfg: ImageSourceConfig,
    per_subcategory: int,
    source: str,
    placed: list[_Candidate],
    bad: list[tuple],
    unassigned: int,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Bad-row policy, de-dup, cap, and the three returned tables."""
    bad.sort()
    if bad and cfg.on_bad_row == "error":
        listed = "\n".join(f"  row {row} ({path}): {reason}" for row, path, _, reason in bad[:MAX_LISTED_BAD_ROWS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise ValueError(
            f"{len(bad)} of {len(records)} {source} rows are bad (on_bad_row: error; set "
            f"on_bad_row: quarantine to set them aside):\n{listed}{more}"
        )
    quarantine = list(bad)
    first_row: dict[str, int] = {}
    unique = []
    for c in sorted(placed, key=lambda c: c.row):
        if c.sha256 in first_row:
            quarantine.append((c.row, c.path, c.caption, f"duplicate of row {first_row[c.sha256]}"))
        else:
            first_row[c.sha256] = c.row
            unique.append(c)
    by_subcategory: dict[str, list[_Candidate]] = {}
    for c in sorted(unique, key=lambda c: (-c.score, c.row)):  # manifest scores are all 0: manifest order
        by_subcategory.setdefault(c.class3, []).append(c)
    classes = taxonomy.set_index("class3")
    rows = []
    for class3 in taxonomy["class3"]:  # taxonomy order, like the synthetic table
        for c in by_subcategory.get(class3, [])[:per_subcategory]:
            rows.append(
                {
                    "image_id": f"{slug(class3)}-{c.sha256[:10]}",
                    "class1": classes.at[class3, "class1"],
                    "class2": classes.at[class3, "class2"],
                    "class3": class3,
                    "source": source,
                    "sha256": c.sha256,
                    "width": c.width,
                    "height": c.height,
                    "caption": c.caption,
                    "png": c.png,
                }
            )
    images = validate(pd.DataFrame(rows, columns=TABLES["images"]), "images")
    counts = {name: min(len(found), per_subcategory) for name, found in by_subcategory.items()}
    short = [name for name in taxonomy["class3"] if counts.get(name, 0) < per_subcategory]
    report = {
        "rows": len(records),
        "images": len(images),
        "bad": len(bad),
        "duplicates": len(placed) - len(unique),
        "unassigned": unassigned,
        "over_cap": len(unique) - len(images),
        "subcategories_filled": len(counts),
        "subcategories_short": len(short),
    }
    log.info("images from %s: %s", source, report)
    if short:
        log.warning(
            "%d subcategories have fewer than %d images: %s%s",
            len(short),
            per_subcategory,
            ", ".join(short[:10]),
            " ..." if len(short) > 10 else "",
        )
    if images.empty:
        raise ValueError(f"no usable images from {len(records)} {source} rows: {report}")
    quarantine_table = pd.DataFrame(sorted(quarantine), columns=QUARANTINE_COLUMNS).astype({"row": "int64"})
    return images, quarantine_table, report
