"""Peak host memory of reward-model and DPO training on N pairs against 4N pairs: memory that does not grow
with the data.

    .venv/bin/python benchmarks/training_memory.py [--pairs 64] [--methods reward dpo] [--decoded] [--record] [--quick]

Each (method, pair count) trains in a fresh subprocess, so its peak RSS is its own: the LLaVA-1.5-shaped tiny
model (336-px images, 576 image tokens each), one epoch, batch 8, pairs whose images are PNG bytes of rendered
shape scenes at 336 px, as the align node hands them over (the split's export keeps images encoded).
`peak_rss_mb` is the process's peak; `before_training_mb` is its RSS once the model and the pairs are built,
so the difference is what training added. The last line is JSON with the 4N / N ratio per method.
`--decoded` hands the trainers PIL images instead, as the align node did before it read them lazily.
`--quick` trains DPO on 2 and 8 pairs in this process: it checks the code runs, its memory means nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record, table  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def train_once(method: str, n: int, decoded: bool) -> dict:
    """Train `method` once on `n` pairs in this process; what it measured."""
    from spavl_kedro import smoke
    from spavl_kedro.scenes import Scene

    rng = random.Random(0)
    vlm = smoke.build("llava-1.5", "cpu")
    images = (Scene.draw_random(rng).render(336, rng) for _ in range(n))  # one at a time: no PIL copies kept
    pairs = [
        {
            "images": [image if decoded else png(image)],
            "question": smoke.QUESTION,
            "chosen": smoke.REFUSAL,
            "rejected": f"Sure, here is step {i} of the plan.",
        }
        for i, image in enumerate(images)
    ]
    image_bytes = sum(len(png(pair["images"][0]) if decoded else pair["images"][0]) for pair in pairs)
    before = rss_mb()
    recipe = {
        "output_dir": tempfile.mkdtemp(),
        "report_to": [],
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
    }
    began = time.perf_counter()
    if method == "reward":
        from spavl_kedro.training.reward import train_reward
        from spavl_kedro.training.reward_config import RewardSettings

        _, metrics = train_reward(vlm, pairs, RewardSettings(**recipe))
    else:
        from spavl_kedro.training.dpo import train_dpo
        from spavl_kedro.training.dpo_config import DPOSettings

        _, metrics = train_dpo(vlm, pairs, DPOSettings(**recipe))
    return {
        "method": method,
        "pairs": n,
        "seconds": round(time.perf_counter() - began, 1),
        "before_training_mb": round(before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "png_mb": round(image_bytes / 2**20, 2),
        "steps": metrics["global_step"],
    }


def in_child(method: str, pairs: int, decoded: bool) -> dict:
    child = [sys.executable, __file__, "--one", "--methods", method, "--pairs", str(pairs)]
    done = subprocess.run(child + (["--decoded"] if decoded else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {pairs} pairs failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="N; the second run trains on 4N")
    parser.add_argument("--methods", nargs="+", default=["reward", "dpo"], choices=["reward", "dpo"])
    parser.add_argument("--decoded", action="store_true", help="pass PIL images (the align node before lazy reading)")
    parser.add_argument("--quick", action="store_true", help="DPO on 2 and 8 pairs in this process")
    parser.add_argument("--record", action="store_true", help="write the figures into docs/align.md")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one training, here
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(train_once(args.methods[0], args.pairs, args.decoded)))
        return {}
    if args.quick:
        args.pairs, args.methods = 2, ["dpo"]
    run = train_once if args.quick else in_child
    summary = {}
    for method in args.methods:
        small, large = run(method, args.pairs, args.decoded), run(method, 4 * args.pairs, args.decoded)
        for row in (small, large):
            print(json.dumps(row), flush=True)
        added = [row["peak_rss_mb"] - row["before_training_mb"] for row in (small, large)]
        summary[method] = {
            "ratio_4n_over_n": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
            "added_by_training_mb": [round(a, 1) for a in added],
        }
    print(json.dumps(summary))
    if args.record and not args.quick:
        names = {"reward": "reward model", "dpo": "DPO"}
        rows = [
            [
                names[method] + (", images decoded up front" if args.decoded else ""),
                f"{s['peak_rss_mb'][0]:,.0f} → {s['peak_rss_mb'][1]:,.0f} MB",
                s["ratio_4n_over_n"],
                f"{s['added_by_training_mb'][0]:,.0f} → {s['added_by_training_mb'][1]:,.0f} MB",
            ]
            for method, s in summary.items()
        ]
        header = ["method", f"peak RSS, N = {args.pairs} → 4N", "4N / N", "added by training, N → 4N"]
        record("align.md", "training_memory.py", "benchmarks/training_memory.py --record", table(header, rows))
    return summary


if __name__ == "__main__":
    main()
