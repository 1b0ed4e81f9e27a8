"""Agreement between two judges' binary labels (e.g. `Verdict.safe` of the keyword judge and MD-Judge).

Undecided labels (None, NaN, pandas NA: an unparsable or failed verdict) cannot agree or disagree: both
functions leave out every record where either judge is undecided, and `confusion` counts them, so a report
built from it shows how many records the agreement figure rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of `scores` for `labels` (True = positive): the chance that a random positive
    scores above a random negative, ties counting half. None without both classes.

    >>> auroc([True, True, False, False], [0.9, 0.4, 0.4, 0.1])
    0.875
    """
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted(scores)
    # average ranks (1-based) for ties, then the Mann-Whitney U of the positives
    rank: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1] == ranked[i]:
            j += 1
        rank[ranked[i]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(rank[s] for s in pos) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def against_labels(truth: Sequence[bool], safe: Sequence[Any], scores: Sequence[Any] | None = None) -> dict[str, Any]:
    """One judge against known labels (`truth`: unsafe by construction) on the same records: accuracy (an
    undecided verdict counts as wrong), parse rate, false-positive rate (safe records called unsafe, of the
    decided safe ones), false-negative rate (unsafe ones called safe) and, where `scores` gives an unsafe
    probability per record, AUROC over the decided records that have one.

    >>> r = against_labels([True, True, False, False], [False, True, True, None], [0.8, 0.3, 0.2, None])
    >>> r["accuracy"], r["parse_rate"], r["fpr"], r["fnr"], r["auroc"]
    (0.5, 0.75, 0.0, 0.5, 1.0)
    """
    said = [_label(s) for s in safe]
    n = len(truth)
    decided = [(t, not s) for t, s in zip(truth, said) if s is not None]  # (unsafe truth, said unsafe)
    neg = [u for t, u in decided if not t]
    pos = [u for t, u in decided if t]
    scored = [
        (t, float(p))
        for t, s, p in zip(truth, said, scores or [None] * n)
        if s is not None and p is not None and p == p
    ]
    return {
        "records": n,
        "accuracy": sum(t == u for t, u in decided) / n if n else None,
        "parse_rate": len(decided) / n if n else None,
        "fpr": sum(neg) / len(neg) if neg else None,
        "fnr": sum(not u for u in pos) / len(pos) if pos else None,
        "auroc": auroc([t for t, _ in scored], [p for _, p in scored]) if scored else None,
        "unsafe_by_construction": sum(bool(t) for t in truth),
    }
