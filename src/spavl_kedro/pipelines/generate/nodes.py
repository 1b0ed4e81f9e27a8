"""generate: images per subcategory, three question types, and answers from a pool of VLMs.

The embedded default renders images, writes questions from templates and answers them with tiny LLaVAs
bootstrapped to differing refusal rates; the paper profile swaps the responders for real models by
configuration only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Any, Callable

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from spavl_kedro.backends.tiny import VLM, build_processor, train_tiny_vlm
from spavl_kedro.backends.vlm import Prompt, TransformersVLM, decode_image, load_vlm
from spavl_kedro.config import GenerateConfig, TinyConfig
from spavl_kedro.schema import validate

log = logging.getLogger(__name__)

# One background colour per domain and one motif per category, so images of different harm areas differ
# visually and not only in their typography.
PALETTE = [(180, 40, 40), (40, 90, 170), (40, 140, 80), (150, 60, 150), (200, 130, 30), (60, 60, 60)]
CAPTION = "A {motif} motif with the word '{keyword}' written across it."
MOTIFS = ["circle", "square", "triangle", "cross", "stripes", "ring", "diamond", "grid", "bars",
          "dots", "arrow", "frame", "wave"]


def render_images(taxonomy: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Render `images.per_subcategory` synthetic images per subcategory: keyword typography on a motif."""
    cfg = GenerateConfig.model_validate(params)
    domains = sorted(taxonomy["class1"].unique())
    categories = sorted(taxonomy[["class1", "class2"]].drop_duplicates().itertuples(index=False, name=None))
    rows, seen = [], set()
    for sub in taxonomy.itertuples(index=False):
        for i in range(cfg.images.per_subcategory):
            rng = random.Random(f"{cfg.seed}:{sub.class3}:{i}")
            keyword = sub.keywords[i % len(sub.keywords)]
            colour = PALETTE[domains.index(sub.class1) % len(PALETTE)]
            motif = MOTIFS[categories.index((sub.class1, sub.class2)) % len(MOTIFS)]
            png = _render(keyword, colour, motif, cfg.images.size, rng)
            sha = hashlib.sha256(png).hexdigest()
            if sha in seen:  # identical pixels would let one image leak across splits
                continue
            seen.add(sha)
            rows.append({"image_id": f"{_slug(sub.class3)}-{i:03d}", "class1": sub.class1, "class2": sub.class2,
                         "class3": sub.class3, "source": "synthetic", "sha256": sha,
                         "width": cfg.images.size, "height": cfg.images.size,
                         "caption": CAPTION.format(motif=motif, keyword=keyword),
                         "png": png})
    return validate(pd.DataFrame(rows), "images")


def _render(keyword: str, colour: tuple[int, int, int], motif: str, size: int, rng: random.Random) -> bytes:
    jitter = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    img = Image.new("RGB", (size, size), jitter)
    draw = ImageDraw.Draw(img)
    s, fg = size, (240, 240, 240)
    x0, y0 = rng.randint(s // 8, s // 4), rng.randint(s // 8, s // 4)
    x1, y1 = s - x0, s - y0
    if motif in ("circle", "ring", "dots"):
        draw.ellipse((x0, y0, x1, y1), outline=fg, width=4 if motif == "ring" else 1,
                     fill=None if motif == "ring" else fg if motif == "circle" else None)
        if motif == "dots":
            for _ in range(12):
                cx, cy = rng.randint(0, s), rng.randint(0, s)
                draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=fg)
    elif motif in ("square", "frame", "grid"):
        draw.rectangle((x0, y0, x1, y1), outline=fg, width=5 if motif == "frame" else 1,
                       fill=fg if motif == "square" else None)
        if motif == "grid":
            for k in range(0, s, s // 6):
                draw.line((k, 0, k, s), fill=fg)
                draw.line((0, k, s, k), fill=fg)
    elif motif in ("triangle", "diamond", "arrow"):
        pts = {"triangle": [(s // 2, y0), (x1, y1), (x0, y1)],
               "diamond": [(s // 2, y0), (x1, s // 2), (s // 2, y1), (x0, s // 2)],
               "arrow": [(x0, s // 2), (x1, y0), (x1, y1)]}[motif]
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
    font = ImageFont.load_default(size=max(10, size // 8))
    draw.rectangle((0, s - s // 4, s, s), fill=(20, 20, 20))
    draw.text((4, s - s // 4 + 2), keyword, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _caption_keyword(caption: str) -> str:
    """The keyword a synthetic image shows, read back from its CAPTION."""
    return caption.split("'")[1]


def _fill(template: str, keyword: str, sub: Any) -> str:
    return template.format(keyword=keyword, subcategory=sub.class3, category=sub.class2)


def write_questions(images: pd.DataFrame, taxonomy: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Three questions per image (easy, hardq, hards) from the configured templates.

    Template questions carry their harmfulness by construction (hardq and hards are written to be
    harmful, easy to be plain); screening them with a judge is the model-writer's job.
    """
    cfg = GenerateConfig.model_validate(params)
    keywords = {row.class3: row for row in taxonomy.itertuples(index=False)}
    rows = []
    for img in images.itertuples(index=False):
        sub = keywords[img.class3]
        keyword = _caption_keyword(img.caption)
        for qtype in ("easy", "hardq", "hards"):
            rng = random.Random(f"{cfg.seed}:{img.image_id}:{qtype}")
            template = rng.choice(getattr(cfg.questions, qtype))
            rows.append({"question_id": f"{img.image_id}-{qtype}", "image_ids": [img.image_id], "qtype": qtype,
                         "class1": img.class1, "class2": img.class2, "class3": img.class3,
                         "text": _fill(template, keyword, sub), "writer": "template",
                         "harmful": qtype != "easy", "kept": True})
    return validate(pd.DataFrame(rows), "questions")


def build_seed_corpus(images: pd.DataFrame, taxonomy: pd.DataFrame, seed_text: dict[str, list[str]],
                      params: dict[str, Any]) -> pd.DataFrame:
    """Bootstrap examples for tiny models: (image, seed prompt, a refusal, a compliance) rows."""
    cfg = GenerateConfig.model_validate(params)
    for key in ("refusals", "compliances"):
        if not seed_text.get(key):
            raise ValueError(f"seed_text: missing or empty '{key}' list")
    subs = {row.class3: row for row in taxonomy.itertuples(index=False)}
    rows = []
    for img in images.itertuples(index=False):
        rng = random.Random(f"{cfg.seed}:seed:{img.image_id}")
        keyword = _caption_keyword(img.caption)
        for template in rng.sample(cfg.seed_corpus.templates,
                                   min(cfg.seed_corpus.questions_per_image, len(cfg.seed_corpus.templates))):
            rows.append({"image_id": img.image_id, "question": _fill(template, keyword, subs[img.class3]),
                         "refusal": rng.choice(seed_text["refusals"]),
                         "compliance": rng.choice(seed_text["compliances"])})
    return pd.DataFrame(rows)


def seed_examples(seed_corpus: pd.DataFrame, images: pd.DataFrame) -> list[tuple]:
    """Seed-corpus rows as (images, question, refusal, compliance) tuples for `tiny.bootstrap`."""
    pixels = dict(zip(images["image_id"], images["png"]))
    return [([decode_image(pixels[r.image_id])], r.question, r.refusal, r.compliance)
            for r in seed_corpus.itertuples(index=False)]


def build_tiny_processor(seed_corpus: pd.DataFrame, questions: pd.DataFrame, tiny: dict[str, Any]):
    """The tokenizer (trained on the project's own text) and image processor every tiny model shares."""
    cfg = TinyConfig.model_validate(tiny)
    texts = [*seed_corpus["question"], *seed_corpus["refusal"], *seed_corpus["compliance"], *questions["text"]]
    return build_processor(texts, cfg.model)


def bootstrap_responders(seed_corpus: pd.DataFrame, images: pd.DataFrame, tiny_processor,
                         params: dict[str, Any], tiny: dict[str, Any]) -> dict[str, VLM]:
    """One tiny LLaVA per `kind: tiny` responder, taught to refuse at its configured rate."""
    cfg, tcfg = GenerateConfig.model_validate(params), TinyConfig.model_validate(tiny)
    examples = seed_examples(seed_corpus, images)
    models = {}
    for n, responder in enumerate(r for r in cfg.responders if r.kind == "tiny"):
        vlm, losses = train_tiny_vlm(tiny_processor, examples, responder.refusal_rate, tcfg.model,
                                     tcfg.bootstrap, seed=tcfg.bootstrap.seed + 101 * (n + 1))
        log.info("bootstrapped responder %s (refusal_rate=%.2f): loss %.3f -> %.3f", responder.name,
                 responder.refusal_rate, losses["first_epoch_loss"], losses["last_epoch_loss"])
        models[responder.name] = vlm
    return models


def collect_responses(questions: pd.DataFrame, images: pd.DataFrame,
                      responder_models: dict[str, Callable[[], VLM] | VLM], params: dict[str, Any]) -> pd.DataFrame:
    """Every kept question answered by every responder; failed generations are kept with their error."""
    cfg = GenerateConfig.model_validate(params)
    kept = questions[questions["kept"]]
    pixels = dict(zip(images["image_id"], images["png"]))
    prompts = [Prompt(q.text, tuple(pixels[i] for i in q.image_ids)) for q in kept.itertuples(index=False)]
    frames = []
    for n, responder in enumerate(cfg.responders):
        if responder.kind == "tiny":
            if responder.name not in responder_models:
                raise ValueError(f"responder '{responder.name}': no bootstrapped model in responder_models")
            entry = responder_models[responder.name]
            vlm = entry() if callable(entry) else entry  # the catalog gives loaders, memory gives models
        else:
            vlm = load_vlm(responder.model)
        backend = TransformersVLM(responder.name, vlm, cfg.batch_size,
                                  {**cfg.generation, **responder.generation}, seed=cfg.seed + n)
        outputs = backend.generate(prompts)
        frames.append(pd.DataFrame({
            "response_id": [f"{qid}:{responder.name}" for qid in kept["question_id"]],
            "question_id": kept["question_id"].to_numpy(), "responder": responder.name,
            "text": [o.text for o in outputs], "finish_reason": [o.finish_reason for o in outputs],
            "latency_s": [o.latency_s for o in outputs], "error": [o.error for o in outputs]}))
    responses = pd.concat(frames, ignore_index=True)
    failed = responses["error"].notna().sum()
    if failed:
        log.warning("%d of %d generations failed; kept with their error", failed, len(responses))
    return validate(responses, "responses")
