"""Peak host memory of reward-model and DPO training on N pairs against 4N pairs (issue: memory that does not
grow with the data).

    .venv/bin/python benchmarks/training_memory.py [--pairs 64] [--methods reward dpo] [--decoded]

Each (method, pair count) trains in a fresh subprocess, so its peak RSS is its own: the LLaVA-1.5-shaped tiny
model (336-px images, 576 image tokens each), one epoch, batch 8, pairs whose images are PNG bytes of rendered
shape scenes at 336 px, as the align node hands them over (the split's export keeps images encoded).
`peak_rss_mb` is the process's peak; `before_training_mb` is its RSS once the model and the pairs are built,
so the difference is what training added. The last line is JSON with the 4N / N ratio per method.
`--decoded` hands the trainers PIL images instead, as the align node did before they read lazily: run it
on an older commit to see what the change bought.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import io, json, random, resource, sys, tempfile, time
from spavl_kedro import smoke
from spavl_kedro.scenes import Scene
method, n, decoded = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "decoded"
rng = random.Random(0)
def png(image):
    buffer = io.BytesIO(); image.save(buffer, format="PNG"); return buffer.getvalue()
vlm = smoke.build("cpu")
images = (Scene.draw_random(rng).render(336, rng) for _ in range(n))  # one at a time: no PIL copies kept
pairs = [{"images": [image if decoded else png(image)], "question": smoke.QUESTION,
          "chosen": smoke.REFUSAL, "rejected": f"Sure, here is step {i} of the plan."} for i, image in enumerate(images)]
image_bytes = sum(len(png(pair["images"][0]) if decoded else pair["images"][0]) for pair in pairs)
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
before = rss_mb()
scratch = tempfile.mkdtemp()
recipe = {"output_dir": scratch, "report_to": [], "num_train_epochs": 1, "per_device_train_batch_size": 8}
began = time.perf_counter()
if method == "reward":
    from spavl_kedro.backends.reward import RewardSettings, train_reward
    _, metrics = train_reward(vlm, pairs, RewardSettings(**recipe))
else:
    from spavl_kedro.backends.dpo import DPOSettings, train_dpo
    _, metrics = train_dpo(vlm, pairs, DPOSettings(**recipe))
print(json.dumps({"method": method, "pairs": n, "seconds": round(time.perf_counter() - began, 1),
                  "before_training_mb": round(before, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "png_mb": round(image_bytes / 2**20, 2),
                  "steps": metrics["global_step"]}))
"""


def measure(method: str, pairs: int, decoded: bool) -> dict:
    images = "decoded" if decoded else "encoded"
    done = subprocess.run([sys.executable, "-c", CHILD, method, str(pairs), images], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {pairs} pairs failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="N; the second run trains on 4N")
    parser.add_argument("--methods", nargs="+", default=["reward", "dpo"], choices=["reward", "dpo"])
    parser.add_argument("--decoded", action="store_true", help="pass PIL images (the align node before lazy reading)")
    args = parser.parse_args()
    summary = {}
    for method in args.methods:
        small, large = measure(method, args.pairs, args.decoded), measure(method, 4 * args.pairs, args.decoded)
        for row in (small, large):
            print(json.dumps(row), flush=True)
        added = [row["peak_rss_mb"] - row["before_training_mb"] for row in (small, large)]
        summary[method] = {
            "ratio_4n_over_n": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
            "added_by_training_mb": [round(a, 1) for a in added],
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
