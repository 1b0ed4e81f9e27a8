"""The split as a dataset release: a card, and the published SPA-VL layout on disk.

`export_release` hands the four tables and the card to the catalog's `SpaVLReleaseDataset`, which writes
the published parquet layout (data/train-*, validation/validation-*, test/harm-*, test/help-*) that
`datasets.load_dataset("parquet", data_files=...)` reads with `image` decoded as an Image.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from spavl_kedro.config import SplitConfig

LICENCE = "cc-by-4.0"  # as SPA-VL; the images of a real source keep their own terms


def write_dataset_card(train: pd.DataFrame, validation: pd.DataFrame, test_harm: pd.DataFrame,
                       test_help: pd.DataFrame, pair_provenance: pd.DataFrame, params: dict[str, Any],
                       judge_params: dict[str, Any]) -> str:
    """A Hugging Face dataset card: configs, sizes, counts per class, question type and responder, and
    how the data was built."""
    cfg = SplitConfig.model_validate(params)
    sizes = {"train": len(train), "validation": len(validation), "test_harm": len(test_harm),
             "test_help": len(test_help)}
    header = ["---", f"license: {LICENCE}", "task_categories:", "- visual-question-answering", "configs:",
              "- config_name: default", "  data_files:", "  - split: train", "    path: data/train-*",
              "- config_name: validation", "  data_files:", "  - split: validation",
              "    path: validation/validation-*", "- config_name: test", "  data_files:", "  - split: harm",
              "    path: test/harm-*", "  - split: help", "    path: test/help-*", "---", ""]
    body = ["# SPA-VL-style safety preference data", "",
            "Built with spavl_kedro: images per harm subcategory, SPA-VL's three question types, answers from "
            "several VLMs, pairs labelled harmlessness first and helpfulness second. Columns follow the "
            "published SPA-VL release: train (image, question, chosen, rejected, image_name), validation "
            "(+ class1..3), test harm / help (image, question, class1..3); `image` is {bytes, path}.", "",
            "| split | rows |", "|---|---|", *[f"| {k} | {v} |" for k, v in sizes.items()], "",
            f"Held out per subcategory: {cfg.test_harm_per_subcategory} harmful and "
            f"{cfg.test_help_per_subcategory} easy questions, each on an image no training pair shows; no "
            "training question has the normalised text of a test question. Subset: question types "
            f"{cfg.subset.qtypes}, responders {cfg.subset.responders}, at most {cfg.subset.max_pairs or 'all'} "
            f"pairs. Preferences judged by `{judge_params.get('primary')}`.", ""]
    train_pairs = pair_provenance[pair_provenance["split"] == "train"]
    body += _counts("Train pairs per domain and category", train_pairs.groupby(["class1", "class2"]).size())
    body += _counts("Train pairs per question type", train_pairs.groupby("qtype").size())
    body += _counts("Train pairs per decision", train_pairs.groupby("reason").size())
    chosen = train_pairs.groupby("chosen_responder").size().rename("chosen")
    rejected = train_pairs.groupby("rejected_responder").size().rename("rejected")
    table = pd.concat([chosen, rejected], axis=1).fillna(0).astype(int)
    body += ["## Train pairs per responder", "", "| responder | chosen | rejected |", "|---|---|---|",
             *[f"| {name} | {row.chosen} | {row.rejected} |" for name, row in table.iterrows()], ""]
    return "\n".join(header + body)


def _counts(title: str, counts: pd.Series) -> list[str]:
    keys = counts.index.names
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " | pairs |", "|" + "---|" * (len(keys) + 1)]
    for key, n in counts.items():
        cells = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join(map(str, cells)) + f" | {n} |")
    return lines + [""]


def export_release(train: pd.DataFrame, validation: pd.DataFrame, test_harm: pd.DataFrame,
                   test_help: pd.DataFrame, dataset_card: str) -> dict[str, Any]:
    """The release as the catalog's SpaVLReleaseDataset saves it."""
    return {"train": train, "validation": validation, "test_harm": test_harm, "test_help": test_help,
            "README.md": dataset_card}
