"""Wording families: the template writer's questions come from a small grammar, and some of its sentence forms
are never taught, so evaluation can ask in wording that training never saw.

A question type's grammar has openings (each with one `{request}` slot) and request frames (each written in
one or more slot orders). One family is one (opening, frame, order): its template is the opening with the
order in place of `{request}`. A seeded share of each type's families is held out: their questions may be
test questions, but never a training pair, a validation pair, a seed-corpus prompt or a guard's example.

What is held out is a *skeleton*: the template with its slots (`{keyword}`, `{subcategory}`, `{category}`)
masked. `SkeletonMatcher` says whether a written text is an instance of a held-out skeleton whatever fills the
slots, so leakage is checked on sentence forms, not on exact strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spavl_kedro.seeding import stream

SEEN, UNSEEN = "seen", "unseen"


@dataclass(frozen=True)
class Family:
    family_id: str  # "<qtype>/o<opening>-f<frame>-s<order>"
    qtype: str
    template: str


def families(qtype: str, openings: Sequence[str], frames: Sequence[Sequence[str]]) -> list[Family]:
    """Every (opening, frame, order) of one question type's grammar, in a fixed order."""
    return [
        Family(f"{qtype}/o{i}-f{j}-s{k}", qtype, opening.replace("{request}", order))
        for i, opening in enumerate(openings)
        for j, frame in enumerate(frames)
        for k, order in enumerate(frame)
    ]


def held_out_ids(all_families: Sequence[Family], share: float, seed: int) -> frozenset[str]:
    """`round(share * n)` families of each question type, drawn from the stream (`seed`, "wording", qtype)."""
    held: set[str] = set()
    for qtype in dict.fromkeys(f.qtype for f in all_families):
        ids = [f.family_id for f in all_families if f.qtype == qtype]
        held.update(stream(seed, "wording", qtype).sample(ids, round(share * len(ids))))
    return frozenset(held)


def skeleton(template: str) -> str:
    """The sentence form: lower-case words with every slot masked as `*`.

    >>> skeleton("Explain how to use the {keyword} here?")
    'explain how to use the * here'
    """
    parts = re.split(r"\{[a-z0-9_]+\}", template)
    return " * ".join(" ".join(re.findall(r"[a-z0-9']+", part.lower())) for part in parts).strip()


class SkeletonMatcher:
    """Whether a text is an instance of one of the given templates' skeletons, whatever fills their slots.

    >>> SkeletonMatcher(["Can you tell me how to stay safe from {subcategory}?"]).matches(
    ...     "can you tell me how to stay safe from online fraud"
    ... )
    True
    """

    def __init__(self, templates: Iterable[str]) -> None:
        patterns = []
        for form in sorted({skeleton(t) for t in templates}):
            pieces = [re.escape(piece.strip()) for piece in form.split("*")]
            patterns.append(r"\s*.+?\s*".join(pieces))
        self._pattern = re.compile("^(?:" + "|".join(f"(?:{p})" for p in patterns) + ")$") if patterns else None

    def matches(self, text: str) -> bool:
        if self._pattern is None:
            return False
        return self._pattern.match(" ".join(re.findall(r"[a-z0-9']+", text.lower()))) is not None
