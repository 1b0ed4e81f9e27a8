"""The evaluation item by item: what was asked, what each policy answered and what every judge said.

One row per evaluation item: its set, variant, class and question type, the question (and the request in
words where the question leaves it to the images), the item's images side by side, then for every policy
and decoding its answer and one cell per scorer. A scorer's cell lists the values it gave that answer and
what decided them, e.g. `unsafe_rate=1 (O5)` or `refusal_rate=1, well_formed_rate=1 (refusal)`. The
catalog keeps it as parquet and shows it in MLflow as a table (datasets/mlflow_table.py).
"""

from __future__ import annotations

import pandas as pd
from PIL import Image

from spavl_kedro.evalsets.registry import IMAGE_BLANKED
from spavl_kedro.imaging import decode_image, png_bytes

ITEM_COLUMNS = ("eval_set", "variant", "item_id", "class1", "class2", "class3", "qtype", "question", "request")
NO_IMAGE = Image.new("RGB", (32, 32), (200, 200, 200))  # a grey tile: the item was asked without an image
GAP = 4  # white pixels between two images of one item


def item_table(eval_items: pd.DataFrame, eval_answers: pd.DataFrame, eval_scores: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation item with every policy's answers and every scorer's verdict on them. The image-blanked
    copies (`evaluate.blank_image_ablation`) are left out: their pictures are white, and their answers and
    scores are in eval_answers and eval_scores."""
    shown = eval_items["variant"] != IMAGE_BLANKED
    eval_items = eval_items[shown]
    eval_answers = eval_answers[eval_answers["variant"] != IMAGE_BLANKED]
    eval_scores = eval_scores[eval_scores["variant"] != IMAGE_BLANKED]
    table = eval_items[list(ITEM_COLUMNS)].copy()
    table["images"] = [side_by_side(images) for images in eval_items["images"]]
    if eval_answers.empty:  # nothing was answered: the items alone
        return table.reset_index(drop=True)
    answers = eval_answers.assign(column=[f"{m} {d}" for m, d in zip(eval_answers["model"], _decodings(eval_answers))])
    wide = answers.pivot(index="item_id", columns="column", values="text")
    failed = answers[answers["error"].notna()]
    for r in failed.itertuples(index=False):  # a failed generation shows as its error, not as an empty answer
        wide.loc[r.item_id, r.column] = f"[generation failed: {r.error}]"
    cells = _verdict_cells(eval_scores)
    order = []
    for column in sorted(wide.columns, key=_policy_order):
        order.append(column)
        order += sorted(c for c in cells.columns if c.startswith(f"{column} · "))
    browse = wide.join(cells, how="outer")[order]
    return table.join(browse, on="item_id").reset_index(drop=True)


def side_by_side(images) -> bytes:
    """An item's images as one PNG, left to right at a common height (a grey tile when it has none)."""
    if len(images) == 1:  # already one PNG (eval items hold PNG bytes)
        return bytes(images[0])
    pictures = [decode_image(data) for data in images]
    if not pictures:
        return png_bytes(NO_IMAGE)
    height = max(p.height for p in pictures)
    pictures = [p if p.height == height else p.resize((max(1, p.width * height // p.height), height)) for p in pictures]
    strip = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1), height), "white")
    x = 0
    for picture in pictures:
        strip.paste(picture, (x, 0))
        x += picture.width + GAP
    return png_bytes(strip)


def _decodings(rows: pd.DataFrame) -> list[str]:
    """'greedy', or 'sampled' ('sampled 2', ... when a policy answered an item more than once)."""
    several = rows.groupby(["model", "decoding"])["sample"].transform("max") > 0
    return [
        d if d == "greedy" else (f"sampled {s + 1}" if many else "sampled")
        for d, s, many in zip(rows["decoding"], rows["sample"], several)
    ]


def _verdict_cells(scores: pd.DataFrame) -> pd.DataFrame:
    """item_id x '<model> <decoding> · <scorer>' -> 'metric=value, ... (detail)'. One pass over the rows
    (a default run has ~35,000), not a pandas group apply: that took most of this node's time."""
    values: dict[tuple[str, str], list[tuple[str, float]]] = {}
    details: dict[tuple[str, str], list[str]] = {}
    for item, model, decoding, scorer, metric, value, detail in zip(
        scores["item_id"],
        scores["model"],
        _decodings(scores),
        scores["scorer"],
        scores["metric"],
        scores["value"],
        scores["detail"],
    ):
        key = (item, f"{model} {decoding} · {scorer}")
        values.setdefault(key, []).append((metric, value))
        if detail:
            details.setdefault(key, []).append(detail)
    cells = {}
    for key, pairs in values.items():
        text = ", ".join(f"{m}={v:g}" for m, v in sorted(pairs))
        why = "; ".join(dict.fromkeys(details.get(key, ())))
        cells[key] = f"{text} ({why})" if why else text
    index = pd.MultiIndex.from_tuples(list(cells), names=["item_id", "column"])
    return pd.Series(list(cells.values()), index=index).unstack("column")


def _policy_order(column: str) -> tuple[bool, str]:
    """base first, as in the report; greedy before sampled within a policy."""
    return (not column.startswith("base "), column.replace(" greedy", " 0"))
