"""The one rule for deriving seeds: every random stream is named by a path below a configured seed.

A stream is `(seed, *path)`, e.g. `(generate.seed, "responses", "tiny-lax", 3)` for the sampling of shard 3
of one responder. Its key is the parts joined by ":" (`"0:responses:tiny-lax:3"`), and Python's
`random.Random` seeds from a string through SHA-512 of its bytes (the documented version-2 seeding), so

- the same path always gives the same draws, in every process and on every machine (no `hash()` salt);
- different paths give unrelated draws: no arithmetic like `seed * 1_000_003 + index`, whose streams
  collide when one index reaches the stride;
- a stream depends only on its own name, not on how many others were drawn before it or in what order
  (a shard answers the same whichever shards ran first in the process, a responder bootstraps the same
  whatever its position in the list).

Name the path after what is drawn, plus the identifiers that make it distinct (a record, a shard, a model
name); never a running counter of the process.
"""
from __future__ import annotations

import random

SEED_RANGE = 2**31  # fits torch.manual_seed, numpy, random and the OpenAI `seed` field


def stream(seed: int, *path: object) -> random.Random:
    """A `random.Random` for the stream `(seed, *path)`."""
    return random.Random(":".join(str(part) for part in (seed, *path)))


def derive_seed(seed: int, *path: object) -> int:
    """An integer seed in [0, 2**31) for the stream `(seed, *path)`, for libraries that take a number
    (torch, numpy, pandas `random_state`, an API's `seed`)."""
    return stream(seed, *path).randrange(SEED_RANGE)
