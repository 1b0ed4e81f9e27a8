"""The split as a dataset release: a card, the published SPA-VL layout, and the official trainers' JSON.

`export_release` hands the four tables and the card to the catalog's `SpaVLReleaseDataset`, which writes
the published parquet layout (data/train-*, validation/validation-*, test/harm-*, test/help-*) that
`datasets.load_dataset("parquet", data_files=...)` reads with `image` decoded as an Image.

`export_rlhf_pairs` gives the train and validation pairs with their question type and a stable id, the table
the catalog's `SpaVLRLHFDataset` writes as the JSON files and image folder of SPA-VL's own training code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pandas as pd

from spavl_kedro.config import GenerateConfig, JudgeConfig, SplitConfig, typed
from spavl_kedro.datasets.optional import takes_missing
from spavl_kedro.datasets.spa_vl_rlhf import PAIR_COLUMNS
from spavl_kedro.schema import CLASS_COLUMNS, SPA_QTYPES

from .nodes import _Pixels, wording_audit

# What names a pair in preferences and pair_provenance: one question, the two responders in order.
PAIR_KEY = ["question_id", "chosen_responder", "rejected_responder"]

LICENCE = "cc-by-4.0"  # as SPA-VL; the images of a real source keep their own terms

# The card's loading section. One config per call because one call casts all its splits to one schema, and
# the configs' columns differ; the data_dir warning because that call ignores the card's configs (checked
# with datasets 5.2 on the default run's export: it returned train alone, with no message).
LOADING = """## Loading

One config per call: the configs have different columns.

```python
from datasets import load_dataset

path = "data/09_export/spa_vl"  # this folder, or its hub repository id
train = load_dataset(path, "default")  # the configs above; "test" gives the splits harm and help
test = load_dataset(path, "test")
# or, with spavl_kedro installed (split names train, validation, test_harm, test_help):
from spavl_kedro.datasets.spa_vl import data_files
test = load_dataset("parquet", data_files=data_files(path, "test"))
```

`load_dataset("parquet", data_dir=path)` does not read the configs: it returns train alone, without a word
about validation and test.
"""


@takes_missing("seed_corpus")  # absent with a real image source: no tiny models were bootstrapped
def write_dataset_card(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    test_harm: pd.DataFrame,
    test_help: pd.DataFrame,
    pair_provenance: pd.DataFrame,
    questions: pd.DataFrame,
    seed_corpus: pd.DataFrame,
    params: SplitConfig | dict[str, Any],
    judge_params: JudgeConfig | dict[str, Any],
    generate_params: GenerateConfig | dict[str, Any],
) -> str:
    """A Hugging Face dataset card: configs, sizes, counts per class, question type and responder, the
    wording audit (seen / unseen families per table, and unseen skeletons where none may be), and how the data
    was built."""
    cfg, generate = typed(SplitConfig, params), typed(GenerateConfig, generate_params)
    sizes = {
        "train": len(train),
        "validation": len(validation),
        "test_harm": len(test_harm),
        "test_help": len(test_help),
    }
    header = [
        "---",
        f"license: {LICENCE}",
        "task_categories:",
        "- visual-question-answering",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*",
        "- config_name: validation",
        "  data_files:",
        "  - split: validation",
        "    path: validation/validation-*",
        "- config_name: test",
        "  data_files:",
        "  - split: harm",
        "    path: test/harm-*",
        "  - split: help",
        "    path: test/help-*",
        "---",
        "",
    ]
    body = [
        "# SPA-VL-style safety preference data",
        "",
        "Built with spavl_kedro: images per harm subcategory, SPA-VL's three question types, answers from "
        "several VLMs, pairs labelled harmlessness first and helpfulness second. Columns follow the "
        "published SPA-VL release: train (image, question, chosen, rejected, image_name), validation "
        "(+ class1..3), test harm / help (image, question, class1..3); `image` is {bytes, path}.",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sizes.items()],
        "",
        f"Held out per subcategory: {cfg.test_harm_per_subcategory} harmful and "
        f"{cfg.test_help_per_subcategory} easy questions, each on an image no training pair shows; no "
        "training question has the normalised text of a test question. Subset: question types "
        f"{cfg.subset.qtypes}, responders {cfg.subset.responders}, at most {cfg.subset.max_pairs or 'all'} "
        f"pairs. Preferences judged by `{typed(JudgeConfig, judge_params).primary}`.",
        "",
        *LOADING.splitlines(),
        "",
    ]
    seeds = seed_corpus if seed_corpus is not None else pd.DataFrame({"question": []})
    body += _wording_section(
        wording_audit(train, validation, test_harm, test_help, questions, seeds, generate), generate
    )
    train_pairs = pair_provenance[pair_provenance["split"] == "train"]
    body += _counts("Train pairs per domain and category", train_pairs.groupby(["class1", "class2"]).size())
    body += _counts("Train pairs per question type", train_pairs.groupby("qtype").size())
    body += _counts("Train pairs per decision", train_pairs.groupby("reason").size())
    chosen = train_pairs.groupby("chosen_responder").size().rename("chosen")
    rejected = train_pairs.groupby("rejected_responder").size().rename("rejected")
    table = pd.concat([chosen, rejected], axis=1).fillna(0).astype(int)
    body += [
        "## Train pairs per responder",
        "",
        "| responder | chosen | rejected |",
        "|---|---|---|",
        *[f"| {name} | {row.chosen} | {row.rejected} |" for name, row in table.iterrows()],
        "",
    ]
    return "\n".join(header + body)


def _wording_section(audit: pd.DataFrame, generate: GenerateConfig) -> list[str]:
    if generate.questions.writer != "template":
        return [
            "## Wording",
            "",
            f"Questions were written by `{generate.questions.model_writer.backend.name}`: "
            "there are no wording families to hold out.",
            "",
        ]
    families = generate.questions.wording.families()
    held = generate.questions.wording.held_out_ids(generate.seed)
    per_type = ", ".join(
        f"{q} {sum(f.qtype == q for f in families)} ({sum(f.qtype == q and f.family_id in held for f in families)} held out)"
        for q in SPA_QTYPES
    )
    lines = [
        "## Wording",
        "",
        f"The questions come from wording families (openings x request frames x slot orders): {per_type}. "
        "A held-out family's questions can only be test questions. `unseen skeleton` counts the texts that "
        "are an instance of a held-out family's sentence form, whatever fills its slots: it must be 0 "
        "outside the test sets. The seed corpus is what the tiny models and guards were bootstrapped on.",
        "",
        "| table | questions | seen | unseen | unseen skeleton |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.table} | {r.questions} | {r.seen if r.table.startswith('test_') else '–'} | "
        f"{r.unseen if r.table.startswith('test_') else '–'} | {r.unseen_skeleton} |"
        for r in audit.itertuples(index=False)
    ]
    return lines + [""]


def _counts(title: str, counts: pd.Series) -> list[str]:
    keys = counts.index.names
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " | pairs |", "|" + "---|" * (len(keys) + 1)]
    for key, n in counts.items():
        cells = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join(map(str, cells)) + f" | {n} |")
    return lines + [""]


def export_release(
    train: pd.DataFrame, validation: pd.DataFrame, test_harm: pd.DataFrame, test_help: pd.DataFrame, dataset_card: str
) -> dict[str, Any]:
    """The release as the catalog's SpaVLReleaseDataset saves it."""
    return {
        "train": train,
        "validation": validation,
        "test_harm": test_harm,
        "test_help": test_help,
        "README.md": dataset_card,
    }


def pair_id(question_id: str, chosen_responder: str, rejected_responder: str) -> int:
    """A pair's id in the official JSON: the first 13 hex digits (52 bits) of
    sha256("question_id|chosen_responder|rejected_responder").

    The key, not a row number: the same pair keeps its id on every rerun, whatever the order or subset.
    52 bits fit torch.long and stay exact in readers that parse JSON numbers as doubles; 100,788 pairs
    collide with probability about 1e-6 (n^2 / 2^53), and `SpaVLRLHFDataset` refuses a repeated id.

    >>> pair_id("bully-000-easy", "tiny-careful", "tiny-lax")
    3673864028525828
    """
    key = f"{question_id}|{chosen_responder}|{rejected_responder}"
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:13], 16)


def export_rlhf_pairs(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    pair_provenance: pd.DataFrame,
    preferences: pd.DataFrame,
    images: pd.DataFrame,
) -> pd.DataFrame:
    """Train and validation pairs as the catalog's `SpaVLRLHFDataset` saves them (`PAIR_COLUMNS`).

    The published tables carry no question type or pair key, so the pairs are built from pair_provenance
    (split, qtype, classes) joined to preferences (texts, image) on `PAIR_KEY`, with each image's bytes and
    path as `train` has them; then checked to be exactly the pairs of `train` and `validation`.
    """
    texts = preferences[[*PAIR_KEY, "question", "chosen", "rejected", "image_ids"]]
    for name, table in (("pair_provenance", pair_provenance), ("preferences", texts.merge(pair_provenance[PAIR_KEY]))):
        if table.duplicated(PAIR_KEY).any():
            twice = table[table.duplicated(PAIR_KEY)].iloc[0]
            raise ValueError(
                f"{name}: pair {_name(twice)} appears more than once; a (question, chosen responder, "
                "rejected responder) key must name one pair"
            )
    pairs = pair_provenance.merge(texts, on=PAIR_KEY, how="left", indicator="found")
    pixels = _Pixels(images)
    rows = []
    for pair in pairs.itertuples(index=False):
        if pair.found != "both":
            raise ValueError(f"pair_provenance: pair {_name(pair)} ({pair.split}) is not in preferences")
        if pair.qtype not in SPA_QTYPES:
            raise ValueError(
                f"pair_provenance: pair {_name(pair)} ({pair.split}): field qtype is "
                f"'{pair.qtype}', not one of {list(SPA_QTYPES)}"
            )
        image_id = pair.image_ids[0]
        if not pixels.png.get(image_id):
            raise ValueError(
                f"pair {_name(pair)} ({pair.split}): field image: image '{image_id}' has no bytes in `images`"
            )
        rows.append(
            {
                "split": pair.split,
                "qtype": pair.qtype,
                "id": pair_id(pair.question_id, pair.chosen_responder, pair.rejected_responder),
                "image": {"bytes": pixels.png[image_id], "path": pixels.name[image_id]},
                "question": pair.question,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                **{c: getattr(pair, c) for c in CLASS_COLUMNS},
            }
        )
    out = pd.DataFrame(rows, columns=PAIR_COLUMNS).astype({"id": "int64"})
    for split, table, paths in (
        ("train", train, train["image_name"]),
        ("validation", validation, [i["path"] for i in validation["image"]]),
    ):
        published = Counter(zip(paths, table["question"], table["chosen"], table["rejected"]))
        ours = out[out["split"] == split]
        keyed = Counter(zip([i["path"] for i in ours["image"]], ours["question"], ours["chosen"], ours["rejected"]))
        if published != keyed:
            extra, lost = keyed - published, published - keyed
            example = next(iter(extra or lost))
            raise ValueError(
                f"{split}: {sum(lost.values())} published pair(s) have no keyed pair in "
                f"pair_provenance and {sum(extra.values())} keyed pair(s) are not published, e.g. "
                f"image '{example[0]}', question '{example[1]}'"
            )
    return out.sort_values("id").reset_index(drop=True)


def _name(pair: Any) -> str:
    return f"'{pair.question_id}' ({pair.chosen_responder} over {pair.rejected_responder})"
