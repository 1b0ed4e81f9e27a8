"""A Kedro dataset for the training data of SPA-VL's official code: JSON per question type, one image folder.

The consumer is github.com/EchoseChen/SPA-VL-RLHF (MIT). What its code does with the data (train_dpo.py,
train_ppo.py, train_rm.py and all_utils/data_utils/ there):
- `--config_train_path` names a JSON object keyword -> JSON file; `load_data` (common_utils.py) opens
  `config[keyword]` for each of `--keywords` as written, so a relative path is taken from the trainer's
  working directory, not from the config's folder. A keyword the config lacks is printed and skipped.
- Each file is a list of {"id", "image", "question", "chosen", "rejected"}; the image is opened with
  `PIL.Image.open(os.path.join(--image_folder, image))`, and `id` becomes a `torch.long` tensor.
- The published keywords are `hardq`, `hardd` and `easy` (data/config_train.json); `hardd` is the question
  type this project calls `hards`.
- train_rm.py also builds an eval set from `--config_test_path`, with the same keywords.

The folder this dataset writes:

    config_train.json        {"hardq": "<folder>/hardq_train.json", "hardd": ".../hardd_train.json", "easy": ...}
    config_test.json         the same keywords -> *_test.json: the validation pairs, for train_rm.py
    hardq_train.json ...     the records, sorted by id
    images/<class1>/<class2>/<class3>/<image_id>.png    the --image_folder; bytes as the split holds them

Config paths are absolute, as in the official README's example ("/path/to/your/dataset1.json"): the trainer
then finds them from whatever directory it is started in. All three keywords are always present; a question
type with no pairs gets an empty list, so no keyword is dropped silently.

The data, both ways, is one table of pairs, `PAIR_COLUMNS`:
    split        train or validation (-> config_train.json or config_test.json)
    qtype        easy, hardq or hards (-> the keyword and file)
    id           the record's integer id, unique in the folder
    image        {"bytes", "path"}: path is the record's `image`, class1/class2/class3/<name>
    question, chosen, rejected
    class1..3    the image's labels; they must be what `image_classes(path)` reads back
`load()` returns that table, sorted by id, from a folder `save()` wrote (or one moved elsewhere: a config
entry is looked up by file name in the folder first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.datasets.spa_vl import _parts, image_classes, path_segment
from spavl_kedro.schema import CLASS_COLUMNS, SPA_QTYPES

PAIR_COLUMNS = ["split", "qtype", "id", "image", "question", "chosen", "rejected", *CLASS_COLUMNS]
RECORD_KEYS = ("id", "image", "question", "chosen", "rejected")
TEXTS = ("question", "chosen", "rejected")

# qtype -> the official keyword. The one place `hardd` is spelled: a `hards` keyword would be skipped by
# the official loader with only a printed line.
KEYWORDS = {"hardq": "hardq", "hards": "hardd", "easy": "easy"}
QTYPES = {keyword: qtype for qtype, keyword in KEYWORDS.items()}
# split -> (config file, file-name suffix), as the official scripts' --config_train_path / --config_test_path.
SPLITS = {"train": ("config_train.json", "train"), "validation": ("config_test.json", "test")}
IMAGE_FOLDER = "images"
MAX_ID = 2**63 - 1  # torch.long


class SpaVLRLHFDataset(AbstractDataset):
    """The pairs table <-> a folder the official SPA-VL trainers read (see the module docstring).

    Args:
        path: the folder; `save()` replaces it whole.
        metadata: free-form metadata (kedro-viz layer, ...), ignored by the dataset.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    # ---- save -------------------------------------------------------------------------------------------
    def save(self, data: pd.DataFrame) -> None:
        _check(data, self._path)
        root = self._path.resolve()
        # Written beside the target and swapped in at the end: a failed save leaves the previous export.
        staging = root.with_name(root.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            written: dict[str, bytes] = {}
            for image in data["image"]:
                if image["path"] not in written:
                    target = staging / IMAGE_FOLDER / image["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(image["bytes"])
                    written[image["path"]] = image["bytes"]
            for split, (config_name, suffix) in SPLITS.items():
                rows = data[data["split"] == split]
                if rows.empty and split != "train":
                    continue
                config = {}
                for qtype, keyword in KEYWORDS.items():
                    name = f"{keyword}_{suffix}.json"
                    records = [
                        _record(row) for row in rows[rows["qtype"] == qtype].sort_values("id").itertuples(index=False)
                    ]
                    _write_json(staging / name, records)
                    config[keyword] = str(root / name)  # where it will be once swapped in
                _write_json(staging / config_name, config)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)

    # ---- load -------------------------------------------------------------------------------------------
    def load(self) -> pd.DataFrame:
        root = self._path
        if not (root / SPLITS["train"][0]).is_file():
            raise DatasetError(f"{root}: no {SPLITS['train'][0]}; is this a folder SpaVLRLHFDataset wrote?")
        rows, images = [], {}
        for split, (config_name, _) in SPLITS.items():
            config_file = root / config_name
            if not config_file.is_file():
                continue
            config = _read_json(config_file)
            if not isinstance(config, dict) or set(config) - set(QTYPES):
                raise DatasetError(
                    f"{config_file}: expected an object with keywords {sorted(QTYPES)}, got "
                    f"{sorted(config) if isinstance(config, dict) else type(config).__name__}"
                )
            for keyword, target in config.items():
                file = _locate(root, target, config_file, keyword)
                records = _read_json(file)
                if not isinstance(records, list):
                    raise DatasetError(f"{file}: expected a list of records, got {type(records).__name__}")
                for index, record in enumerate(records):
                    where = f"{file.name} record {index}"
                    if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise DatasetError(f"{where}: expected exactly the keys {list(RECORD_KEYS)}, got {keys}")
                    path = record["image"]
                    if path not in images:
                        image_file = root / IMAGE_FOLDER / path
                        if not image_file.is_file():
                            raise DatasetError(f"{where} (id {record['id']}): field 'image': no file {image_file}")
                        images[path] = image_file.read_bytes()
                    rows.append(
                        {
                            "split": split,
                            "qtype": QTYPES[keyword],
                            "id": record["id"],
                            "image": {"bytes": images[path], "path": path},
                            **{k: record[k] for k in TEXTS},
                            **dict(zip(CLASS_COLUMNS, image_classes(path))),
                        }
                    )
        pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS)
        _check(pairs, root)
        return pairs.sort_values("id").reset_index(drop=True)

    def _exists(self) -> bool:
        return (self._path / SPLITS["train"][0]).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


def _check(data: Any, where: Path) -> None:
    """Every field the official loaders rely on, named with the failing pair's id (or row) and field."""
    if not isinstance(data, pd.DataFrame):
        raise DatasetError(f"{where}: save a DataFrame of pairs, got {type(data).__name__}")
    missing = [c for c in PAIR_COLUMNS if c not in data.columns]
    if missing:
        raise DatasetError(f"{where}: pairs table is missing column(s) {missing}; it has {list(data.columns)}")
    seen_ids: dict[int, int] = {}
    image_bytes: dict[str, bytes] = {}
    for row, pair in enumerate(data[PAIR_COLUMNS].itertuples(index=False)):
        name = f"{where}: row {row}"
        if (
            not isinstance(pair.id, (int, np.integer))
            or isinstance(pair.id, (bool, np.bool_))
            or not 0 <= pair.id <= MAX_ID
        ):
            raise DatasetError(f"{name}: field 'id' must be an integer in [0, 2**63), got {pair.id!r}")
        name = f"{where}: pair id {pair.id} (row {row})"
        if pair.id in seen_ids:
            raise DatasetError(f"{name}: field 'id' repeats row {seen_ids[pair.id]}'s; ids must be unique")
        seen_ids[pair.id] = row
        if pair.split not in SPLITS:
            raise DatasetError(f"{name}: field 'split' is {pair.split!r}, not one of {list(SPLITS)}")
        if pair.qtype not in KEYWORDS:
            raise DatasetError(
                f"{name}: field 'qtype' is {pair.qtype!r}, not one of {list(SPA_QTYPES)}; "
                "the official trainers have keywords for those three only"
            )
        for field in TEXTS:
            if not isinstance(getattr(pair, field), str):
                raise DatasetError(f"{name}: field '{field}' must be text, got {type(getattr(pair, field)).__name__}")
        image = pair.image
        if not isinstance(image, dict) or not isinstance(image.get("bytes"), bytes) or not image["bytes"]:
            raise DatasetError(f"{name}: field 'image' has no bytes; expected {{'bytes': <image file>, 'path': ...}}")
        path = image.get("path")
        if not isinstance(path, str) or len(_parts(path)) != 4 or "/".join(_parts(path)) != path:
            raise DatasetError(f"{name}: field 'image' path {path!r} is not class1/class2/class3/<name>")
        if any(path_segment(unquote(p)) != p for p in _parts(path)):
            raise DatasetError(f"{name}: field 'image' path {path!r} has a part that is not a path_segment")
        labels = tuple(getattr(pair, c) for c in CLASS_COLUMNS)
        if image_classes(path) != labels:
            raise DatasetError(
                f"{name}: field 'image' path {path!r} reads back as classes {image_classes(path)}, "
                f"but the pair's class1..3 are {labels}"
            )
        if image_bytes.setdefault(path, image["bytes"]) != image["bytes"]:
            raise DatasetError(f"{name}: field 'image': two different images share the path {path!r}")


def _record(pair: Any) -> dict[str, Any]:
    return {
        "id": int(pair.id),
        "image": pair.image["path"],
        "question": pair.question,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }


def _write_json(file: Path, content: Any) -> None:
    # ASCII escapes: the official loader opens files with the platform's default encoding, which is not
    # UTF-8 everywhere; pure ASCII reads the same under any of them.
    file.write_text(json.dumps(content, indent=1, ensure_ascii=True) + "\n", encoding="ascii")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file}: not valid JSON: {exc}") from exc


def _locate(root: Path, target: Any, config_file: Path, keyword: str) -> Path:
    """This folder's file of that name first (the folder may have been moved), then the path as written."""
    if not isinstance(target, str):
        raise DatasetError(f"{config_file}: '{keyword}' must name a JSON file, got {target!r}")
    for candidate in (root / Path(target).name, Path(target)):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{config_file}: '{keyword}' names {target}, found neither there nor in {root}")
