"""The seed-derivation rule (`spavl_kedro.seeding`): named streams, stable and independent."""
from __future__ import annotations

import random

from spavl_kedro.seeding import SEED_RANGE, derive_seed, stream


def test_a_stream_is_its_name_and_nothing_else():
    assert derive_seed(0, "responses", "tiny-lax", 3) == derive_seed(0, "responses", "tiny-lax", 3)
    # the key is the parts joined by ":", as the data-generating streams were always seeded
    assert stream(7, "seed-scene", 12).random() == random.Random("7:seed-scene:12").random()
    assert derive_seed(7, "val", 2) == random.Random("7:val:2").randrange(2**31)


def test_streams_that_stride_arithmetic_would_merge_are_distinct():
    # seed * 1_000_003 + index gave seed 1, index 0 and seed 0, index 1_000_003 the same stream
    assert derive_seed(1, "record", 0) != derive_seed(0, "record", 1_000_003)
    kinds = ("batch", "record", "retry")
    seeds = {derive_seed(seed, kind, k) for seed in range(3) for kind in kinds for k in range(300)}
    assert len(seeds) == 3 * 3 * 300
    assert all(0 <= s < SEED_RANGE for s in seeds)
    assert max(seeds) > SEED_RANGE // 2 > min(seeds)  # spread over the range, not clustered near the base seed
