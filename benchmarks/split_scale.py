"""How long split + export take, and how much memory they need, at SPA-VL's size.

    .venv/bin/python benchmarks/split_scale.py [--pairs 100788] [--image-side 16] [--out DIR]

Builds a synthetic dataset shaped like SPA-VL's (53 subcategories, three questions per image, one
preference per question, four responders; each image a small distinct PNG), then runs the split node,
the dataset card and the export to the published parquet layout, as the split pipeline does. Peak memory
is the process's maximum resident set (ru_maxrss), building the inputs included.

The last line printed is JSON: {"pairs", "seconds" (split + card + export), "peak_rss_mb", ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import tempfile
import time

import pandas as pd
from PIL import Image

from spavl_kedro.datasets import SpaVLReleaseDataset
from spavl_kedro.pipelines.split.nodes import split_dataset
from spavl_kedro.pipelines.split.release import export_release, write_dataset_card
from spavl_kedro.schema import TABLES

SUBCATEGORIES = 53
RESPONDERS = ["r0", "r1", "r2", "r3"]
JUDGE = {"judges": [{"name": "keyword", "kind": "keyword"}], "primary": "keyword"}


def synthetic(pairs: int, side: int) -> dict[str, pd.DataFrame]:
    n_images = -(-pairs // 3)
    image_rows, question_rows, pref_rows = [], [], []
    for n in range(n_images):
        sub = f"sub{n % SUBCATEGORIES:02d}"
        image_id = f"{sub}-{n:06d}"
        out = io.BytesIO()  # distinct pixels per image: colour from the index
        Image.new("RGB", (side, side), (n % 256, n // 256 % 256, n // 65536 % 256)).save(out, "PNG")
        image_rows.append(
            {"image_id": image_id, "class1": f"d{n % 6}", "class2": f"c{n % 13}", "class3": sub, "png": out.getvalue()}
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
                    "kept": True,
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
                    "judge": "keyword",
                    "reason": "harmlessness",
                    "order_consistent": True,
                }
            )
    verdicts = pd.DataFrame(
        [
            {"response_id": f"v{k}:{r}", "judge": "keyword", "safe": k <= i, "category": "", "score": None, "raw": ""}
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100_788)
    parser.add_argument("--image-side", type=int, default=16)
    parser.add_argument("--out", default=None, help="export folder (default: a temporary one)")
    args = parser.parse_args()

    began = time.perf_counter()
    world = synthetic(args.pairs, args.image_side)
    built = time.perf_counter() - began
    # SPA-VL's published proportions: 5 + 5 test questions per subcategory, 7,000 validation pairs
    params = {
        "seed": 0,
        "test_harm_per_subcategory": 5,
        "test_help_per_subcategory": 5,
        "validation_size": min(7000, max(1, args.pairs // 14)),
    }
    with tempfile.TemporaryDirectory(prefix="split-scale-") as scratch:
        start = time.perf_counter()
        train, validation, harm, help_, _, provenance, _ = split_dataset(
            world["preferences"],
            world["questions"],
            world["images"],
            world["mis_cot"],
            world["verdicts"],
            params,
            JUDGE,
        )
        split_s = time.perf_counter() - start
        card = write_dataset_card(train, validation, harm, help_, provenance, params, JUDGE)
        SpaVLReleaseDataset(path=args.out or f"{scratch}/spa_vl").save(
            export_release(train, validation, harm, help_, card)
        )
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "pairs": args.pairs,
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak_mb),
                "split_seconds": round(split_s, 2),
                "build_inputs_seconds": round(built, 2),
                "train": len(train),
                "validation": len(validation),
                "test_harm": len(harm),
                "test_help": len(help_),
            }
        )
    )


if __name__ == "__main__":
    main()
