"""The seed rules of `spavl_kedro.seeding`: named data streams, and the offsets the sampling streams use."""

from __future__ import annotations

import random

from spavl_kedro.seeding import (
    SEED_RANGE,
    derive_seed,
    eval_answer_seed,
    model_seed,
    offset_seed,
    response_seed,
    sibling_seed,
    stream,
)


def test_a_named_stream_is_its_path_and_nothing_else():
    assert stream(7, "seed-scene", 12).random() == random.Random("7:seed-scene:12").random()
    assert stream(7, "seed-scene", 12).random() != stream(7, "seed-scene", 13).random()
    assert derive_seed(7, "val", 2) == random.Random("7:val:2").randrange(2**31)
    seeds = {derive_seed(seed, "val", k) for seed in range(3) for k in range(300)}
    assert len(seeds) == 900 and all(0 <= s < SEED_RANGE for s in seeds)


def test_sampling_offsets_keep_the_values_the_published_figures_used():
    # the arithmetic docs/results.md was measured with, spelled out once: a change here moves every figure
    assert offset_seed(5, 3) == 5 * 1_000_003 + 3
    assert eval_answer_seed(2, shard=4, decoding="greedy", sample=0) == 2 * 1_000_003 + 4 * 1_009
    assert eval_answer_seed(2, shard=4, decoding="sampled", sample=1) == 2 * 1_000_003 + 4 * 1_009 + 1 + 7
    assert response_seed(0, responder=3, shard=5) == 3 * 10_007 + 5
    assert model_seed(0, "responder", 0) == 101 and model_seed(0, "guard", 1) == 614
    assert sibling_seed(9, 2) == 11


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
