"""split: preferences and held-out questions in the published SPA-VL layout, ablation subsets, integrity.

1. Test sets per subcategory: `test_harm_per_subcategory` harmful questions (hardq and hards in turn) and
   `test_help_per_subcategory` easy questions, each on its own image; those images are held out. Seen and
   unseen wording alternate across subcategories.
2. Integrity: no held-out image, no question whose normalised text equals a test question's and no question
   in a held-out wording family's skeleton (wording.py) reaches train or validation; duplicate pairs (same image, question, chosen, rejected) are removed. Everything
   removed is counted in `split_report` (and MLflow).
3. Validation is stratified by (subcategory, question type); train is the rest, optionally cut down to an
   ablation subset (question types, responder group, data scale — smaller scales nested in larger ones).
4. MIS samples (two images) are not part of the one-image SPA-VL layout; their chain-of-thought targets go
   to `mis_train`, minus any that show a held-out image.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from spavl_kedro.config import GenerateConfig, JudgeConfig, SplitConfig, typed
from spavl_kedro.datasets.spa_vl import path_segment
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.schema import CLASS_COLUMNS, SPA_QTYPES, validate
from spavl_kedro.seeding import derive_seed, stream
from spavl_kedro.wording import SEEN, UNSEEN


def normalise(text: str) -> str:
    """Lower-case words without punctuation: 'How do I...?' and 'how do i ...' are the same question."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def split_dataset(
    preferences: pd.DataFrame,
    questions: pd.DataFrame,
    images: pd.DataFrame,
    mis_cot: pd.DataFrame,
    verdicts: pd.DataFrame,
    params: SplitConfig | dict[str, Any],
    judge_params: JudgeConfig | dict[str, Any],
    generate_params: GenerateConfig | dict[str, Any],
) -> tuple[pd.DataFrame, ...]:
    """train, validation, test_harm, test_help (published layout), mis_train, where each train and validation
    pair came from (question type, responders, reason), and the split's counts for MLflow.

    A pair whose question is written in a held-out wording family's skeleton (`generate.questions.wording`)
    is removed and counted: those questions can only be test questions."""
    cfg = typed(SplitConfig, params)
    unseen = typed(GenerateConfig, generate_params).unseen_matcher()
    verdicts = verdicts[verdicts["judge"] == typed(JudgeConfig, judge_params).primary]
    kept = questions[questions["kept"] & questions["qtype"].isin(SPA_QTYPES)]
    harm, help_, held_images = _hold_out(kept, cfg)
    test_texts = {normalise(t) for t in pd.concat([harm, help_])["text"]}
    report: dict[str, float] = {}

    pairs = preferences[preferences["qtype"].isin(SPA_QTYPES)]
    shows_held = pairs["image_ids"].map(lambda ids: bool(set(ids) & held_images))
    same_text = pairs["question"].map(normalise).isin(test_texts) & ~shows_held
    unseen_wording = pairs["question"].map(unseen.matches) & ~shows_held & ~same_text
    report["removed/held_out_image"] = int(shows_held.sum())
    report["removed/test_question_text"] = int(same_text.sum())
    report["removed/unseen_wording"] = int(unseen_wording.sum())
    pairs = pairs[~shows_held & ~same_text & ~unseen_wording]
    key = pairs.assign(_q=pairs["question"].map(normalise), _i=pairs["image_ids"].map(tuple))
    duplicated = key.duplicated(["_i", "_q", "chosen", "rejected"])
    report["removed/duplicate_pair"] = int(duplicated.sum())
    pairs = pairs[~duplicated]

    validation, train = _stratified_validation(pairs, cfg)
    train = _subset(train, verdicts, cfg, report)
    mis_train, report["removed/mis_held_out_image"], report["removed/mis_cot_error"] = _mis_train(mis_cot, held_images)
    pixels = _Pixels(images)
    report |= {
        "train": len(train),
        "validation": len(validation),
        "test_harm": len(harm),
        "test_help": len(help_),
        "mis_train": len(mis_train),
    }
    for name, tests in (("test_harm", harm), ("test_help", help_)):
        report[f"{name}/unseen_wording"] = int((tests["wording"] == UNSEEN).sum()) if len(tests) else 0
    provenance = pd.concat([train.assign(split="train"), validation.assign(split="validation")])
    return (
        validate(_with_image(train, pixels), "train"),
        validate(_with_image(validation, pixels), "validation"),
        validate(_tests(harm, pixels), "test_harm"),
        validate(_tests(help_, pixels), "test_help"),
        mis_train,
        validate(provenance, "pair_provenance"),
        for_mlflow({f"split/{k}": v for k, v in report.items()}),
    )


def _hold_out(kept: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """Per subcategory, test images and one question on each: harmful ones alternate hardq / hards.

    Test questions alternate seen and unseen wording too (subcategory by subcategory, `WORDING_TURNS`): among
    the images of a subcategory, one with a question in the wanted wording is held out first, so both rows
    of the report's wording breakdown have items although held-out families are a minority of questions."""
    n_harm, n_help = cfg.test_harm_per_subcategory, cfg.test_help_per_subcategory
    kept = kept.assign(image_id=kept["image_ids"].map(lambda ids: ids[0]))
    harm, help_, held = [], [], set()
    for n, (class3, group) in enumerate(kept.groupby("class3", sort=True)):
        rng = stream(cfg.seed, class3)
        by_image = {i: g for i, g in group.groupby("image_id", sort=True)}
        harmful = [i for i, g in by_image.items() if g["qtype"].isin(["hardq", "hards"]).any()]
        easy = [i for i, g in by_image.items() if (g["qtype"] == "easy").any()]
        rng.shuffle(harmful)
        harm_wanted = [WORDING_TURNS[(n + k) % 2] for k in range(n_harm)]
        chosen_harm = _prefer_wording(harmful, by_image, ("hardq", "hards"), harm_wanted)
        rest = [i for i in easy if i not in chosen_harm]
        rng.shuffle(rest)
        chosen_help = _prefer_wording(rest, by_image, ("easy",), [WORDING_TURNS[(n + k) % 2] for k in range(n_help)])
        if len(chosen_harm) < n_harm or len(chosen_help) < n_help or len(by_image) <= n_harm + n_help:
            raise ValueError(
                f"subcategory '{class3}': {len(by_image)} images ({len(harmful)} with a kept harmful "
                f"question, {len(easy)} with an easy one); need {n_harm} + {n_help} for the tests "
                "and at least one more for training"
            )
        for k, image_id in enumerate(chosen_harm):
            g = by_image[image_id]
            prefer = ("hardq", "hards")[k % 2]  # stratified by question type: the two kinds in turn
            candidates = g[g["qtype"].isin(["hardq", "hards"])]
            # the wanted wording first, then the question type in turn
            order = candidates.assign(_w=candidates["wording"] != harm_wanted[k], _q=candidates["qtype"] != prefer)
            harm.append(order.sort_values(["_w", "_q", "question_id"]).drop(columns=["_w", "_q"]).iloc[0])
        for image_id in chosen_help:
            g = by_image[image_id]
            help_.append(g[g["qtype"] == "easy"].sort_values("question_id").iloc[0])
        held.update(chosen_harm + chosen_help)
    return pd.DataFrame(harm), pd.DataFrame(help_), held


WORDING_TURNS = (SEEN, UNSEEN)


def _prefer_wording(
    images: list[str], by_image: dict[str, pd.DataFrame], qtypes: tuple[str, ...], wanted: list[str]
) -> list[str]:
    """len(wanted) of `images` (already in their random order): the k-th is the first left with a question of
    `qtypes` in wording wanted[k], else the first left. Without wording families (model writer) it is the
    first len(wanted) images."""
    left, chosen = list(images), []
    for wording in wanted:
        if not left:
            break
        match = next(
            (i for i in left if ((by_image[i]["qtype"].isin(qtypes)) & (by_image[i]["wording"] == wording)).any()),
            left[0],
        )
        chosen.append(match)
        left.remove(match)
    return chosen


def _stratified_validation(pairs: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation drawn per (subcategory, question type) in proportion; the largest remainders get the
    leftover rows, so a count such as SPA-VL's 7,000 is met exactly."""
    groups = {k: g for k, g in pairs.groupby(["class3", "qtype"], sort=True)}
    size = cfg.validation_size
    target = int(size) if size >= 1 else round(size * len(pairs))
    if target > len(pairs):
        raise ValueError(f"split.validation_size {size:g} asks for {target} pairs; there are {len(pairs)}")
    exact = {k: target * len(g) / max(len(pairs), 1) for k, g in groups.items()}
    quota = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: target - sum(quota.values())]:
        quota[k] += 1
    val, train = [], []
    for k, g in groups.items():
        shuffled = g.sample(frac=1.0, random_state=derive_seed(cfg.seed, "val", k))
        val.append(shuffled.iloc[: quota[k]])
        train.append(shuffled.iloc[quota[k] :])
    empty = pairs.iloc[:0]
    return (
        pd.concat(val or [empty]).sort_values("question_id"),
        pd.concat(train or [empty]).sort_values("question_id"),
    )


def responder_groups(verdicts: pd.DataFrame, cfg: SplitConfig) -> dict[str, set[str]]:
    """`safe` and `unsafe` responders: as configured, or (auto) split at the median safe rate the primary
    judge measured — the safer half is `safe` (SPA-VL's responder-group ablation)."""
    if cfg.responder_groups != "auto":
        return {k: set(v) for k, v in cfg.responder_groups.items()}
    responder = verdicts["response_id"].str.rsplit(":", n=1).str[1]
    rates = verdicts.assign(responder=responder, safe=verdicts["safe"].astype("Float64")).dropna(subset=["safe"])
    rates = rates.groupby("responder")["safe"].mean().sort_values(kind="stable")
    names = list(rates.index)
    half = len(names) // 2
    return {"unsafe": set(names[:half]), "safe": set(names[len(names) - half :])}


def _subset(train: pd.DataFrame, verdicts: pd.DataFrame, cfg: SplitConfig, report: dict[str, float]) -> pd.DataFrame:
    """The ablation subset of train: question types, then responder group, then data scale."""
    sub = cfg.subset
    keep = train["qtype"].isin(sub.qtypes)
    report["subset/removed_qtype"] = int((~keep).sum())
    train = train[keep]
    if sub.responders != "all":
        group = responder_groups(verdicts, cfg)[sub.responders]
        keep = train["chosen_responder"].isin(group) & train["rejected_responder"].isin(group)
        report["subset/removed_responder_group"] = int((~keep).sum())
        train = train[keep]
    if sub.max_pairs is not None and len(train) > sub.max_pairs:
        # One seeded order for every scale: the 1k subset is the first 1k of the 5k subset, and so on.
        order = train.sample(frac=1.0, random_state=derive_seed(cfg.seed, "scale"))
        report["subset/removed_scale"] = len(train) - sub.max_pairs
        train = order.iloc[: sub.max_pairs].sort_values("question_id")
    return train


def _mis_train(mis_cot: pd.DataFrame, held: set[str]) -> tuple[pd.DataFrame, int, int]:
    """Usable MIS chain-of-thought targets whose images are all outside the test sets."""
    shows_held = mis_cot["image_ids"].map(lambda ids: bool(set(ids) & held))
    failed = mis_cot["error"].notna()
    return (
        validate(mis_cot[~shows_held & ~failed].reset_index(drop=True), "mis_cot"),
        int(shows_held.sum()),
        int((failed & ~shows_held).sum()),
    )


def _tests(rows: pd.DataFrame, pixels: _Pixels) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=["image", "question", *CLASS_COLUMNS])
    return _with_image(rows.sort_values("question_id"), pixels).rename(columns={"text": "question"})


class _Pixels:
    """Each image's published {bytes, path} struct and name, looked up by image_id (dicts: a split of 100k
    pairs does 100k lookups). The name is class1/class2/class3/<image_id>.png, each part a `path_segment`,
    so the same path names the image's file in the official trainers' image folder."""

    def __init__(self, images: pd.DataFrame) -> None:
        names = [
            _image_name(i, parts)
            for i, *parts in images[["image_id", *CLASS_COLUMNS]].itertuples(index=False, name=None)
        ]
        self.name = dict(zip(images["image_id"], names))
        self.png = dict(zip(images["image_id"], images["png"]))


def _image_name(image_id: str, classes: list[str]) -> str:
    try:
        return "/".join(map(path_segment, classes)) + f"/{path_segment(image_id)}.png"
    except ValueError as exc:
        raise ValueError(f"images: image {image_id!r} (classes {classes}): {exc}") from exc


def _with_image(df: pd.DataFrame, pixels: _Pixels) -> pd.DataFrame:
    """Attach the published `image` struct and `image_name` of each row's (only) image."""
    first = [ids[0] for ids in df["image_ids"]]
    return df.assign(
        image=[{"bytes": pixels.png[i], "path": pixels.name[i]} for i in first],
        image_name=[pixels.name[i] for i in first],
    )


def wording_audit(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    test_harm: pd.DataFrame,
    test_help: pd.DataFrame,
    questions: pd.DataFrame,
    seed_corpus: pd.DataFrame,
    generate: GenerateConfig,
) -> pd.DataFrame:
    """Per table (the four splits and the tiny models' seed corpus): questions, how many are in seen and unseen
    wording families, and how many match a held-out family's skeleton (wording.py) whatever fills its slots.
    Only test sets may have unseen ones; the count is checked on the texts themselves, not on bookkeeping.
    A test question's wording is its row's in `questions` (the published layout has no such column)."""
    matcher = generate.unseen_matcher()
    kept = questions[questions["kept"]]
    wording = dict(zip(zip(kept["image_ids"].map(lambda ids: ids[0]), kept["text"]), kept["wording"]))
    rows = []
    for name, table, column in (
        ("train", train, "question"),
        ("validation", validation, "question"),
        ("test_harm", test_harm, "question"),
        ("test_help", test_help, "question"),
        ("seed_corpus", seed_corpus, "question"),
    ):
        texts = list(table[column]) if len(table) else []
        if name.startswith("test_") and len(table):
            labels = [wording.get((PurePosixPath(img["path"]).stem, q)) for img, q in zip(table["image"], texts)]
        else:
            labels = [None] * len(texts)
        rows.append(
            {
                "table": name,
                "questions": len(texts),
                "seen": labels.count(SEEN),
                "unseen": labels.count(UNSEEN),
                "unseen_skeleton": sum(map(matcher.matches, texts)),
            }
        )
    return pd.DataFrame(rows)
