"""Every seed the project derives, in one place: from the configured seeds (`generate.seed`, `judge.seed`,
`evaluate.seed`, `tiny.bootstrap.seed`, a backend's `seed`) to the seed of one random stream.

Two rules, both kept as they were when docs/results.md was measured, so its figures reproduce.

**Data streams are named.** Which template, image, pair or held-out item is drawn comes from
`stream(seed, *path)`: a `random.Random` seeded with the parts joined by ":" (`"0:seed-scene:12"`). Python
seeds from a string through SHA-512 of its bytes, so a stream is the same in every process and on every
machine, unrelated to every other path, and independent of what was drawn before it. `derive_seed(seed,
*path)` is an integer from the same stream, for libraries that take a number (pandas `random_state`).

**Sampling streams are offsets.** What a model samples is seeded per unit of work (a batch, a record, a
shard, a model), so a result does not depend on which other units ran first in the process:

- `offset_seed(seed, k)` = seed · STRIDE + k, the k-th unit below `seed`. STRIDE is a prime larger than any
  count of units in one run, so the units of seed s never reach those of seed s + 1;
- `eval_answer_seed` and `response_seed` lay out the units of the evaluate and generate stages on that
  rule (shard × a prime stride, plus a lane per sample);
- `model_seed(seed, family, n)` = seed + FAMILY[family] · (n + 1), the n-th tiny model of a family, with a
  distinct prime per family so responders and guards never share a seed;
- `sibling_seed(seed, k)` = seed + k, the k-th of a few siblings: a judge's k-th re-ask of unparsable
  answers, the examples drawn for the k-th tiny guard.

New code should name its stream (`stream` / `derive_seed` with a path saying what is drawn); the offset
rule stays for the streams above because changing it would change every published figure.
"""

from __future__ import annotations

import random

SEED_RANGE = 2**31  # what `derive_seed` returns: fits torch, numpy, pandas and an API's `seed`
STRIDE = 1_000_003  # prime; more units than this below one seed would overlap the next seed's units
SHARD_STRIDE = {"eval_answers": 1_009, "responses": 10_007}  # per shard, room for the lanes / shards below it
SAMPLED_LANE = 7  # evaluate: sampled answers of a shard start 7 units after its greedy ones
FAMILY = {"responder": 101, "guard": 307}  # tiny models bootstrapped from one foundation
SEED_IMAGES = STRIDE  # seed images are rendered with generate.seed + this: never the dataset's images


def stream(seed: int, *path: object) -> random.Random:
    """A `random.Random` for the named stream `(seed, *path)`."""
    return random.Random(":".join(str(part) for part in (seed, *path)))


def derive_seed(seed: int, *path: object) -> int:
    """An integer seed in [0, 2**31) drawn from the named stream `(seed, *path)`."""
    return stream(seed, *path).randrange(SEED_RANGE)


def offset_seed(seed: int, k: int) -> int:
    """The seed of unit `k` (a batch, a record) below `seed`."""
    return seed * STRIDE + k


def eval_answer_seed(seed: int, shard: int, decoding: str, sample: int) -> int:
    """evaluate: the answers of one shard, greedy or the `sample`-th sampled pass."""
    return offset_seed(
        seed, shard * SHARD_STRIDE["eval_answers"] + sample + (0 if decoding == "greedy" else SAMPLED_LANE)
    )


def response_seed(seed: int, responder: int, shard: int) -> int:
    """generate: the responses of the `responder`-th responder (its position in generate.responders) to one shard."""
    return offset_seed(seed, responder * SHARD_STRIDE["responses"] + shard)


def model_seed(seed: int, family: str, n: int) -> int:
    """The `n`-th tiny model of `family` (counting from 0 in configuration order)."""
    return seed + FAMILY[family] * (n + 1)


def sibling_seed(seed: int, k: int) -> int:
    """The `k`-th sibling of `seed` (k = 0 is `seed` itself)."""
    return seed + k
