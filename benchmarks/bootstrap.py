"""Time one tiny-LLaVA bootstrap (the run's dominant cost) at 1 and 2 torch threads.

    .venv/bin/python benchmarks/bootstrap.py [--examples 424] [--epochs 6]

Each thread count runs in a fresh subprocess (torch fixes its pool at start-up). The last line printed is
JSON: {"examples": ..., "epochs": ..., "seconds_1_thread": ..., "seconds_2_threads": ...}.
Run it on a quiet machine: with another busy process on the second core, 2 threads collapse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import random, sys, time
from PIL import Image
from spavl_kedro.backends import tiny
n, epochs = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
texts = ["I'm sorry, but I cannot help with that request.", "Sure, here are the steps: first, [step withheld]."]
cfg = tiny.TinyModelConfig()
processor = tiny.build_processor(texts * 50, cfg)
examples = [tiny.SeedExample.harmful_request([Image.new("RGB", (96, 96), (rng.randrange(256), 80, 80))],
                                             f"Question {i} about the keyword?", texts[0], texts[1]) for i in range(n)]
began = time.perf_counter()
tiny.train_tiny_vlm(processor, examples, tiny.Behaviour(refusal_rate=0.3), cfg, tiny.BootstrapConfig(epochs=epochs), seed=0)
print(time.perf_counter() - began)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=424, help="seed examples (default run: 212 images x 2)")
    parser.add_argument("--epochs", type=int, default=6, help="bootstrap epochs (default run: 6)")
    args = parser.parse_args()
    result = {"examples": args.examples, "epochs": args.epochs}
    for threads, key in ((1, "seconds_1_thread"), (2, "seconds_2_threads")):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.examples), str(args.epochs)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result[key] = round(float(out.strip().splitlines()[-1]), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
