"""Time one tiny-LLaVA bootstrap (the run's dominant cost) at 1 and 2 torch threads.

    .venv/bin/python benchmarks/bootstrap.py [--examples 424] [--epochs 6] [--record] [--quick]

Each thread count runs in a fresh subprocess (torch fixes its pool at start-up). The last line printed is
JSON: {"examples": ..., "epochs": ..., "seconds_1_thread": ..., "seconds_2_threads": ...}.
Run it on a quiet machine: with another busy process on the second core, 2 threads collapse. `--quick`
bootstraps 16 examples for one epoch in this process, on each thread count in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record, table  # noqa: E402


def bootstrap_seconds(examples: int, epochs: int) -> float:
    """Seconds of one bootstrap of a tiny LLaVA at the default sizes on `examples` harmful requests."""
    from PIL import Image

    from spavl_kedro.models import tiny
    from spavl_kedro.models.specs import Behaviour, BootstrapConfig, TinyModelConfig

    rng = random.Random(0)
    texts = ["I'm sorry, but I cannot help with that request.", "Sure, here are the steps: first, [step withheld]."]
    cfg = TinyModelConfig()
    processor = tiny.build_processor(texts * 50, cfg)
    seeds = [
        tiny.SeedExample.harmful_request(
            [Image.new("RGB", (96, 96), (rng.randrange(256), 80, 80))], f"Question {i} about the keyword?", *texts
        )
        for i in range(examples)
    ]
    began = time.perf_counter()
    tiny.train_tiny_vlm(processor, seeds, Behaviour(refusal_rate=0.3), cfg, BootstrapConfig(epochs=epochs), seed=0)
    return time.perf_counter() - began


def in_child(examples: int, epochs: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    child = [sys.executable, __file__, "--one", "--examples", str(examples), "--epochs", str(epochs)]
    out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def in_process(examples: int, epochs: int, threads: int) -> float:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return bootstrap_seconds(examples, epochs)
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=424, help="seed examples (default run: 212 images x 2)")
    parser.add_argument("--epochs", type=int, default=6, help="bootstrap epochs (default run: 6)")
    parser.add_argument("--quick", action="store_true", help="16 examples, one epoch, in this process")
    parser.add_argument("--record", action="store_true", help="write the figures into docs/compute_plan.md")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one bootstrap, here
    args = parser.parse_args(argv)
    if args.one:
        print(bootstrap_seconds(args.examples, args.epochs))
        return {}
    if args.quick:
        args.examples, args.epochs = 16, 1
    run = in_process if args.quick else in_child
    result = {"examples": args.examples, "epochs": args.epochs}
    for threads, key in ((1, "seconds_1_thread"), (2, "seconds_2_threads")):
        result[key] = round(run(args.examples, args.epochs, threads), 1)
    print(json.dumps(result))
    if args.record and not args.quick:
        rows = [
            [f"{args.examples} examples, {args.epochs} epochs", result["seconds_1_thread"], result["seconds_2_threads"]]
        ]
        body = table(["tiny bootstrap", "seconds, 1 thread", "seconds, 2 threads"], rows)
        record("compute_plan.md", "bootstrap.py", "benchmarks/bootstrap.py --record", body)
    return result


if __name__ == "__main__":
    main()
