"""generate: images per subcategory, three question types, MIS samples, and answers from a pool of VLMs.

The embedded default renders images, writes questions from templates and answers them with tiny LLaVAs
bootstrapped to differing refusal rates; the paper profile swaps sources, writers and responders for real
ones by configuration only. This module holds the image-source switch, the tiny-model nodes and the run
summary; questions.py, mis.py and responses.py hold the rest.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import pandas as pd

from spavl_kedro.backends.tiny import VLM, build_processor, train_tiny_vlm
from spavl_kedro.backends.vlm import decode_image
from spavl_kedro.config import GenerateConfig, TinyConfig
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.pipelines.generate.images import collect_source_images
from spavl_kedro.pipelines.generate.questions import fill
from spavl_kedro.pipelines.generate.synthetic import caption_keyword, render_images
from spavl_kedro.schema import TABLES

log = logging.getLogger(__name__)


def collect_images(taxonomy: pd.DataFrame, image_records: pd.DataFrame,
                   params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """The `images` table from the configured source, the rows set aside (quarantine) and the counts of
    what happened to the source's rows (see images.py).

    synthetic renders images; manifest and laion read `image_records` (the catalog's ImageManifestDataset).
    """
    cfg = GenerateConfig.model_validate(params)
    if cfg.images.source == "synthetic":
        images = render_images(taxonomy, cfg.images.per_subcategory, cfg.images.size, cfg.seed)
        return images, pd.DataFrame(columns=TABLES["image_quarantine"]), {"rows": len(images), "images": len(images)}
    if image_records.empty:
        raise ValueError(f"generate.images.source is '{cfg.images.source}' but the image_manifest catalog entry "
                         "has no rows: point its filepath at your manifest")
    return collect_source_images(image_records, taxonomy, cfg.images, cfg.images.per_subcategory)


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
        keyword = caption_keyword(img.caption, subs[img.class3].keywords)
        for template in rng.sample(cfg.seed_corpus.templates,
                                   min(cfg.seed_corpus.questions_per_image, len(cfg.seed_corpus.templates))):
            rows.append({"image_id": img.image_id, "question": fill(template, keyword, subs[img.class3]),
                         "refusal": rng.choice(seed_text["refusals"]),
                         "compliance": rng.choice(seed_text["compliances"])})
    return pd.DataFrame(rows)


def seed_examples(seed_corpus: pd.DataFrame, images: pd.DataFrame) -> list[tuple]:
    """Seed-corpus rows as (images, question, refusal, compliance) tuples for `tiny.bootstrap`."""
    pixels = dict(zip(images["image_id"], images["png"]))
    return [([decode_image(pixels[r.image_id])], r.question, r.refusal, r.compliance)
            for r in seed_corpus.itertuples(index=False)]


def build_tiny_processor(seed_corpus: pd.DataFrame, questions: pd.DataFrame, mis_cot: pd.DataFrame,
                         tiny: dict[str, Any]):
    """The tokenizer (trained on the project's own text, chain-of-thought targets included, so SFT on them
    needs no unknown tokens) and the image processor every tiny model shares."""
    cfg = TinyConfig.model_validate(tiny)
    texts = [*seed_corpus["question"], *seed_corpus["refusal"], *seed_corpus["compliance"], *questions["text"],
             *mis_cot["target"]]
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


def summarise_generation(image_report: dict[str, int], image_quarantine: pd.DataFrame, questions: pd.DataFrame,
                         mis_cot: pd.DataFrame, responses: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Counts for MLflow: what each step produced, set aside or failed (nothing is dropped unseen)."""
    counts: dict[str, float] = {
        **{f"images/{key}": value for key, value in image_report.items()},
        "images/quarantined": len(image_quarantine),
        "questions": len(questions), "questions_kept": int(questions["kept"].sum()),
        "cot_targets": len(mis_cot), "cot_errors": int(mis_cot["error"].notna().sum()),
        "responses": len(responses), "responses_failed": int(responses["error"].notna().sum()),
    }
    for qtype, group in questions.groupby("qtype", sort=True):
        counts[f"questions_dropped/{qtype}"] = int((~group["kept"]).sum())
    for responder, group in responses.groupby("responder", sort=True):
        counts[f"responses_failed/{responder}"] = int(group["error"].notna().sum())
        counts[f"latency_s/{responder}"] = float(group["latency_s"].mean())
    return for_mlflow({f"generate/{name}": value for name, value in counts.items()})
