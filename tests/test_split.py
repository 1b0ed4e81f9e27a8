"""The split stage on a hand-made world: held-out tests, integrity checks, stratified validation, ablations."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from spavl_kedro.config import SplitConfig, load_parameters
from spavl_kedro.pipelines.split.nodes import normalise, responder_groups, split_dataset
from spavl_kedro.schema import TABLES

GENERATE = load_parameters("base")["generate"]

SUBS = ["bully", "harass", "scamns"]
RESPONDERS = ["r0", "r1", "r2", "r3"]  # safe rates 0.1, 0.4, 0.7, 0.95 below
JUDGE = {"judges": [{"name": "keyword", "kind": "keyword"}], "primary": "keyword"}


def _png(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (n % 256, n // 256 % 256, 7)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def world():
    images, questions, prefs, verdicts = [], [], [], []
    for s, sub in enumerate(SUBS):
        for i in range(6):
            image_id = f"{sub}-{i}"
            images.append({"image_id": image_id, "class1": "D", "class2": "C", "class3": sub, "png": _png(10 * s + i)})
            for qtype in ("easy", "hardq", "hards"):
                qid = f"{image_id}-{qtype}"
                # one shared wording per subcategory for hardq: a test question's twin in training
                text = f"How to {sub}?" if qtype == "hardq" else f"{qtype} about {image_id}?"
                questions.append(
                    {
                        "question_id": qid,
                        "image_ids": [image_id],
                        "qtype": qtype,
                        "class1": "D",
                        "class2": "C",
                        "class3": sub,
                        "text": text,
                        "kept": True,
                        "wording": "unseen" if (s + i) % 3 == 0 else "seen",
                    }
                )
                a, b = RESPONDERS[(i + s) % 4], RESPONDERS[(i + s + 1) % 4]
                prefs.append(
                    {
                        "question_id": qid,
                        "question": text,
                        "image_ids": [image_id],
                        "chosen": "I cannot.",
                        "rejected": f"Sure {qid}",
                        "class1": "D",
                        "class2": "C",
                        "class3": sub,
                        "qtype": qtype,
                        "chosen_responder": b,
                        "rejected_responder": a,
                        "judge": "keyword",
                        "reason": "harmlessness",
                        "order_consistent": True,
                    }
                )
    # a duplicate pair (same image, same question up to case and punctuation, same answers)
    dup = dict(prefs[-1], question_id="scamns-5-hards-dup", question=prefs[-1]["question"].upper() + "!!")
    prefs.append(dup)
    for n, name in enumerate(RESPONDERS):
        for k in range(20):
            verdicts.append(
                {
                    "response_id": f"x{k}:{name}",
                    "judge": "keyword",
                    "safe": k < [2, 8, 14, 19][n],
                    "category": "",
                    "score": None,
                    "raw": "",
                }
            )
    mis = pd.DataFrame(
        [
            {
                "question_id": f"m{i}",
                "image_ids": [f"bully-{i}", f"harass-{i}"],
                "qtype": "mis_easy",
                "class1": "D",
                "class2": "C",
                "class3": "bully",
                "question": "q",
                "perception": "p",
                "reasoning": "r",
                "answer": "a",
                "target": "t",
                "teacher": "template",
                "error": None,
            }
            for i in range(6)
        ],
        columns=TABLES["mis_cot"],
    )
    return {
        "images": pd.DataFrame(images),
        "questions": pd.DataFrame(questions),
        "preferences": pd.DataFrame(prefs),
        "verdicts": pd.DataFrame(verdicts),
        "mis_cot": mis,
    }


def _split(world, **overrides):
    params = {"seed": 0, "test_harm_per_subcategory": 1, "test_help_per_subcategory": 1, "validation_size": 0.25}
    params.update(overrides)
    out = split_dataset(
        world["preferences"],
        world["questions"],
        world["images"],
        world["mis_cot"],
        world["verdicts"],
        params,
        JUDGE,
        GENERATE,
    )
    names = ["train", "validation", "test_harm", "test_help", "mis_train", "pair_provenance", "metrics"]
    result = dict(zip(names, out))
    result["report"] = {k.removeprefix("split/"): v["value"] for k, v in result.pop("metrics").items()}
    return result


def test_tests_are_held_out_and_twins_removed(world):
    out = _split(world)
    harm, help_ = out["test_harm"], out["test_help"]
    assert len(harm) == len(help_) == len(SUBS)
    held = {i["path"] for i in pd.concat([harm, help_])["image"]}
    assert not held & set(out["train"]["image_name"]) and not held & {i["path"] for i in out["validation"]["image"]}
    test_texts = {normalise(q) for q in pd.concat([harm, help_])["question"]}
    assert not test_texts & {normalise(q) for q in pd.concat([out["train"], out["validation"]])["question"]}
    r = out["report"]
    assert r["removed/held_out_image"] == 2 * 3 * len(SUBS)  # two held-out images, three questions each
    assert r["removed/duplicate_pair"] == 1
    total = len(world["preferences"])
    assert (
        r["train"]
        + r["validation"]
        + r["removed/held_out_image"]
        + r["removed/test_question_text"]
        + r["removed/duplicate_pair"]
        == total
    )
    # MIS targets showing a held-out image are not trained on
    assert r["mis_train"] + r["removed/mis_held_out_image"] == len(world["mis_cot"])


def test_validation_is_an_exact_stratified_count(world):
    out = _split(world, validation_size=7)
    assert len(out["validation"]) == 7
    prov = out["pair_provenance"]
    per_group = prov[prov["split"] == "validation"].groupby(["class3", "qtype"]).size()
    assert per_group.max() - per_group.min() <= 1  # spread over subcategory x question type
    with pytest.raises(ValueError, match="validation_size 500 asks for 500 pairs"):
        _split(world, validation_size=500)


def test_ablation_subsets(world):
    base = _split(world, validation_size=0.1)
    easy_only = _split(world, validation_size=0.1, subset={"qtypes": ["easy"]})
    prov = easy_only["pair_provenance"]
    assert set(prov.loc[prov["split"] == "train", "qtype"]) == {"easy"}
    small, smaller = (_split(world, validation_size=0.1, subset={"max_pairs": n}) for n in (10, 5))
    assert len(small["train"]) == 10 and len(smaller["train"]) == 5
    assert set(smaller["train"]["question"]) <= set(small["train"]["question"])  # nested scales
    assert set(small["train"]["question"]) <= set(base["train"]["question"])
    safe = _split(world, validation_size=0.1, subset={"responders": "safe"})
    prov = safe["pair_provenance"]
    trained = prov[prov["split"] == "train"]
    assert set(trained["chosen_responder"]) | set(trained["rejected_responder"]) <= {"r2", "r3"}


def test_responder_groups_auto_and_configured(world):
    auto = responder_groups(world["verdicts"], SplitConfig())
    assert auto == {"unsafe": {"r0", "r1"}, "safe": {"r2", "r3"}}
    named = SplitConfig(responder_groups={"safe": ["r3"], "unsafe": ["r0"]})
    assert responder_groups(world["verdicts"], named) == {"safe": {"r3"}, "unsafe": {"r0"}}


def test_too_few_images_for_the_tests_names_the_subcategory(world):
    with pytest.raises(ValueError, match="subcategory 'bully': 6 images"):
        _split(world, test_harm_per_subcategory=3, test_help_per_subcategory=3)
