"""The seed rules of `spavl_kedro.seeding`: named data streams, and the offsets the sampling streams use."""

from __future__ import annotations

import os
import subprocess
import sys

from spavl_kedro.seeding import (
    SEED_RANGE,
    derive_seed,
    eval_answer_seed,
    model_seed,
    offset_seed,
    response_seed,
    stream,
)


def test_a_named_stream_depends_on_its_path_only():
    draws = lambda *path: [stream(*path).random() for _ in range(3)]  # noqa: E731
    assert draws(7, "seed-scene", 12) == draws(7, "seed-scene", 12)  # the same path: the same stream
    distinct = {tuple(draws(seed, name, k)) for seed in (7, 8) for name in ("seed-scene", "val") for k in (12, 13)}
    assert len(distinct) == 8  # any part of the path changed: another stream
    seeds = {derive_seed(seed, "val", k) for seed in range(3) for k in range(300)}
    assert len(seeds) == 900 and all(0 <= s < SEED_RANGE for s in seeds)


def test_seeds_do_not_depend_on_the_process_or_its_hash_seed():
    """A run's seeds are the same in any process and under any PYTHONHASHSEED: the published figures
    (docs/results.md) can be reproduced. The pinned values are the ones they were measured with."""
    code = (
        "from spavl_kedro.seeding import *; print(stream(7, 'seed-scene', 12).random(), derive_seed(7, 'val', 2), "
        "eval_answer_seed(2, shard=4, decoding='sampled', sample=1), response_seed(0, responder=3, shard=5), "
        "model_seed(0, 'responder', 0), model_seed(0, 'guard', 1), sibling_seed(9, 2))"
    )
    printed = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
        ).stdout
        for hash_seed in ("0", "1", "random")
    }
    assert len(printed) == 1
    values = printed.pop().split()
    assert values[2:] == ["2004050", "30026", "101", "614", "11"]


def test_sampling_units_of_one_run_do_not_collide():
    # every eval shard x lane and every responder x shard of a run at paper scale (~850 shards of 128)
    answers = {
        eval_answer_seed(0, shard, decoding, sample)
        for shard in range(900)
        for decoding, sample in (("greedy", 0), ("sampled", 0), ("sampled", 1))
    }
    responses = {response_seed(0, responder, shard) for responder in range(12) for shard in range(900)}
    assert len(answers) == 900 * 3 and len(responses) == 12 * 900
    assert max(answers | responses) < offset_seed(1, 0)  # seed 0's units stay below seed 1's
    models = {model_seed(0, family, n) for family in ("responder", "guard") for n in range(12)}
    assert len(models) == 24
