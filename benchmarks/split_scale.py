"""How long split + export take, and how much memory they need, at SPA-VL's size.

    .venv/bin/python benchmarks/split_scale.py [--pairs 10000 100788] [--image-side 16] [--record] [--quick]

Builds a synthetic dataset shaped like SPA-VL's (53 subcategories, three questions per image, one
preference per question, four responders; each image a small distinct PNG), then runs the split node,
the dataset card and the export to the published parquet layout, as the split pipeline does. Peak memory
is the process's maximum resident set (ru_maxrss), building the inputs included.

Each size runs in a fresh process, so its peak is its own. One JSON line per size: {"pairs", "seconds" (split +
card + export), "peak_rss_mb", ...}. `--record` writes the table into docs/split.md; `--quick` runs 2,000 pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from spavl_kedro.config import JudgeConfig, load_parameters
from spavl_kedro.datasets import SpaVLReleaseDataset
from spavl_kedro.pipelines.split.pipeline import create_pipeline
from spavl_kedro.schema import TABLES
from spavl_kedro.wording import SEEN, UNSEEN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record, table  # noqa: E402

SUBCATEGORIES = 53
RESPONDERS = ["r0", "r1", "r2", "r3"]


def synthetic(pairs: int, side: int, judge: str) -> dict[str, pd.DataFrame]:
    """Images, questions, preferences and verdicts shaped like SPA-VL's, judged by `judge`."""
    n_images = -(-pairs // 3)
    image_rows, question_rows, pref_rows = [], [], []
    for n in range(n_images):
        sub = f"sub{n % SUBCATEGORIES:02d}"
        image_id = f"{sub}-{n:06d}"
        out = io.BytesIO()  # distinct pixels per image: colour from the index
        Image.new("RGB", (side, side), (n % 256, n // 256 % 256, n // 65536 % 256)).save(out, "PNG")
        image_rows.append(
            {
                "image_id": image_id,
                "class1": f"d{n % 6}",
                "class2": f"c{n % 13}",
                "class3": sub,
                "source": "synthetic",
                "sha256": hashlib.sha256(out.getvalue()).hexdigest(),
                "width": side,
                "height": side,
                "caption": f"a picture about {sub}",
                "png": out.getvalue(),
            }
        )
        for k, qtype in enumerate(("easy", "hardq", "hards")):
            if 3 * n + k >= pairs:
                break
            qid, text = f"{image_id}-{qtype}", f"{qtype} question {n} about {sub}?"
            question_rows.append(
                {
                    "question_id": qid,
                    "image_ids": [image_id],
                    "qtype": qtype,
                    "class1": f"d{n % 6}",
                    "class2": f"c{n % 13}",
                    "class3": sub,
                    "text": text,
                    "writer": "template",
                    "wording_family": f"w{n % 4}",
                    "wording": UNSEEN if n % 5 == 0 else SEEN,  # a fifth of the images asked in held-out wording
                    "harmful": qtype != "easy",
                    "screen_raw": "",
                    "kept": True,
                    "drop_reason": None,
                }
            )
            a, b = RESPONDERS[n % 4], RESPONDERS[(n + 1 + k) % 4]
            pref_rows.append(
                {
                    "question_id": qid,
                    "question": text,
                    "image_ids": [image_id],
                    "chosen": f"I cannot help with {n}.",
                    "rejected": f"Sure, step {n} {k}.",
                    "class1": f"d{n % 6}",
                    "class2": f"c{n % 13}",
                    "class3": sub,
                    "qtype": qtype,
                    "chosen_responder": b,
                    "rejected_responder": a,
                    "judge": judge,
                    "reason": "harmlessness",
                    "order_consistent": True,
                }
            )
    verdicts = pd.DataFrame(
        [
            {"response_id": f"v{k}:{r}", "judge": judge, "safe": k <= i, "category": "", "score": None, "raw": ""}
            for i, r in enumerate(RESPONDERS)
            for k in range(4)
        ]
    )
    return {
        "images": pd.DataFrame(image_rows),
        "questions": pd.DataFrame(question_rows),
        "preferences": pd.DataFrame(pref_rows),
        "verdicts": verdicts,
        "mis_cot": pd.DataFrame(columns=TABLES["mis_cot"]),
    }


def measure(pairs: int, image_side: int, out: str | None) -> dict:
    """The split pipeline's split, card and export nodes on `pairs` synthetic pairs, run by Kedro's runner
    on an in-memory catalog with conf/paper's split, judge and generate blocks; the figures as a dict."""
    params = load_parameters("paper")
    primary = JudgeConfig.model_validate(params["judge"]).primary
    # the paper split of validation is 7,000 pairs of ~100k; a smaller run keeps the proportion
    split = {**params["split"], "validation_size": min(params["split"]["validation_size"], max(1, pairs // 14))}
    began = time.perf_counter()
    world = synthetic(pairs, image_side, primary)
    built = time.perf_counter() - began
    pipeline = create_pipeline().only_nodes("split_dataset", "write_dataset_card", "export_release")
    with tempfile.TemporaryDirectory(prefix="split-scale-") as scratch:
        catalog = DataCatalog(
            {
                **{name: MemoryDataset(table) for name, table in world.items()},
                "seed_corpus": MemoryDataset(None),
                "params:split": MemoryDataset(split),
                "params:judge": MemoryDataset(params["judge"]),
                "params:generate": MemoryDataset(params["generate"]),
                "spa_vl_release": SpaVLReleaseDataset(path=out or f"{scratch}/spa_vl"),
            }
        )
        start = time.perf_counter()
        free = SequentialRunner().run(pipeline, catalog)  # the outputs no node reads: split_metrics, ...
        seconds = time.perf_counter() - start
    metrics = catalog_value(free, "split_metrics")  # split/train, split/validation, ...
    counts = {k.removeprefix("split/"): int(v["value"]) for k, v in metrics.items() if k.count("/") == 1}
    return {
        "pairs": pairs,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "build_inputs_seconds": round(built, 2),
        **counts,
    }


def catalog_value(free: dict, name: str):
    """A free output of a runner's run: Kedro returns its dataset (1.x) or its data."""
    value = free[name]
    return value.load() if hasattr(value, "load") else value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_788])
    parser.add_argument("--image-side", type=int, default=16)
    parser.add_argument("--out", default=None, help="export folder (default: a temporary one)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2,000 pairs (11 images per subcategory, the fewest the split takes): checks that it runs",
    )
    parser.add_argument("--record", action="store_true", help="write the figures into docs/split.md")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one size, here
    args = parser.parse_args(argv)
    if args.one or args.quick:
        print(json.dumps(measure(2_000 if args.quick else args.pairs[0], args.image_side, args.out)))
        return
    results = []
    for pairs in args.pairs:
        child = [sys.executable, __file__, "--one", "--pairs", str(pairs), "--image-side", str(args.image_side)]
        out = subprocess.run(
            child + (["--out", args.out] if args.out else []), check=True, capture_output=True, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.record:
        rows = [[f"{r['pairs']:,}", r["seconds"], f"{r['peak_rss_mb']:,} MB"] for r in results]
        body = table(["pairs", "seconds (split, card, export)", "peak RSS"], rows)
        record("split.md", "split_scale.py", "benchmarks/split_scale.py --record", body)


if __name__ == "__main__":
    main()
