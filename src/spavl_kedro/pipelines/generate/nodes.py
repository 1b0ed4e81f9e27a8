"""generate: images per subcategory, three question types, MIS samples, and answers from a pool of VLMs.

The embedded default renders images, writes questions from templates and answers them with tiny LLaVAs
bootstrapped to differing refusal rates; the paper profile swaps sources, writers and responders for real
ones by configuration only. This module holds the image-source switch, the tiny-model nodes and the run
summary; questions.py, mis.py and responses.py hold the rest.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pandas as pd

from spavl_kedro.config import GenerateConfig, JudgeConfig, TinyConfig, typed
from spavl_kedro.grounding import caption_keyword, caption_parts
from spavl_kedro.imaging import png_bytes
from spavl_kedro.judges.guard import ANSWER_KINDS, GUARD_WORDS, answer_forms, guard_template
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.models.specs import Behaviour
from spavl_kedro.models.tiny import (
    VLM,
    bootstrap,
    build_model,
    build_processor,
    encode_seeds,
    pretrain_vision,
    seed_examples,
    template_literals,
    train_tiny_vlm,
)
from spavl_kedro.models.vlm import decode_image
from spavl_kedro.pipelines.generate.images import collect_source_images
from spavl_kedro.pipelines.generate.questions import fill
from spavl_kedro.pipelines.generate.synthetic import render_images
from spavl_kedro.scenes import KINDS, Scene
from spavl_kedro.schema import TABLES
from spavl_kedro.seeding import SEED_IMAGES, model_seed, stream

log = logging.getLogger(__name__)


def collect_images(
    taxonomy: pd.DataFrame, image_records: pd.DataFrame, params: GenerateConfig | dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """The `images` table from the configured source, the rows set aside (quarantine) and the counts of
    what happened to the source's rows (see images.py).

    synthetic renders images; manifest and laion read `image_records` (the catalog's ImageManifestDataset).
    """
    cfg = typed(GenerateConfig, params)
    if cfg.images.source == "synthetic":
        images = render_images(taxonomy, cfg.images.per_subcategory, cfg.images.size, cfg.seed)
        return images, pd.DataFrame(columns=TABLES["image_quarantine"]), {"rows": len(images), "images": len(images)}
    if image_records.empty:
        raise ValueError(
            f"generate.images.source is '{cfg.images.source}' but the image_manifest catalog entry "
            "has no rows: point its filepath at your manifest"
        )
    return collect_source_images(image_records, taxonomy, cfg.images, cfg.images.per_subcategory)


def render_seed_images(
    taxonomy: pd.DataFrame, images: pd.DataFrame, params: GenerateConfig | dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images tiny models are bootstrapped on, and the shape scenes they learn to answer capability
    questions about.

    Seed images are rendered like the synthetic source, with another seed, so they show the same kinds of
    scene but none of the dataset's images (checked by hash). Scenes are `scenes.Scene`s drawn from their
    own stream (the evaluation's capability set checks by hash that it shares none). Only the synthetic
    source can be re-drawn: with another source there are no seed images, and bootstrapping a tiny model
    fails with a message saying so."""
    cfg = typed(GenerateConfig, params)
    if cfg.images.source != "synthetic":
        return images.iloc[:0], pd.DataFrame(columns=SEED_SCENE_COLUMNS)
    # their own seed, so no bootstrap image is ever a dataset or evaluation image
    seed_images = render_images(taxonomy, cfg.images.per_subcategory, cfg.images.size, cfg.seed + SEED_IMAGES)
    shared = set(seed_images["sha256"]) & set(images["sha256"])
    if shared:
        raise ValueError(f"{len(shared)} seed image(s) are also dataset images; change generate.seed")
    scenes = []
    for k in range(cfg.seed_corpus.scenes):
        rng = stream(cfg.seed, "seed-scene", k)
        scene = Scene.draw_random(rng)
        png = png_bytes(scene.render(cfg.images.size, rng))
        scenes.append(
            {
                "image_id": f"seed-scene-{k:04d}",
                "sha256": hashlib.sha256(png).hexdigest(),
                "caption": scene.caption,
                "colour": scene.colour,
                "shape": scene.shape,
                "count": scene.count,
                "png": png,
            }
        )
    return (
        seed_images.assign(image_id="seed-" + seed_images["image_id"]),
        pd.DataFrame(scenes, columns=SEED_SCENE_COLUMNS),
    )


SEED_SCENE_COLUMNS = ["image_id", "sha256", "caption", "colour", "shape", "count", "png"]
SEED_CORPUS_COLUMNS = [
    "image_id",
    "png",
    "caption",
    "class1",
    "class3",
    "question",
    "harmful",
    "capability",
    "refusal",
    "answer",
    "vague",
]


def build_seed_corpus(
    images: pd.DataFrame,
    scenes: pd.DataFrame,
    taxonomy: pd.DataFrame,
    seed_text: dict[str, list[str]],
    params: GenerateConfig | dict[str, Any],
) -> pd.DataFrame:
    """Bootstrap examples for tiny models, each with its image: per seed image, harmful and harmless seed
    prompts in the seen wording families (`GenerateConfig.seen_templates`), and per questioned scene a colour, a shape and a count question, with the answers a model may learn for each (refusal,
    answer, vague; see `tiny.Behaviour`).

    A harmful prompt's refusal is a bare refusal or, half the time, a safe redirection; its answer the
    steps-withheld compliance. A harmless prompt's answer names what the image shows (colour, motif, the
    word on it); a capability question's answer is the one word asked for ("Three."). A harmless prompt's
    refusal is what an over-refusing model says; its vague answer names nothing.
    """
    cfg = typed(GenerateConfig, params)
    seed_text = answer_forms(seed_text)
    for key in ANSWER_KINDS:
        if not seed_text.get(key):
            raise ValueError(f"seed_text: missing or empty '{key}' list")
    subs = {row.class3: row for row in taxonomy.itertuples(index=False)}
    corpus = cfg.seed_corpus
    # only seen wording families: a held-out family's skeleton never reaches a bootstrap prompt
    prompts = ((True, cfg.seen_templates(("hardq", "hards"))), (False, cfg.seen_templates(("easy",))))
    rows = []
    for img in images.itertuples(index=False):
        rng = stream(cfg.seed, "seed", img.image_id)
        sub = subs[img.class3]
        keyword = caption_keyword(img.caption, sub.keywords)
        parts = caption_parts(img.caption)  # None for a caption that is not the synthetic format
        values = {"keyword": keyword, "subcategory": img.class3, **(parts or {})}
        for harmful, templates in prompts:
            for template in rng.sample(templates, min(corpus.questions_per_image, len(templates))):
                if harmful:
                    family = "redirections" if rng.random() < 0.5 else "refusals"
                    refusal, answer = rng.choice(seed_text[family]), rng.choice(seed_text["compliances"])
                else:
                    refusal = rng.choice(seed_text["refusals"])
                    answer = rng.choice(seed_text["grounded"]) if parts else "The picture shows {caption}"
                rows.append(
                    {
                        "image_id": img.image_id,
                        "png": img.png,
                        "caption": img.caption,
                        "class1": img.class1,
                        "class3": img.class3,
                        "question": fill(template, keyword, sub),
                        "harmful": harmful,
                        "capability": False,
                        "refusal": refusal.format(**values),
                        "answer": answer.format(caption=img.caption, **values),
                        "vague": "" if harmful else rng.choice(seed_text["vague"]).format(**values),
                    }
                )
    for scene in scenes.head(corpus.questioned_scenes).itertuples(index=False):
        rng = stream(cfg.seed, "seed", scene.image_id)
        for kind in KINDS:
            answer = Scene(scene.colour, scene.shape, int(scene.count)).answers(kind)[-1]  # the word, not the digit
            rows.append(
                {
                    "image_id": scene.image_id,
                    "png": scene.png,
                    "caption": scene.caption,
                    "class1": None,
                    "class3": None,
                    "question": rng.choice(corpus.capability_templates[kind]),
                    "harmful": False,
                    "capability": True,
                    "refusal": rng.choice(seed_text["refusals"]),
                    "answer": f"{answer.capitalize()}.",
                    "vague": rng.choice(seed_text["vague"]),
                }
            )
    return pd.DataFrame(rows, columns=SEED_CORPUS_COLUMNS).astype({"harmful": bool, "capability": bool})


def build_tiny_processor(
    seed_corpus: pd.DataFrame,
    questions: pd.DataFrame,
    mis_cot: pd.DataFrame,
    judge: JudgeConfig | dict[str, Any],
    tiny: TinyConfig | dict[str, Any],
):
    """The tokenizer (trained on the project's own text, chain-of-thought targets included, so SFT on them
    needs no unknown tokens; the tiny guards' prompt frames are whole tokens) and the image processor every
    tiny model shares."""
    cfg = typed(TinyConfig, tiny)
    frames = [
        literal
        for spec in typed(JudgeConfig, judge).tiny_guards()
        for literal in template_literals(guard_template(spec))
    ]
    texts = [
        *seed_corpus["question"],
        *seed_corpus["refusal"],
        *seed_corpus["answer"],
        *seed_corpus["vague"],
        *questions["text"],
        *mis_cot["target"],
        *GUARD_WORDS,
    ]
    return build_processor(texts, cfg.model, frames)


def bootstrap_foundation(
    seed_corpus: pd.DataFrame, seed_scenes: pd.DataFrame, tiny_processor, tiny: TinyConfig | dict[str, Any]
) -> VLM:
    """The shared tiny base: its vision tower pretrained on the captions of the seed images and every seed
    scene (`tiny.vision`), then
    the seed corpus under a mixed behaviour (`tiny.foundation`), trained once, so each responder, the base
    policy and the guard need only a short bootstrap of their own."""
    tcfg = typed(TinyConfig, tiny)
    vlm = VLM(model=build_model(tiny_processor, tcfg.model, tcfg.bootstrap.seed), processor=tiny_processor)
    if seed_corpus.empty:  # no rendered seed images (a real image source): nothing tiny to teach
        log.info("no seed corpus: the tiny foundation stays untrained")
        return vlm
    pictures = pd.concat(
        [seed_corpus[["image_id", "png", "caption"]], seed_scenes[["image_id", "png", "caption"]]]
    ).drop_duplicates("image_id")
    losses = pretrain_vision(
        vlm,
        [decode_image(png) for png in pictures["png"]],
        list(pictures["caption"]),
        tcfg.vision,
        seed=tcfg.bootstrap.seed,
    )
    log.info("pretrained the tiny vision tower on %d captioned images: %s", len(pictures), losses)
    f = tcfg.foundation
    behaviour = Behaviour(refusal_rate=f.refusal_rate, over_refusal_rate=f.over_refusal_rate, vague_rate=f.vague_rate)
    config = tcfg.bootstrap.model_copy(update={"epochs": f.epochs, "group_by_length": f.group_by_length})
    losses = bootstrap(vlm, seed_examples(seed_corpus), behaviour, config)
    log.info(
        "bootstrapped the tiny foundation: loss %.3f -> %.3f", losses["first_epoch_loss"], losses["last_epoch_loss"]
    )
    return vlm


def bootstrap_responders(
    seed_corpus: pd.DataFrame,
    tiny_foundation: VLM,
    params: GenerateConfig | dict[str, Any],
    tiny: TinyConfig | dict[str, Any],
) -> dict[str, VLM]:
    """One tiny LLaVA per `kind: tiny` responder: the foundation, taught its own refusal, over-refusal and
    vague rates."""
    cfg, tcfg = typed(GenerateConfig, params), typed(TinyConfig, tiny)
    # They answer SPA-VL's questions only; encoded once for all of them.
    examples = encode_seeds(tiny_foundation.processor, seed_examples(seed_corpus[~seed_corpus["capability"]]))
    models = {}
    for n, responder in enumerate(r for r in cfg.responders if r.bootstrapped):
        behaviour = responder.behaviour()
        vlm, losses = train_tiny_vlm(
            tiny_foundation.processor,
            examples,
            behaviour,
            tcfg.model,
            tcfg.bootstrap,
            seed=model_seed(tcfg.bootstrap.seed, "responder", n),
            init=tiny_foundation,
        )
        log.info(
            "bootstrapped responder %s (%s): loss %.3f -> %.3f",
            responder.name,
            behaviour,
            losses["first_epoch_loss"],
            losses["last_epoch_loss"],
        )
        models[responder.name] = vlm
    return models


def summarise_generation(
    image_report: dict[str, int],
    image_quarantine: pd.DataFrame,
    questions: pd.DataFrame,
    mis_cot: pd.DataFrame,
    responses: pd.DataFrame,
) -> dict[str, dict[str, float]]:
    """Counts for MLflow: what each step produced, set aside or failed (nothing is dropped unseen)."""
    counts: dict[str, float] = {
        **{f"images/{key}": value for key, value in image_report.items()},
        "images/quarantined": len(image_quarantine),
        "questions": len(questions),
        "questions_kept": int(questions["kept"].sum()),
        "cot_targets": len(mis_cot),
        "cot_errors": int(mis_cot["error"].notna().sum()),
        "responses": len(responses),
        "responses_failed": int(responses["error"].notna().sum()),
    }
    for qtype, group in questions.groupby("qtype", sort=True):
        counts[f"questions_dropped/{qtype}"] = int((~group["kept"]).sum())
    for responder, group in responses.groupby("responder", sort=True):
        counts[f"responses_failed/{responder}"] = int(group["error"].notna().sum())
        counts[f"latency_s/{responder}"] = float(group["latency_s"].mean())
    return for_mlflow({f"generate/{name}": value for name, value in counts.items()})
