"""MIS samples: two images and one benign-looking instruction, with safety chain-of-thought targets.

MIS (Ding et al., ICLR 2026) builds each sample so that no single part is plainly harmful: in `mis_easy`
the images themselves show the harm, in `mis_hard` each image alone is ordinary and only the instruction
that joins them is risky. Here both images come from the `images` table: two of one subcategory for
mis_easy, one of the subcategory and one of another category of the same domain for mis_hard.

The targets have MIS's three parts — perception of each image, safety reasoning, a safe and helpful
answer — each opened by a marker line, so SFT data and parsers can find the parts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from spavl_kedro.config import CostsConfig, GenerateConfig, TeacherConfig, stage_spend, typed
from spavl_kedro.grounding import caption_keyword, caption_parts
from spavl_kedro.models.costs import SpendLedger
from spavl_kedro.models.factory import build_backend
from spavl_kedro.models.vlm import Prompt
from spavl_kedro.schema import MIS_QTYPES, validate
from spavl_kedro.seeding import stream

log = logging.getLogger(__name__)

PARTS = ("perception", "reasoning", "answer")


def compose_mis_samples(
    images: pd.DataFrame, taxonomy: pd.DataFrame, params: GenerateConfig | dict[str, Any]
) -> pd.DataFrame:
    """`mis.per_subcategory` samples of each MIS type per subcategory (not yet screened)."""
    cfg = typed(GenerateConfig, params)
    n = cfg.mis.per_subcategory
    keywords = dict(zip(taxonomy["class3"], taxonomy["keywords"]))
    by_sub = {k: g.sort_values("image_id") for k, g in images.groupby("class3", sort=True)}
    rows = []
    for class3, group in by_sub.items():
        if n and len(group) < 2:
            raise ValueError(f"MIS: subcategory '{class3}' has {len(group)} image(s); mis_easy needs two")
        sub = group.iloc[0]
        # mis_hard's second image: another category of the same domain, else of any domain, else any other
        # subcategory
        others = images[(images["class1"] == sub.class1) & (images["class2"] != sub.class2)]
        if others.empty:
            others = images[images["class2"] != sub.class2]
        if others.empty:
            others = images[images["class3"] != class3]
        for i in range(n):
            rng = stream(cfg.seed, "mis", class3, i)
            first, second = group.iloc[rng.sample(range(len(group)), 2)].itertuples(index=False)
            # the partner shares no badge with the first image, so each image has a fact of its own
            apart = others[others["caption"].map(_badge) != _badge(first.caption)] if _badge(first.caption) else others
            apart = apart if len(apart) else others
            partner = apart.iloc[rng.randrange(len(apart))] if len(apart) else None
            for qtype, pair in (("mis_easy", (first, second)), ("mis_hard", (first, partner))):
                if pair[1] is None:
                    raise ValueError(f"MIS: no second subcategory to pair with '{class3}' for mis_hard")
                template = rng.choice(cfg.mis.instructions[qtype])
                kw = [caption_keyword(img.caption, keywords[img.class3]) for img in pair]
                rows.append(
                    {
                        "question_id": f"{_slug(class3)}-{qtype}-{i:02d}",
                        "image_ids": [pair[0].image_id, pair[1].image_id],
                        "qtype": qtype,
                        "class1": sub.class1,
                        "class2": sub.class2,
                        "class3": class3,
                        "text": template.format(keyword1=kw[0], keyword2=kw[1]),
                        "writer": "template",
                        "wording_family": None,
                        "wording": None,
                        "error": None,
                    }
                )
    return pd.DataFrame(
        rows,
        columns=[
            "question_id",
            "image_ids",
            "qtype",
            "class1",
            "class2",
            "class3",
            "text",
            "writer",
            "wording_family",
            "wording",
            "error",
        ],
    )


def _badge(caption: str) -> str | None:
    return (caption_parts(caption) or {}).get("badge")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def write_cot_targets(
    questions: pd.DataFrame,
    images: pd.DataFrame,
    taxonomy: pd.DataFrame,
    credentials: Mapping[str, Any],
    params: GenerateConfig | dict[str, Any],
    api_spend: SpendLedger | None = None,
    costs: CostsConfig | dict[str, Any] | None = None,
) -> pd.DataFrame:
    """A three-part safety chain-of-thought target for every kept MIS question.

    A model teacher's output that lacks a marked part is kept with the error, and counted; it is not
    trained on. A model teacher's calls count toward the generate stage's API spend.
    """
    cfg = typed(GenerateConfig, params)
    teacher = cfg.mis.teacher
    mis = questions[questions["kept"] & questions["qtype"].isin(MIS_QTYPES)]
    meta = images.set_index("image_id")
    keywords = dict(zip(taxonomy["class3"], taxonomy["keywords"]))
    if teacher.kind == "template":
        texts = [_template_target(q, meta, keywords, teacher) for q in mis.itertuples(index=False)]
        errors: list[str | None] = [None] * len(texts)
        name = "template"
    else:
        spend = stage_spend("generate", api_spend, costs)
        backend = build_backend(
            teacher.backend,
            credentials=credentials,
            generation=cfg.generation,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            meter=spend.meter,
        )
        prompts = [
            Prompt(
                teacher.prompt.format(question=q.text, subcategory=q.class3),
                tuple(meta.at[i, "png"] for i in q.image_ids),
            )
            for q in mis.itertuples(index=False)
        ]
        with spend.metered(paid=teacher.backend.served):
            outputs = backend.generate(prompts)
        texts = [o.text for o in outputs]
        errors = [o.error for o in outputs]
        name = teacher.backend.name
    rows = []
    for q, text, error in zip(mis.itertuples(index=False), texts, errors):
        parts = split_cot(text, teacher.markers) if error is None else None
        if error is None and parts is None:
            missing = [f"'{teacher.markers[p]}'" for p in PARTS if teacher.markers[p] not in text]
            error = (
                "target lacks a marked part: " + ", ".join(missing)
                if missing
                else "target has its marked parts out of order"
            )
        rows.append(
            {
                "question_id": q.question_id,
                "image_ids": q.image_ids,
                "qtype": q.qtype,
                "class1": q.class1,
                "class2": q.class2,
                "class3": q.class3,
                "question": q.text,
                **{p: (parts or {}).get(p) for p in PARTS},
                "target": text,
                "teacher": name,
                "error": error,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "question_id",
            "image_ids",
            "qtype",
            "class1",
            "class2",
            "class3",
            "question",
            *PARTS,
            "target",
            "teacher",
            "error",
        ],
    )
    failed = int(table["error"].notna().sum())
    if failed:
        log.warning("%d of %d chain-of-thought targets are unusable; kept with their error", failed, len(table))
    return validate(table, "mis_cot")


def _template_target(q: Any, meta: pd.DataFrame, keywords: dict[str, list[str]], teacher: TeacherConfig) -> str:
    t, m = teacher.templates, teacher.markers
    caps = [meta.at[i, "caption"] for i in q.image_ids]
    kws = [caption_keyword(meta.at[i, "caption"], keywords[meta.at[i, "class3"]]) for i in q.image_ids]
    values = {
        "caption1": caps[0],
        "caption2": caps[1],
        "keyword1": kws[0],
        "keyword2": kws[1],
        "subcategory": q.class3,
        "category": q.class2,
    }
    return "\n".join(
        [
            f"{m['perception']} {t.perception.format(**values)}",
            f"{m['reasoning']} {t.reasoning[q.qtype].format(**values)}",
            f"{m['answer']} {t.answer.format(**values)}",
        ]
    )


def split_cot(text: str, markers: Mapping[str, str]) -> dict[str, str] | None:
    """The three parts of a marked target, or None when a marker is missing or out of order."""
    positions = [text.find(markers[p]) for p in PARTS]
    if min(positions) < 0 or positions != sorted(positions):
        return None
    ends = positions[1:] + [len(text)]
    return {
        p: re.sub(r"\s+", " ", text[start + len(markers[p]) : end]).strip()
        for p, start, end in zip(PARTS, positions, ends)
    }
