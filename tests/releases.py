"""Miniature SPA-VL releases in the published parquet layout, for the tests that read one (the dataset, the
official route, the README's official-data command)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spavl_kedro.schema import TABLES

# Published spellings, typos included.
BULLY = ("Representation & ToxicityHarms", "Toxic", "bully")
DISABILITY = ("Representation & ToxicityHarms", "Unfair", "disablity discrimination")
PHYSICAL = ("Human Autonomy & IntegrityHarms", "Persuasion and manipulation", "physical harm")
SCAM = ("Malicious Use", "Fraud or deceptive action", "scamns")
LABELS = [BULLY, DISABILITY, PHYSICAL, SCAM]


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_hf_parquet(file: Path, columns: dict[str, list]) -> None:
    """A parquet file as the hub's uploader writes it: image a {bytes, path} struct, features in the metadata."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [(c, image if c == "image" else pa.string()) for c in columns]
    hf = {
        "info": {
            "features": {
                c: {"_type": "Image"} if c == "image" else {"dtype": "string", "_type": "Value"} for c in columns
            }
        }
    }
    schema = pa.schema(fields, metadata={"huggingface": json.dumps(hf)})
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), file)


def release_rows(split: str, n: int, seed: int) -> dict[str, list]:
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    columns = {
        "image": [
            {"bytes": image_bytes(seed + i, "PNG" if i % 2 else "JPEG"), "path": f"{seed + i}.jpg"} for i in range(n)
        ],
        "question": [f"{split} question {i}?" for i in range(n)],
        "chosen": [f"{split} safe answer {i}" for i in range(n)],
        "rejected": [f"{split} unsafe answer {i}" for i in range(n)],
        "image_name": ["/".join(labels[i]) + f"/{i}.jpg" for i in range(n)],
        "class1": [c[0] for c in labels],
        "class2": [c[1] for c in labels],
        "class3": [c[2] for c in labels],
    }
    return {c: columns[c] for c in TABLES[split]}


def write_parquet_release(root: Path) -> dict[str, dict[str, list]]:
    """The main-branch layout under `root`: data/train-*, validation/validation-*, test/harm-*, test/help-*;
    the rows written, by split."""
    rows = {
        "train": release_rows("train", 5, 0),
        "validation": release_rows("validation", 4, 100),
        "test_harm": release_rows("test_harm", 4, 200),
        "test_help": release_rows("test_help", 4, 300),
    }
    train = rows["train"]
    write_hf_parquet(root / "data/train-00000-of-00002.parquet", {c: v[:3] for c, v in train.items()})
    write_hf_parquet(root / "data/train-00001-of-00002.parquet", {c: v[3:] for c, v in train.items()})
    write_hf_parquet(root / "validation/validation-00000-of-00001.parquet", rows["validation"])
    write_hf_parquet(root / "test/harm-00000-of-00001.parquet", rows["test_harm"])
    write_hf_parquet(root / "test/help-00000-of-00001.parquet", rows["test_help"])
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# SPA-VL\n")
    return rows
