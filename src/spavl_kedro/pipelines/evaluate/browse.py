"""The evaluation item by item: what was asked, what each policy answered and what every judge said.

One row per evaluation item: its set, variant, class and question type, the question (and the request in
words where the question leaves it to the images), the item's images side by side, then for every policy
and decoding its answer and one cell per scorer. A scorer's cell lists the values it gave that answer and
what decided them, e.g. `unsafe_rate=1 (O5)` or `asr=0, well_formed_rate=1 (refusal)`. The catalog keeps
it as parquet and shows it in MLflow as a table (datasets/mlflow_table.py).
"""

from __future__ import annotations

import pandas as pd
from PIL import Image

from spavl_kedro.imaging import decode_image, png_bytes

ITEM_COLUMNS = ("eval_set", "variant", "item_id", "class1", "class2", "class3", "qtype", "question", "request")
NO_IMAGE = Image.new("RGB", (32, 32), (200, 200, 200))  # a grey tile: the item was asked without an image
GAP = 4  # white pixels between two images of one item


def item_table(eval_items: pd.DataFrame, eval_answers: pd.DataFrame, eval_scores: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation item with every policy's answers and every scorer's verdict on them."""
    table = eval_items[list(ITEM_COLUMNS)].copy()
    table["images"] = [side_by_side(images) for images in eval_items["images"]]
    if eval_answers.empty:  # nothing was answered: the items alone
        return table.reset_index(drop=True)
    answers = eval_answers.assign(column=[f"{m} {d}" for m, d in zip(eval_answers["model"],
                                                                        _decodings(eval_answers))])
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
    pictures = [decode_image(data) for data in images]
    if not pictures:
        return png_bytes(NO_IMAGE)
    height = max(p.height for p in pictures)
    pictures = [p if p.height == height else p.resize((max(1, p.width * height // p.height), height))
                for p in pictures]
    strip = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1), height), "white")
    x = 0
    for picture in pictures:
        strip.paste(picture, (x, 0))
        x += picture.width + GAP
    return png_bytes(strip)


def _decodings(rows: pd.DataFrame) -> list[str]:
    """'greedy', or 'sampled' ('sampled 2', ... when a policy answered an item more than once)."""
    several = rows.groupby(["model", "decoding"])["sample"].transform("max") > 0
    return [d if d == "greedy" else (f"sampled {s + 1}" if many else "sampled")
            for d, s, many in zip(rows["decoding"], rows["sample"], several)]


def _verdict_cells(scores: pd.DataFrame) -> pd.DataFrame:
    """item_id x '<model> <decoding> · <scorer>' -> 'metric=value, ... (detail)'."""
    scores = scores.assign(decoding_label=_decodings(scores))
    scores["column"] = scores["model"] + " " + scores["decoding_label"] + " · " + scores["scorer"]

    def cell(group: pd.DataFrame) -> str:
        values = ", ".join(f"{m}={v:g}" for m, v in sorted(zip(group["metric"], group["value"])))
        details = "; ".join(dict.fromkeys(d for d in group["detail"] if d))
        return f"{values} ({details})" if details else values

    return scores.groupby(["item_id", "column"])[["metric", "value", "detail"]].apply(cell).unstack("column")


def _policy_order(column: str) -> tuple[bool, str]:
    """base first, as in the report; greedy before sampled within a policy."""
    return (not column.startswith("base "), column.replace(" greedy", " 0"))
