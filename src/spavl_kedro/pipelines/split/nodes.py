"""split: preferences and held-out questions in the published SPA-VL layout.

Held-out images are chosen per subcategory, so no test image (and no question about it) is seen in
training: test_harm gets one harmful question (hardq or hards) per held-out image, test_help the easy
question of another. The remaining preferences are split into train and validation per subcategory.
"""

from __future__ import annotations

import random
from typing import Any

import pandas as pd

from spavl_kedro.config import SplitConfig
from spavl_kedro.schema import CLASS_COLUMNS, SPA_QTYPES, validate


def split_dataset(preferences: pd.DataFrame, questions: pd.DataFrame, images: pd.DataFrame,
                  params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    cfg = SplitConfig.model_validate(params)
    n_harm, n_help = cfg.test_harm_per_subcategory, cfg.test_help_per_subcategory
    # The published layout holds one image per row: MIS two-image samples go to SFT through mis_cot instead.
    kept = questions[questions["kept"] & questions["qtype"].isin(SPA_QTYPES)]
    first_image = kept["image_ids"].map(lambda ids: ids[0])
    harm_ids, help_ids, held_images = [], [], set()
    for class3, group in kept.assign(image_id=first_image).groupby("class3", sort=True):
        rng = random.Random(f"{cfg.seed}:{class3}")
        image_ids = sorted(group["image_id"].unique())
        if len(image_ids) < n_harm + n_help + 1:
            raise ValueError(f"subcategory '{class3}': {len(image_ids)} images, need at least "
                             f"{n_harm + n_help + 1} (test_harm + test_help + one for training)")
        chosen = rng.sample(image_ids, n_harm + n_help)
        held_images.update(chosen)
        for image_id in chosen[:n_harm]:
            harmful = group[(group["image_id"] == image_id) & group["qtype"].isin(["hardq", "hards"])]
            harm_ids.append(rng.choice(sorted(harmful["question_id"])))
        for image_id in chosen[n_harm:]:
            easy = group[(group["image_id"] == image_id) & (group["qtype"] == "easy")]
            help_ids.append(sorted(easy["question_id"])[0])

    pixels = images.set_index("image_id")
    spa = preferences[preferences["qtype"].isin(SPA_QTYPES)]
    trainable = spa[~spa["image_ids"].map(lambda ids: bool(set(ids) & held_images))]
    val_parts, train_parts = [], []
    for class3, group in trainable.groupby("class3", sort=True):
        group = group.sample(frac=1.0, random_state=random.Random(f"{cfg.seed}:val:{class3}").randrange(2**31))
        n_val = round(len(group) * cfg.validation_fraction)
        val_parts.append(group.iloc[:n_val])
        train_parts.append(group.iloc[n_val:])
    train = pd.concat(train_parts).sort_values("question_id")
    validation = pd.concat(val_parts).sort_values("question_id")

    def tests(ids: list[str]) -> pd.DataFrame:
        rows = kept.set_index("question_id").loc[sorted(ids)].reset_index()
        return _with_image(rows, pixels).rename(columns={"text": "question"})

    return (validate(_with_image(train, pixels), "train"),
            validate(_with_image(validation, pixels), "validation"),
            validate(tests(harm_ids), "test_harm"),
            validate(tests(help_ids), "test_help"))


def _with_image(df: pd.DataFrame, pixels: pd.DataFrame) -> pd.DataFrame:
    """Attach the published `image` struct and `image_name` of each row's (first) image."""
    first = [ids[0] for ids in df["image_ids"]]
    return df.assign(image=[_image_struct(pixels, i) for i in first],
                     image_name=[_image_name(pixels, i) for i in first])


def _image_struct(pixels: pd.DataFrame, image_id: str) -> dict[str, Any]:
    return {"bytes": pixels.at[image_id, "png"], "path": _image_name(pixels, image_id)}


def _image_name(pixels: pd.DataFrame, image_id: str) -> str:
    row = pixels.loc[image_id]
    return "/".join([*(row[c] for c in CLASS_COLUMNS), f"{image_id}.png"])
