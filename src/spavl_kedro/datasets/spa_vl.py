"""A Kedro dataset for the published SPA-VL release: import it in either published form, export it as published.

What the release looks like (sources: the dataset card and file tree of huggingface.co/datasets/sqrti/SPA-VL;
the README and data loader of github.com/EchoseChen/SPA-VL-RLHF; that repository's issues #4, #5 and #6):

- Parquet configs (card `configs:`), image as an `Image()` feature stored as a {bytes, path} struct:
    default/train         data/train-*.parquet               image, question, chosen, rejected, image_name
    validation/validation validation/validation-*.parquet    image, question, chosen, rejected, class1..3
    test/harm, test/help  test/harm-*.parquet, test/help-*   image, question, class1..3
  The hub's parquet converter (branch refs/convert/parquet) holds the same tables as
  default/train/NNNN.parquet, validation/validation/NNNN.parquet (default/validation/ in an early revision),
  test/harm/NNNN.parquet and test/help/NNNN.parquet; that layout is read too. A Hugging Face cache folder
  (datasets--sqrti--SPA-VL, with snapshots/ and refs/) resolves to the snapshot refs/main points at.
- train.zip of class1/class2/class3/N.jpg images plus training JSON files. The official trainer reads a list
  of records {"id", "image": "Representation & ToxicityHarms/Unfair/racial/170.jpg", "question", "chosen",
  "rejected"} (README, `QueryChosenRejectedResponseDataset`), from files named by a config JSON
  {"hardq": ".../hardq_train.json", "hardd": ..., "easy": ...} (data/config_train.json, `load_data`);
  the maintainers point to meta_files/prefer/{easy,hardq,hards}.json for them (issue #4), and users cannot
  find the class folders the paths need (issues #5, #6). This reader joins each record to its zip member by
  the path's last four components, so a zip with an extra top-level folder still matches.

Inferred (not seen in a primary source), so the reader is tolerant:
- the field names of meta_files/prefer/*.json: besides image/question/chosen/rejected it accepts image_path /
  image_name / image_file / img, prompt / query / instruction, chosen_response / rejected_response, LLaVA
  `conversations` (first human turn, `<image>` token removed) and LLaVA-RLHF `output_1` / `output_2` /
  `preference`; a bare file name ("170.jpg") is completed with the record's class1..3 fields when it has them;
- the value of `image_name` (and of the image's `path`) for rows imported from train.zip: the record's
  class1/class2/class3/N.jpg path. The train table has no class columns, so that path carries the labels:
  `image_classes(image_name)` gives them back. Paths this project writes spell each name with
  `path_segment`, which escapes only what no file system takes in a name; every published name has none
  of those characters, so published paths read the same either way.

Label strings are kept exactly as published, typos included ("Representation & ToxicityHarms",
"disablity discrimination", "scamns"): nothing here strips or normalises them.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset, DatasetError

from spavl_kedro.schema import CLASS_COLUMNS, TABLES

SPLITS = ("train", "validation", "test_harm", "test_help")
# The card's configs and the splits each holds (one column set per config).
CONFIGS = {"default": ("train",), "validation": ("validation",), "test": ("test_harm", "test_help")}

# Split -> (folder, file prefix) of the export, as in the published repository.
EXPORT_LAYOUT = {
    "train": ("data", "train"),
    "validation": ("validation", "validation"),
    "test_harm": ("test", "harm"),
    "test_help": ("test", "help"),
}

# Split -> globs looked for, first match wins: the published layout, then the hub converter's.
PARQUET_GLOBS = {
    "train": ("data/train-*.parquet", "default/train/*.parquet"),
    "validation": (
        "validation/validation-*.parquet",
        "validation/validation/*.parquet",
        "default/validation/*.parquet",
    ),
    "test_harm": ("test/harm-*.parquet", "test/harm/*.parquet"),
    "test_help": ("test/help-*.parquet", "test/help/*.parquet"),
}

TRAIN_ZIP = "train.zip"
# Where training JSON files are looked for: the folder itself, and where the hub keeps the preference files.
JSON_GLOBS = ("*.json", "*.jsonl", "meta_files/prefer/*.json")

IMAGE_KEYS = ("image", "image_path", "image_name", "image_file", "img", "img_path")
QUESTION_KEYS = ("question", "prompt", "query", "instruction")
CHOSEN_KEYS = ("chosen", "chosen_response", "response_chosen", "preferred")
REJECTED_KEYS = ("rejected", "rejected_response", "response_rejected", "dispreferred")

_SHOWN = 10  # missing images named in an error message; the rest are counted


def features(split: str) -> Any:
    """The `datasets.Features` of a split: `image` an Image(), every other column a string."""
    import datasets  # deferred: importing datasets costs a second or two, and only save needs it

    return datasets.Features({c: datasets.Image() if c == "image" else datasets.Value("string") for c in TABLES[split]})


def data_files(path: str | Path, config: str | None = None) -> dict[str, list[str]]:
    """The `datasets.load_dataset("parquet", data_files=...)` mapping of a parquet folder, split -> files.

    Only splits that have files are listed; split names are this project's (train, validation, test_harm,
    test_help). The splits have three column sets, the release's three configs, and one load_dataset call
    casts all its splits to one schema: load one config at a time, e.g.
    `load_dataset("parquet", data_files=data_files(path, "test"))` for test_harm + test_help.
    `config` is one of CONFIGS (default, validation, test); None lists every split.
    """
    if config is not None and config not in CONFIGS:
        raise ValueError(f"config must be one of {list(CONFIGS)} or None, not '{config}'")
    wanted = CONFIGS[config] if config is not None else SPLITS
    return {
        split: [str(f) for f in files]
        for split, files in _parquet_files(_resolve(Path(path))).items()
        if split in wanted
    }


def image_classes(image_path: str) -> tuple[str, str, str]:
    """class1, class2, class3 of a train.zip path "class1/class2/class3/N.jpg" (extra leading folders ignored),
    each `path_segment` escape undone.

    >>> image_classes("Malicious Use/Fraud or deceptive action/scamns/12.jpg")
    ('Malicious Use', 'Fraud or deceptive action', 'scamns')
    >>> image_classes("D/C%2FB/sub/1.png")
    ('D', 'C/B', 'sub')
    """
    parts = _parts(image_path)
    if len(parts) < 4:
        raise ValueError(f"image path '{image_path}' is not class1/class2/class3/N.jpg")
    return unquote(parts[-4]), unquote(parts[-3]), unquote(parts[-2])


# Characters written as %XX in a path segment: '%' itself (the escape), the separators, what Windows
# forbids in a name, and control characters. Spaces and '&' stay: the published folders have them
# ("Representation & ToxicityHarms/Unfair/racial/170.jpg").
_ESCAPED = set('%/\\<>:"|?*') | {chr(c) for c in range(32)} | {chr(127)}


def path_segment(name: str) -> str:
    """A class name or image id as one folder or file name that round-trips through `image_classes`.

    Only unsafe characters are escaped (as %XX), plus a leading or trailing dot or space, which Windows
    drops or reads as a path; every published SPA-VL name comes back unchanged.

    >>> path_segment("Representation & ToxicityHarms")
    'Representation & ToxicityHarms'
    >>> path_segment("C/B: 50%")
    'C%2FB%3A 50%25'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a class name or image id must be a non-empty string, got {name!r}")
    chars = [f"%{ord(c):02X}" if c in _ESCAPED else c for c in name]
    for end in (0, -1):
        if chars[end] in (".", " "):
            chars[end] = f"%{ord(chars[end]):02X}"
    return "".join(chars)


class SpaVLReleaseDataset(AbstractDataset):
    """The SPA-VL release in a folder <-> dict split -> DataFrame.

    Args:
        path: the folder: a download of sqrti/SPA-VL (parquet configs and/or train.zip with training JSON),
            a Hugging Face cache folder of it, or this dataset's own export.
        optional: a missing folder loads as {} instead of raising, so a catalog can declare the release
            before anyone has downloaded it.
        shard_rows: rows per exported parquet file. The release's train shards hold ~11,700 rows (~450 MB);
            10,000 keeps a shard well under the hub's 5 GB file limit and memory modest while writing.
        metadata: free-form metadata (kedro-viz layer, ...), ignored by the dataset.

    `load()` gives the splits found, each with exactly the columns of `schema.TABLES[split]`; `image` is a
    dict {"bytes": ..., "path": ...}. Train comes from the parquet when the folder has both forms, from
    train.zip + JSON otherwise. `save()` takes the same dict, plus optionally "README.md" (the dataset
    card as text), and writes the published parquet layout with Hugging Face feature metadata, replacing
    the folder's previous export.
    """

    def __init__(
        self, path: str, optional: bool = False, shard_rows: int = 10_000, metadata: dict[str, Any] | None = None
    ) -> None:
        if shard_rows < 1:
            raise DatasetError(f"SpaVLReleaseDataset({path}): shard_rows must be >= 1, got {shard_rows}")
        self._path = Path(path)
        self._optional = optional
        self._shard_rows = shard_rows
        self.metadata = metadata

    # ---- load -------------------------------------------------------------------------------------------
    def load(self) -> dict[str, pd.DataFrame]:
        if not self._path.is_dir():
            if self._optional:
                return {}
            raise DatasetError(
                f"SPA-VL release folder {self._path} does not exist: download sqrti/SPA-VL "
                f"there (parquet configs, or train.zip with the training JSON)"
            )
        root = _resolve(self._path)
        tables = {split: _read_parquet(files, split) for split, files in _parquet_files(root).items()}
        if "train" not in tables and (root / TRAIN_ZIP).is_file():
            tables["train"] = _read_train_zip(root)
        if not tables:
            looked_for = [g for globs in PARQUET_GLOBS.values() for g in globs]
            raise DatasetError(
                f"{root} holds no SPA-VL release: looked for parquet files {looked_for} and "
                f"for {TRAIN_ZIP} with training JSON ({', '.join(JSON_GLOBS)})"
            )
        return {split: tables[split] for split in SPLITS if split in tables}

    # ---- save -------------------------------------------------------------------------------------------
    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"{self._path}: save a dict split -> DataFrame, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SPLITS) - {"README.md"})
        if unknown:
            raise DatasetError(
                f"{self._path}: unknown key(s) {unknown}; expected some of {list(SPLITS)} and optionally 'README.md'"
            )
        if not any(split in data for split in SPLITS):
            raise DatasetError(f"{self._path}: nothing to save, no split among {list(SPLITS)}")
        card = data.get("README.md")
        if card is not None and not isinstance(card, str):
            raise DatasetError(f"{self._path}: 'README.md' must be the card's text, got {type(card).__name__}")
        for split in SPLITS:
            if split in data:
                missing = [c for c in TABLES[split] if c not in data[split].columns]
                if missing:
                    raise DatasetError(
                        f"{self._path}: split '{split}' is missing column(s) {missing}; "
                        f"it has {list(data[split].columns)}"
                    )

        # Written beside the target and swapped in at the end: a failed save leaves the previous export.
        staging = self._path.with_name(self._path.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            for split in SPLITS:
                if split in data:
                    self._write_split(staging, split, data[split])
            if card is not None:
                (staging / "README.md").write_text(card, encoding="utf-8")
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self._path.exists():
            shutil.rmtree(self._path)
        staging.rename(self._path)

    def _write_split(self, root: Path, split: str, df: pd.DataFrame) -> None:
        folder, prefix = EXPORT_LAYOUT[split]
        (root / folder).mkdir(exist_ok=True)
        # features(...).arrow_schema carries the "huggingface" metadata that makes load_dataset decode images.
        schema = features(split).arrow_schema
        df = df[TABLES[split]]
        shards = max(1, math.ceil(len(df) / self._shard_rows))
        for i in range(shards):
            # One shard in Arrow at a time: the train split's image bytes are never held twice over.
            part = df.iloc[i * self._shard_rows : (i + 1) * self._shard_rows]
            columns = {
                c: (
                    [_image_cell(v, split, i * self._shard_rows + k) for k, v in enumerate(part[c])]
                    if c == "image"
                    else [_text_cell(v) for v in part[c]]
                )
                for c in TABLES[split]
            }
            table = pa.Table.from_pydict(columns, schema=schema)
            pq.write_table(table, root / folder / f"{prefix}-{i:05d}-of-{shards:05d}.parquet")

    def _exists(self) -> bool:
        if not self._path.is_dir():
            return False
        root = _resolve(self._path)
        return bool(_parquet_files(root)) or (root / TRAIN_ZIP).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "optional": self._optional, "shard_rows": self._shard_rows}


# ---- folder layout --------------------------------------------------------------------------------------
def _resolve(path: Path) -> Path:
    """A Hugging Face cache folder (snapshots/ + refs/) -> the snapshot refs/main names; any other -> itself."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    if len(revisions) == 1:
        return revisions[0]
    raise DatasetError(
        f"{path}: a Hugging Face cache folder with {len(revisions)} snapshots and no usable "
        f"refs/main; point `path` at one of {[str(r) for r in revisions]}"
    )


def _parquet_files(root: Path) -> dict[str, list[Path]]:
    found = {}
    for split, globs in PARQUET_GLOBS.items():
        for pattern in globs:
            files = sorted(root.glob(pattern))
            if files:
                found[split] = files
                break
    return found


# ---- parquet --------------------------------------------------------------------------------------------
def _read_parquet(files: list[Path], split: str) -> pd.DataFrame:
    columns: dict[str, list] = {c: [] for c in TABLES[split]}
    for file in files:  # one file in Arrow at a time; its rows join plain lists, so bytes are held once
        try:
            table = pq.read_table(file)
        except Exception as exc:  # noqa: BLE001 - re-raised as the catalog's error type, naming the file
            raise DatasetError(f"{file}: cannot read it as parquet: {exc}") from exc
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DatasetError(f"{file} ({split}): missing column(s) {missing}; it has {table.column_names}")
        for column, values in columns.items():
            cells = table.column(column).to_pylist()
            start = len(values)
            values += (
                [_image_cell(v, f"{split} ({file.name})", start + i) for i, v in enumerate(cells)]
                if column == "image"
                else cells
            )
        del table
    return _frame(columns, split)


def _frame(columns: dict[str, list], split: str) -> pd.DataFrame:
    """Every table leaves through here, whichever form it came from, so both forms give identical frames:
    image an object column of {bytes, path} dicts, every other column pandas' string dtype."""
    return pd.DataFrame({c: pd.Series(columns[c], dtype=object if c == "image" else "str") for c in TABLES[split]})


# ---- train.zip + training JSON --------------------------------------------------------------------------
def _read_train_zip(root: Path) -> pd.DataFrame:
    archive = root / TRAIN_ZIP
    records = _training_records(root)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive}: cannot open it as a zip file: {exc}") from exc
    with zf:
        # Keyed by the last four path components (class1/class2/class3/N.jpg): a zip made from a parent
        # folder (train/class1/...) still matches the JSON's paths.
        members = {_key(info.filename): info.filename for info in zf.infolist() if not info.is_dir()}
        rows, missing = [], []
        for where, index, record in records:
            image_path = _image_path(record, where, index)
            if _key(image_path) not in members:
                missing.append(f"record {index} of {where}: '{image_path}'")
            rows.append((image_path, *_texts(record, where, index)))
        if missing:
            more = f"; ... and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
            shown = "; ".join(missing[:_SHOWN]) + more
            raise DatasetError(
                f"{archive}: {len(missing)} of {len(rows)} training record(s) name an image that "
                f"is not in the zip: {shown}"
            )
        cache: dict[str, bytes] = {}  # the easy / hardq / hards records share images: read each member once
        images = []
        for image_path, *_ in rows:
            member = members[_key(image_path)]
            if member not in cache:
                cache[member] = zf.read(member)
            images.append({"bytes": cache[member], "path": image_path})
    columns = {
        "image": images,
        "question": [r[1] for r in rows],
        "chosen": [r[2] for r in rows],
        "rejected": [r[3] for r in rows],
        "image_name": [r[0] for r in rows],
    }
    return _frame(columns, "train")


def _training_records(root: Path) -> list[tuple[str, int, dict]]:
    """(file name, index in that file, record) of every training record, in file order.

    A config JSON (keyword -> JSON path, as the official data/config_train.json) names the files to read;
    without one, every JSON file holding a list of records is read, in name order.
    """
    files = sorted({f for pattern in JSON_GLOBS for f in root.glob(pattern) if f.is_file()})
    contents = {f: _read_json(f) for f in files}
    configs = [
        f
        for f, c in contents.items()
        if isinstance(c, dict) and c and all(isinstance(v, str) and v.endswith((".json", ".jsonl")) for v in c.values())
    ]
    if configs:
        chosen = []
        for config in configs:
            for keyword, target in contents[config].items():
                located = _locate(root, target)
                if located is None:
                    raise DatasetError(
                        f"{config}: '{keyword}' names {target}, found neither there nor as {root / Path(target).name}"
                    )
                chosen.append(located)
        files = list(dict.fromkeys(chosen))
        contents.update({f: _read_json(f) for f in files if f not in contents})
    records = []
    for f in files:
        content = contents[f]
        if isinstance(content, dict) and isinstance(content.get("data"), list):
            content = content["data"]
        if isinstance(content, list):
            records += [
                (str(f.relative_to(root)) if f.is_relative_to(root) else str(f), i, r) for i, r in enumerate(content)
            ]
    if not records:
        raise DatasetError(
            f"{root / TRAIN_ZIP} found, but no training JSON beside it: looked for "
            f"{', '.join(JSON_GLOBS)} holding a list of records with image, question, chosen, "
            f"rejected (or a config JSON naming such files)"
        )
    for where, i, record in records:
        if not isinstance(record, dict):
            raise DatasetError(f"record {i} of {where}: expected an object, got {type(record).__name__}")
    return records


def _read_json(file: Path) -> Any:
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file}: not valid JSON: {exc}") from exc


def _locate(root: Path, target: str) -> Path | None:
    """A config entry as written, relative to the folder, or by file name in the folder (the official
    config ships placeholders like path/to/your/directory/easy_train.json)."""
    for candidate in (Path(target), root / target, root / Path(target).name):
        if candidate.is_file():
            return candidate
    return None


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    return None


def _value(turn: Any) -> Any:
    """A response as text: LLaVA turns are {"from": ..., "value": ...}; chat turns {"role", "content"}."""
    if isinstance(turn, dict):
        return _first(turn, ("value", "content", "text"))
    return turn


def _image_path(record: dict, where: str, index: int) -> str:
    image = _first(record, IMAGE_KEYS)
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(
            f"record {index} of {where}: no image path (looked for {list(IMAGE_KEYS)}); it has {sorted(record)}"
        )
    parts = _parts(image)
    if len(parts) < 4 and all(isinstance(record.get(c), str) for c in CLASS_COLUMNS):
        parts = [record[c] for c in CLASS_COLUMNS] + parts[-1:]  # a bare "170.jpg" plus class fields
    if len(parts) < 4:
        raise DatasetError(
            f"record {index} of {where}: image path '{image}' is not class1/class2/class3/N.jpg "
            f"and the record has no class1..class3 fields to complete it"
        )
    return "/".join(parts[-4:])


def _texts(record: dict, where: str, index: int) -> tuple[str, str, str]:
    question = _first(record, QUESTION_KEYS)
    if question is None and isinstance(record.get("conversations"), list):
        human = [t for t in record["conversations"] if isinstance(t, dict) and t.get("from") in ("human", "user")]
        if human:
            question = str(_value(human[0])).replace("<image>", "").strip()
    chosen, rejected = _value(_first(record, CHOSEN_KEYS)), _value(_first(record, REJECTED_KEYS))
    if chosen is None and rejected is None and record.get("preference") in (1, 2, "1", "2"):
        first, second = _value(record.get("output_1")), _value(record.get("output_2"))
        chosen, rejected = (first, second) if int(record["preference"]) == 1 else (second, first)
    named = {"question": question, "chosen": chosen, "rejected": rejected}
    absent = [name for name, text in named.items() if not isinstance(text, str)]
    if absent:
        raise DatasetError(
            f"record {index} of {where}: no {absent} (accepted names: question {list(QUESTION_KEYS)} "
            f"or conversations; chosen {list(CHOSEN_KEYS)}; rejected {list(REJECTED_KEYS)}; or "
            f"output_1/output_2/preference); it has {sorted(record)}"
        )
    return question, chosen, rejected


def _parts(path: str) -> list[str]:
    return [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("", ".", "/")]


def _key(path: str) -> str:
    return "/".join(_parts(path)[-4:])


# ---- cells ----------------------------------------------------------------------------------------------
def _image_cell(value: Any, split: str, row: int) -> dict:
    if isinstance(value, dict) and "bytes" in value:
        return {"bytes": value["bytes"], "path": value.get("path")}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    raise DatasetError(
        f"split '{split}' row {row}: image must be a dict {{bytes, path}} or bytes, got {type(value).__name__}"
    )


def _text_cell(value: Any) -> str | None:
    missing = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    return None if missing else str(value)
