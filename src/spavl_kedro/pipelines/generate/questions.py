"""Questions: SPA-VL's three per image (easy, hardq, hards), written from templates or by a VLM, then
screened for harmfulness. Dropped questions stay in the table with the reason, and are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd

from spavl_kedro.config import CostsConfig, GenerateConfig, ModelWriterConfig, ScreenConfig, stage_spend, typed
from spavl_kedro.grounding import caption_keyword
from spavl_kedro.models.costs import SpendLedger, StageSpend
from spavl_kedro.models.factory import build_backend
from spavl_kedro.models.vlm import Prompt
from spavl_kedro.schema import SPA_QTYPES, validate
from spavl_kedro.seeding import stream
from spavl_kedro.wording import SEEN, UNSEEN

log = logging.getLogger(__name__)


def write_questions(
    images: pd.DataFrame,
    taxonomy: pd.DataFrame,
    credentials: Mapping[str, Any],
    params: GenerateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Three questions per image, one per SPA-VL type, by the configured writer (not yet screened). A model
    writer's calls count toward the generate stage's API spend (`api_spend`, `costs`)."""
    cfg = typed(GenerateConfig, params)
    subs = {row.class3: row for row in taxonomy.itertuples(index=False)}
    if cfg.questions.writer == "model":
        spend = stage_spend("generate", api_spend, costs)
        with spend.metered(paid=cfg.questions.model_writer.backend.served):
            rows = _model_questions(images, subs, cfg.questions.model_writer, credentials, cfg, spend)
    else:
        wording = cfg.questions.wording
        by_type = {qtype: [f for f in wording.families() if f.qtype == qtype] for qtype in SPA_QTYPES}
        held = wording.held_out_ids(cfg.seed)
        rows = []
        for img in images.itertuples(index=False):
            keyword = caption_keyword(img.caption, subs[img.class3].keywords)
            for qtype in SPA_QTYPES:
                family = stream(cfg.seed, img.image_id, qtype).choice(by_type[qtype])
                rows.append(
                    _question(
                        img,
                        qtype,
                        fill(family.template, keyword, subs[img.class3]),
                        "template",
                        family=family.family_id,
                        wording=UNSEEN if family.family_id in held else SEEN,
                    )
                )
    return pd.DataFrame(rows)


def fill(template: str, keyword: str, sub: Any) -> str:
    return template.format(keyword=keyword, subcategory=sub.class3, category=sub.class2)


def _question(
    img: Any,
    qtype: str,
    text: str,
    writer: str,
    error: str | None = None,
    family: str | None = None,
    wording: str | None = None,
) -> dict[str, Any]:
    """A question row; `family` and `wording` (seen / unseen) only for the template writer's questions."""
    return {
        "question_id": f"{img.image_id}-{qtype}",
        "image_ids": [img.image_id],
        "qtype": qtype,
        "class1": img.class1,
        "class2": img.class2,
        "class3": img.class3,
        "text": text,
        "writer": writer,
        "wording_family": family,
        "wording": wording,
        "error": error,
    }


def _model_questions(
    images: pd.DataFrame,
    subs: dict[str, Any],
    writer: ModelWriterConfig,
    credentials: Mapping[str, Any],
    cfg: GenerateConfig,
    spend: StageSpend,
) -> list[dict[str, Any]]:
    """Prompt the writer VLM with each image, its caption and subcategory, once per question type."""
    backend = build_backend(
        writer.backend,
        credentials=credentials,
        generation=cfg.generation,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        meter=spend.meter,
    )
    jobs, prompts = [], []
    for img in images.itertuples(index=False):
        sub = subs[img.class3]
        for qtype in SPA_QTYPES:
            text = getattr(writer.prompts, qtype).format(
                caption=img.caption, subcategory=sub.class3, category=sub.class2, description=sub.description
            )
            jobs.append((img, qtype))
            prompts.append(Prompt(text, (img.png,)))
    rows = []
    for (img, qtype), out in zip(jobs, backend.generate(prompts)):
        text = first_line(out.text, writer.max_chars)
        error = out.error or (None if text else "writer returned an empty question")
        rows.append(_question(img, qtype, text, writer.backend.name, error))
    return rows


def first_line(text: str, max_chars: int) -> str:
    """Writers often add a preamble or several candidates: keep the first non-empty line, unquoted."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line[:max_chars]
    return ""


def screen_questions(
    spa_questions: pd.DataFrame,
    mis_questions: pd.DataFrame,
    images: pd.DataFrame,
    credentials: Mapping[str, Any],
    params: GenerateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A harmfulness verdict for every question, then the keep rule of its type. A model screen's calls count
    toward the generate stage's API spend.

    Returns the `questions` table (kept and dropped, each dropped one with its reason) and the counts per
    subcategory and type. An undecided verdict (judge error, unreadable output) is never read as harmless
    or harmful: under a `harmful` or `benign` rule the question is dropped as undecided.
    """
    cfg = typed(GenerateConfig, params)
    screen = cfg.questions.screen
    questions = pd.concat([spa_questions, mis_questions], ignore_index=True)
    verdicts = _screen(questions, images, screen, credentials, cfg, stage_spend("generate", api_spend, costs))
    harmful, raw = zip(*verdicts) if verdicts else ((), ())
    questions = questions.assign(harmful=pd.array(list(harmful), dtype="boolean"), screen_raw=list(raw))
    reasons = [_drop_reason(q.error, q.harmful, screen.keep[q.qtype]) for q in questions.itertuples(index=False)]
    questions = questions.assign(drop_reason=reasons, kept=[r is None for r in reasons])
    counts = _screening_counts(questions)
    dropped = int((~questions["kept"]).sum())
    if dropped:
        log.info(
            "screening dropped %d of %d questions (%s)",
            dropped,
            len(questions),
            questions["drop_reason"].value_counts().to_dict(),
        )
    return validate(questions, "questions"), validate(counts, "question_screening")


def _screen(
    questions: pd.DataFrame,
    images: pd.DataFrame,
    screen: ScreenConfig,
    credentials: Mapping[str, Any],
    cfg: GenerateConfig,
    spend: StageSpend,
) -> list[tuple[bool | None, str]]:
    if screen.judge == "lexicon":
        markers = [m.lower() for m in screen.harm_markers]
        out = []
        for text in questions["text"]:
            hit = next((m for m in markers if m in text.lower()), None)
            out.append((hit is not None, hit or ""))
        return out
    backend = build_backend(
        screen.backend,
        credentials=credentials,
        generation={"max_new_tokens": 16, "do_sample": False},
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        meter=spend.meter,
    )
    pixels = dict(zip(images["image_id"], images["png"]))
    prompts = [
        Prompt(
            screen.prompt.format(question=q.text, subcategory=q.class3),
            tuple(pixels[i] for i in q.image_ids) if screen.show_images else (),
        )
        for q in questions.itertuples(index=False)
    ]
    with spend.metered(paid=screen.backend.served):
        generations = backend.generate(prompts)
    return [(None, f"error: {g.error}") if g.error else (parse_label(g.text, screen), g.text) for g in generations]


def parse_label(text: str, screen: ScreenConfig) -> bool | None:
    """Guard models answer 'unsafe' or 'safe' as the first word (MD-Judge, Llama Guard); the whole word is
    compared, so 'unsafe' never reads as 'safe'. Anything else is undecided."""
    first = next((line.strip().lower() for line in text.splitlines() if line.strip()), "")
    word = first.split()[0].strip(".,:;!*'\"") if first else ""
    if word == screen.unsafe_label.lower():
        return True
    if word == screen.safe_label.lower():
        return False
    return None


def _drop_reason(error: Any, harmful: Any, rule: str) -> str | None:
    if isinstance(error, str):
        return f"writer error: {error}"
    if rule == "any":
        return None
    if harmful is pd.NA or harmful is None:
        return "undecided by the screen"
    if rule == "harmful" and not harmful:
        return "judged benign (type needs harmful)"
    if rule == "benign" and harmful:
        return "judged harmful (type needs benign)"
    return None


def _screening_counts(questions: pd.DataFrame) -> pd.DataFrame:
    q = questions.assign(
        undecided=questions["harmful"].isna(),
        dropped=~questions["kept"],
        harmful_=questions["harmful"].fillna(False).astype(bool),
    )
    counts = (
        q.groupby(["class1", "class2", "class3", "qtype"], sort=True)
        .agg(
            total=("question_id", "size"),
            harmful=("harmful_", "sum"),
            undecided=("undecided", "sum"),
            kept=("kept", "sum"),
            dropped=("dropped", "sum"),
        )
        .reset_index()
    )
    return counts.astype({c: "int64" for c in ("total", "harmful", "undecided", "kept", "dropped")})
