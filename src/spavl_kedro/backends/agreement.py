"""Agreement between two judges' binary labels (e.g. `Verdict.safe` of the keyword judge and MD-Judge).

Undecided labels (None, NaN, pandas NA: an unparsable or failed verdict) cannot agree or disagree: both
functions leave out every record where either judge is undecided, and `confusion` counts them, so a report
built from it shows how many records the agreement figure rests on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def _label(value: Any) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return bool(value)
    except TypeError:  # pandas.NA refuses bool()
        return None


def _decided(a: Sequence[Any], b: Sequence[Any]) -> tuple[list[tuple[bool, bool]], int]:
    if len(a) != len(b):
        raise ValueError(f"agreement needs labels for the same records: got {len(a)} and {len(b)}")
    pairs = [(_label(x), _label(y)) for x, y in zip(a, b)]
    decided = [(x, y) for x, y in pairs if x is not None and y is not None]
    return decided, len(pairs) - len(decided)  # type: ignore[return-value]


def confusion(a: Sequence[Any], b: Sequence[Any]) -> dict[str, float]:
    """2x2 counts of judge `a` against judge `b`, plus how many records each rests on and raw agreement.

    >>> table = confusion([True, True, False, None], [True, False, False, True])
    >>> table["true_true"], table["true_false"], table["false_false"], table["undecided"], round(table["kappa"], 3)
    (1, 1, 1, 1, 0.4)
    """
    decided, undecided = _decided(a, b)
    counts = {"true_true": 0, "true_false": 0, "false_true": 0, "false_false": 0}
    for x, y in decided:
        counts[f"{str(x).lower()}_{str(y).lower()}"] += 1
    n = len(decided)
    agreement = (counts["true_true"] + counts["false_false"]) / n if n else math.nan
    return {**counts, "decided": n, "undecided": undecided, "agreement": agreement, "kappa": cohens_kappa(a, b)}


def cohens_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa: agreement beyond what two raters with these label rates would reach by chance.

    (p_observed - p_chance) / (1 - p_chance). NaN when undefined: no decided record, or both judges gave
    every record the same single label (p_chance = 1: they agree, but there is nothing to tell apart —
    read `confusion` instead). Judges that each use one label but different ones get 0.

    >>> cohens_kappa([True, False, True, False], [True, False, False, False])
    0.5
    >>> cohens_kappa([True, True], [True, True])
    nan
    """
    decided, _ = _decided(a, b)
    n = len(decided)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in decided) / n
    pa = sum(x for x, _ in decided) / n
    pb = sum(y for _, y in decided) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return math.nan
    return (observed - chance) / (1 - chance)
