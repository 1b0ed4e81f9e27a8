"""The export for SPA-VL's own training code (github.com/EchoseChen/SPA-VL-RLHF), built from the split's real
output on a hand-made world: what the official loaders read, stable ids, the importer's round trip, and bad
input named by record and field."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PROJECT
from kedro.io import DataCatalog, DatasetError
from PIL import Image

from spavl_kedro.config import load_parameters
from spavl_kedro.datasets import SpaVLRLHFDataset
from spavl_kedro.datasets.spa_vl import image_classes, path_segment
from spavl_kedro.pipelines.split.nodes import split_dataset
from spavl_kedro.pipelines.split.pipeline import create_pipeline
from spavl_kedro.pipelines.split.release import export_rlhf_pairs, pair_id, write_dataset_card
from spavl_kedro.schema import TABLES

# Two published labels (spaces, '&') and one a user's taxonomy might hold, with characters no folder name takes.
CLASSES = [
    ("Representation & ToxicityHarms", "Toxic", "bully"),
    ("Malicious Use", "Fraud or deceptive action", "scamns"),
    ("Custom: domain", "a/b 100%", "odd."),
]
RESPONDERS = ["r0", "r1", "r2", "r3"]
JUDGE = {"judges": [{"name": "keyword", "kind": "keyword"}], "primary": "keyword"}
SPLIT = {"seed": 0, "test_harm_per_subcategory": 1, "test_help_per_subcategory": 1, "validation_size": 0.25}
GENERATE = load_parameters("base")["generate"]
OFFICIAL_KEYWORDS = {"hardq", "hardd", "easy"}  # data/config_train.json of the official repository
RECORD_KEYS = {"id", "image", "question", "chosen", "rejected"}


def _png(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (n % 256, 40, 7)).save(out, "PNG")
    return out.getvalue()


def _world() -> dict[str, pd.DataFrame]:
    images, questions, prefs = [], [], []
    for s, (c1, c2, c3) in enumerate(CLASSES):
        labels = {"class1": c1, "class2": c2, "class3": c3}
        for i in range(6):
            image_id = f"{c3}-{i}"
            images.append({"image_id": image_id, **labels, "png": _png(10 * s + i)})
            for qtype in ("easy", "hardq", "hards"):
                qid = f"{image_id}-{qtype}"
                text = f"{qtype} question on {image_id}, café?"  # non-ASCII: the JSON is written ASCII-escaped
                questions.append(
                    {
                        "question_id": qid,
                        "image_ids": [image_id],
                        "qtype": qtype,
                        **labels,
                        "text": text,
                        "kept": True,
                        "wording": None,
                    }
                )
                a, b = RESPONDERS[(i + s) % 4], RESPONDERS[(i + s + 1) % 4]
                prefs.append(
                    {
                        "question_id": qid,
                        "question": text,
                        "image_ids": [image_id],
                        "chosen": f"No, {qid}.",
                        "rejected": f"Sure {qid}",
                        **labels,
                        "qtype": qtype,
                        "chosen_responder": b,
                        "rejected_responder": a,
                        "judge": "keyword",
                        "reason": "harmlessness",
                        "order_consistent": True,
                    }
                )
    verdicts = pd.DataFrame(
        [
            {"response_id": f"x:{r}", "judge": "keyword", "safe": True, "category": "", "score": None, "raw": ""}
            for r in RESPONDERS
        ]
    )
    mis = pd.DataFrame(
        [
            {
                "question_id": "m0",
                "image_ids": ["bully-0", "scamns-0"],
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
        ],
        columns=TABLES["mis_cot"],
    )
    return {
        "images": pd.DataFrame(images),
        "questions": pd.DataFrame(questions),
        "preferences": pd.DataFrame(prefs),
        "verdicts": verdicts,
        "mis_cot": mis,
    }


def _pairs(world: dict[str, pd.DataFrame], **tables: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The split node on the world, then the export node on its output (with any input replaced)."""
    out = split_dataset(
        world["preferences"],
        world["questions"],
        world["images"],
        world["mis_cot"],
        world["verdicts"],
        SPLIT,
        JUDGE,
        GENERATE,
    )
    split = dict(zip(["train", "validation", "test_harm", "test_help", "mis_train", "pair_provenance"], out))
    inputs = {
        "train": split["train"],
        "validation": split["validation"],
        "pair_provenance": split["pair_provenance"],
        "preferences": world["preferences"],
        "images": world["images"],
        **tables,
    }
    return export_rlhf_pairs(**inputs), split


@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    pairs, split = _pairs(world)
    folder = tmp_path_factory.mktemp("export") / "spa_vl_rlhf"
    SpaVLRLHFDataset(str(folder)).save(pairs)
    return folder, pairs, split


def _official_load_data(keywords: list[str], config_path: Path) -> list[dict]:
    """all_utils/data_utils/common_utils.py `load_data` of the official repository, as it reads files."""
    config = json.loads(config_path.read_text())
    data = []
    for keyword in keywords:
        if keyword in config:
            with open(config[keyword]) as file:
                data.extend(json.load(file))
    return data


def _record_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.json") if not f.name.startswith("config_"))


def test_export_is_what_the_official_loaders_read(exported, tmp_path, monkeypatch):
    folder, pairs, split = exported
    prov = split["pair_provenance"]
    for config_name, table in (("config_train.json", split["train"]), ("config_test.json", split["validation"])):
        config = json.loads((folder / config_name).read_text())
        assert set(config) == OFFICIAL_KEYWORDS
        assert all(Path(p).is_absolute() and Path(p).parent == folder.resolve() for p in config.values())
        monkeypatch.chdir(tmp_path)  # the trainer starts elsewhere; absolute paths still resolve
        records = _official_load_data(["easy", "hardq", "hardd"], folder / config_name)
        assert len(records) == len(table) > 0
        for record in records:
            assert set(record) == RECORD_KEYS
            assert type(record["id"]) is int and 0 <= record["id"] < 2**63  # torch.long
            assert all(isinstance(record[k], str) for k in ("image", "question", "chosen", "rejected"))
            with Image.open(os.path.join(folder / "images", record["image"])) as image:  # as the trainers open it
                assert image.convert("RGB").size == (8, 8)
        # the hard statements are under hardd, which is what the default train_rm.py keywords load
        hardd = json.loads(Path(config["hardd"]).read_text())
        split_name = "train" if config_name == "config_train.json" else "validation"
        assert len(hardd) == ((prov["split"] == split_name) & (prov["qtype"] == "hards")).sum() > 0
    all_ids = [r["id"] for f in _record_files(folder) for r in json.loads(f.read_text())]
    assert len(all_ids) == len(set(all_ids)) == len(split["train"]) + len(split["validation"])
    # image bytes unchanged, path as the parquet's image_name
    first = split["train"].iloc[0]
    assert (folder / "images" / first["image_name"]).read_bytes() == first["image"]["bytes"]


def test_class_names_are_folder_safe_and_read_back(exported):
    folder, pairs, _ = exported
    odd = pairs[pairs["class3"] == "odd."].iloc[0]
    assert odd["image"]["path"] == "Custom%3A domain/a%2Fb 100%25/odd%2E/" + odd["image"]["path"].rsplit("/", 1)[1]
    assert (folder / "images" / odd["image"]["path"]).is_file()
    assert (folder / "images/Representation & ToxicityHarms/Toxic/bully").is_dir()  # published names unchanged
    for pair in pairs.itertuples():
        assert image_classes(pair.image["path"]) == (pair.class1, pair.class2, pair.class3)
    assert path_segment("..") == "%2E%2E" and image_classes("a/%2E%2E/c/1.png")[1] == ".."


def test_ids_are_stable_across_reruns_and_row_order(world, exported, tmp_path):
    folder, pairs, split = exported
    prov = split["pair_provenance"]
    shuffled, _ = _pairs(
        world,
        pair_provenance=prov.sample(frac=1.0, random_state=1),
        preferences=world["preferences"].sample(frac=1.0, random_state=2),
    )
    pd.testing.assert_frame_equal(shuffled, pairs)
    key = prov.set_index(["question_id", "chosen_responder", "rejected_responder"]).index
    assert set(pairs["id"]) == {pair_id(*k) for k in key}
    again = tmp_path / "again"
    SpaVLRLHFDataset(str(again)).save(shuffled)
    for file in _record_files(folder):  # record files byte for byte; only the configs name their folder
        assert (again / file.name).read_bytes() == file.read_bytes()


def test_the_importer_gives_back_the_same_pairs(exported, tmp_path):
    folder, pairs, split = exported
    loaded = SpaVLRLHFDataset(str(folder)).load()
    pd.testing.assert_frame_equal(loaded, pairs)
    assert set(loaded["qtype"]) == {"easy", "hardq", "hards"}
    val = split["validation"]
    back = loaded[loaded["split"] == "validation"]
    assert sorted(zip(back["question"], back["class1"], back["class2"], back["class3"])) == sorted(
        zip(val["question"], val["class1"], val["class2"], val["class3"])
    )
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # the configs still name the old folder: files are found by name here
    pd.testing.assert_frame_equal(SpaVLRLHFDataset(str(moved)).load(), pairs)


def test_a_wrong_question_type_names_the_pair(world, exported, tmp_path):
    _, pairs, split = exported
    prov = split["pair_provenance"].copy()
    row = prov.index[prov["qtype"] == "hards"][0]
    prov.loc[row, "qtype"] = "hardd"  # the official keyword where our question type belongs
    with pytest.raises(ValueError, match=rf"pair '{re.escape(prov.loc[row, 'question_id'])}' .*field qtype is 'hardd'"):
        _pairs(world, pair_provenance=prov)
    bad = pairs.copy()
    bad.loc[3, "qtype"] = "mis_easy"
    with pytest.raises(DatasetError, match=rf"pair id {bad.loc[3, 'id']} \(row 3\): field 'qtype' is 'mis_easy'"):
        SpaVLRLHFDataset(str(tmp_path / "bad")).save(bad)
    assert not (tmp_path / "bad").exists()


def test_missing_image_bytes_and_a_repeated_id_name_the_pair(world, exported, tmp_path):
    _, pairs, split = exported
    images = world["images"].copy()
    used = split["train"].iloc[0]["image_name"].rsplit("/", 1)[1].removesuffix(".png")
    images.loc[images["image_id"] == used, "png"] = b""
    with pytest.raises(ValueError, match=rf"field image: image '{re.escape(used)}' has no bytes"):
        _pairs(world, images=images)
    bad = pairs.copy()
    bad.loc[1, "id"] = bad.loc[0, "id"]
    with pytest.raises(DatasetError, match=r"\(row 1\): field 'id' repeats row 0's"):
        SpaVLRLHFDataset(str(tmp_path / "bad")).save(bad)


def test_wired_into_the_split_pipeline_and_catalog(tmp_path):
    node = next(n for n in create_pipeline().nodes if n.name == "export_rlhf_pairs")
    assert node.outputs == ["spa_vl_rlhf"]
    entry = yaml.safe_load((PROJECT / "conf/base/catalog.yml").read_text())["spa_vl_rlhf"]
    assert entry["path"] == "data/09_export/spa_vl_rlhf"
    catalog = DataCatalog.from_config({"spa_vl_rlhf": {**entry, "path": str(tmp_path / "x")}})
    assert not catalog.exists("spa_vl_rlhf")


def test_the_card_shows_one_config_per_call_and_warns_about_data_dir(world, exported):
    _, _, split = exported
    world_questions = world["questions"]
    card = write_dataset_card(
        split["train"],
        split["validation"],
        split["test_harm"],
        split["test_help"],
        split["pair_provenance"],
        world_questions,
        None,
        SPLIT,
        JUDGE,
        GENERATE,
    )
    assert 'load_dataset("parquet", data_files=data_files(path, "test"))' in card
    assert '`load_dataset("parquet", data_dir=path)` does not read the configs: it returns train alone' in card
