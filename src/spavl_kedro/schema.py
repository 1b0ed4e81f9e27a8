"""Column contracts of the project's tables, declared once.

Nodes call `validate(df, "<table>")` on what they return, so a table that reaches the catalog always has
its declared columns in the declared order; tests import the same contracts.
"""

from __future__ import annotations

import pandas as pd

CLASS_COLUMNS = ["class1", "class2", "class3"]

TABLES: dict[str, list[str]] = {
    "taxonomy": [*CLASS_COLUMNS, "description", "keywords", "provenance"],
    # what an ImageManifestDataset reads: raw bytes (never decoded there) or the error reading them
    "image_records": ["row", "path", "caption", "subcategory", "keywords", "data", "read_error"],
    "image_quarantine": ["row", "path", "caption", "reason"],
    "images": ["image_id", *CLASS_COLUMNS, "source", "sha256", "width", "height", "caption", "png"],
    # harmful: the screen's verdict (null when undecided); dropped questions stay, with drop_reason;
    # wording_family / wording (seen, unseen): the template writer's family (wording.py), else null
    "questions": [
        "question_id",
        "image_ids",
        "qtype",
        *CLASS_COLUMNS,
        "text",
        "writer",
        "wording_family",
        "wording",
        "harmful",
        "screen_raw",
        "kept",
        "drop_reason",
    ],
    "question_screening": [*CLASS_COLUMNS, "qtype", "total", "harmful", "undecided", "kept", "dropped"],
    # MIS safety chain-of-thought targets: the three parts and the whole marked text
    "mis_cot": [
        "question_id",
        "image_ids",
        "qtype",
        *CLASS_COLUMNS,
        "question",
        "perception",
        "reasoning",
        "answer",
        "target",
        "teacher",
        "error",
    ],
    "responses": ["response_id", "question_id", "responder", "text", "finish_reason", "latency_s", "error"],
    "verdicts": ["response_id", "judge", "safe", "category", "score", "raw"],
    # every candidate pair and how it was decided (ties and order disagreements included)
    "pair_outcomes": [
        "question_id",
        "qtype",
        "first_responder",
        "second_responder",
        "preferred",
        "reason",
        "order_consistent",
    ],
    # agreement of every two verdict judges, overall and per category (class2)
    "judge_agreement": [
        "judge_a",
        "judge_b",
        "scope",
        "responses",
        "both_decided",
        "agreement",
        "kappa",
        "safe_safe",
        "safe_unsafe",
        "unsafe_safe",
        "unsafe_unsafe",
        "undecided_a",
        "undecided_b",
    ],
    "preferences": [
        "question_id",
        "question",
        "image_ids",
        "chosen",
        "rejected",
        *CLASS_COLUMNS,
        "qtype",
        "chosen_responder",
        "rejected_responder",
        "judge",
        "reason",
        "order_consistent",
    ],
    # train and validation pairs with what the published layout leaves out
    "pair_provenance": [
        "split",
        "question_id",
        "qtype",
        *CLASS_COLUMNS,
        "chosen_responder",
        "rejected_responder",
        "judge",
        "reason",
    ],
    # Published SPA-VL split layouts (image is a {bytes, path} struct, as in the released parquet).
    "train": ["image", "question", "chosen", "rejected", "image_name"],
    "validation": ["image", "question", "chosen", "rejected", *CLASS_COLUMNS],
    "test_harm": ["image", "question", *CLASS_COLUMNS],
    "test_help": ["image", "question", *CLASS_COLUMNS],
}

SPA_QTYPES = ("easy", "hardq", "hards")  # one image each (SPA-VL)
MIS_QTYPES = ("mis_easy", "mis_hard")  # two images each (MIS)
QTYPES = SPA_QTYPES + MIS_QTYPES


def validate(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Return `df` with exactly the columns of `table`, in order; raise naming what is missing."""
    columns = TABLES[table]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table '{table}' is missing column(s) {missing}; it has {list(df.columns)}")
    return df[columns].reset_index(drop=True)
