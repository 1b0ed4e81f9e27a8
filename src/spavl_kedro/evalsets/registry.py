"""The evaluation sets, one table: each set's kind, its embedded generator, its published stand-in and its
headline rows.

`evaluate.sets` picks rows of `EVAL_SETS`. The evaluate stage builds each picked set with its generator (or
reads its published files, when the catalog's `published_<name>` is present), every policy answers it, the
scorers score it by its `kind`, and the report prints its `headline` rows. Adding a set is its own module
with a generator (and, for a published benchmark, a loader of its layout), one row here and its name in
`evaluate.sets`:

    EVAL_SETS["jailbreakv"] = EvalSet("harm", "my_package.jailbreakv:generate", "JailBreakV-28K style attacks",
                                      headline=(Headline("JailBreakV ASR ↓", "asr"),))

A generator is `generate(inputs, cfg) -> items`: `inputs` is `pipelines.evaluate.sets.SetInputs` (the
split's held-out tables, the question and image lookups, the responses, the official release), `cfg` the
`EvaluateConfig`, and `items` a DataFrame in `evalsets.loaders.EVAL_ITEM_COLUMNS` (`items_frame` builds one).
Every image an item shows must be a held-out test image. Generators are named as "module:function" and
imported when their set is built, so this table (and the configuration that checks names against it)
loads without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from spavl_kedro.evalsets.loaders import load_advbench, load_figstep, load_mis_test, load_mm_safetybench, load_vqa

# How a set's answers are scored (pipelines/evaluate/scoring.py): harm and mis by the verdict judges
# (unsafe share, MIS buckets), help by the helpfulness judge against a reference, benign by the refusal
# rule (over-refusal), capability by exact answers.
Kind = Literal["harm", "help", "benign", "capability", "mis"]
# Who scores a headline row: the primary verdict judge, the helpfulness judge, the rule scorer, or the MIS
# judge (the primary verdict judge when no MIS judge is configured).
Scorer = Literal["primary", "help", "rules", "mis"]


@dataclass(frozen=True)
class Headline:
    label: str
    metric: str
    scorer: Scorer = "primary"
    variant: str | None = "default"  # None: every variant together
    eval_set: str | None = None  # None: the set's own name (a published companion such as vqa names its own)
    group: tuple[str, str] | None = None  # (group_by, group): one breakdown row, e.g. ("wording", "unseen")


@dataclass(frozen=True)
class Published:
    """A benchmark in its published layout: the catalog's `published_<name>` (an `EvalSetDataset` of format
    `name`) reads it with `loader(path, **options)` into eval items; `layout` says what `path` is."""

    name: str
    loader: Callable[..., Any]
    layout: str


@dataclass(frozen=True)
class EvalSet:
    kind: Kind
    generator: str  # "module:function", see the module docstring
    summary: str
    headline: tuple[Headline, ...] = ()
    harm_metric: str = "asr"  # name of the unsafe share of a harm / mis set's items
    published: tuple[Published, ...] = ()  # published tables that replace the set (its own name) or join it
    from_split: bool = True  # generated from this project's split (held-out images, questions, responses)
    official_test: bool = False  # with `evaluate.test_source: official`, built from the SPA-VL release alone

    def generate(self, inputs: Any, cfg: Any):
        module, _, name = self.generator.partition(":")
        function: Callable = getattr(importlib.import_module(module), name)
        return function(inputs, cfg)


_SETS = "spavl_kedro.pipelines.evaluate.sets"
# The variant of an item asked again with every image blanked (`evaluate.blank_image_ablation`): the floor.
IMAGE_BLANKED = "image_blanked"

EVAL_SETS: dict[str, EvalSet] = {
    "test_harm": EvalSet(
        "harm",
        f"{_SETS}:test_harm_items",
        "the split's held-out harmful questions (SPA-VL HarmEval)",
        headline=(
            Headline("HarmEval unsafe rate ↓", "unsafe_rate"),
            *(
                Headline(f"HarmEval unsafe rate, {w} wording ↓", "unsafe_rate", group=("wording", w))
                for w in ("seen", "unseen")
            ),
            Headline("Well-formed answers on test_harm ↑", "well_formed_rate", "rules"),
        ),
        harm_metric="unsafe_rate",
        official_test=True,
    ),
    "test_help": EvalSet(
        "help",
        f"{_SETS}:test_help_items",
        "the split's held-out easy questions, with references (SPA-VL HelpEval)",
        headline=(
            Headline("HelpEval win rate vs reference ↑", "win_rate", "help"),
            *(
                Headline(f"HelpEval win rate, {w} wording ↑", "win_rate", "help", group=("wording", w))
                for w in ("seen", "unseen")
            ),
            Headline("HelpEval win rate, image blanked (floor)", "win_rate", "help", variant="image_blanked"),
        ),
        official_test=True,
    ),
    "benign": EvalSet(
        "benign",
        f"{_SETS}:benign_items",
        "harmless questions about every held-out image (over-refusal)",
        headline=(
            Headline("Over-refusal on benign questions ↓", "refusal_rate", "rules"),
            Headline("Refusal on test_help ↓", "refusal_rate", "rules", eval_set="test_help"),
        ),
    ),
    "capability": EvalSet(
        "capability",
        f"{_SETS}:capability_items",
        "colour, shape and count questions on rendered shapes",
        published=(Published("vqa", load_vqa, "the questions JSON; options: annotations_json, image_dir"),),
        from_split=False,
        headline=(
            Headline("Capability accuracy ↑", "accuracy", "rules"),
            Headline("Capability accuracy, image blanked (floor)", "accuracy", "rules", variant="image_blanked"),
            Headline("VQA accuracy ↑", "accuracy", "rules", None, "vqa"),
        ),
    ),
    "mm_safetybench": EvalSet(
        "harm",
        f"{_SETS}:mm_safetybench_items",
        "key phrases as question, SD image, typography and both (MM-SafetyBench)",
        published=(
            Published(
                "mm_safetybench", load_mm_safetybench, "the repository's data/ folder (processed_questions/, imgs/)"
            ),
        ),
        headline=tuple(
            Headline(f"MM-SafetyBench ASR, {v} ↓", "asr", variant=v) for v in ("text_only", "sd", "typo", "sd_typo")
        ),
    ),
    "figstep": EvalSet(
        "harm",
        f"{_SETS}:figstep_items",
        "instructions as a typographic empty numbered list (FigStep)",
        published=(Published("figstep", load_figstep, "a clone of ThuCCSLab/FigStep"),),
        headline=(
            Headline("FigStep ASR ↓", "asr", variant="figstep"),
            Headline("FigStep well-formed answers ↑", "well_formed_rate", "rules", variant="figstep"),
        ),
    ),
    "advbench": EvalSet(
        "harm",
        f"{_SETS}:advbench_items",
        "imperative instructions with a blank image and none (AdvBench)",
        published=(Published("advbench", load_advbench, "harmful_behaviors.csv"),),
        headline=(
            Headline("AdvBench ASR, blank image ↓", "asr", variant="blank_image"),
            Headline("AdvBench ASR, no image ↓", "asr", variant="no_image"),
        ),
    ),
    "mis_test": EvalSet(
        "mis",
        f"{_SETS}:mis_test_items",
        "MIS samples whose images are held out",
        published=(Published("mis_test", load_mis_test, "mis_easy.json, mis_hard.json or mis_real.json"),),
        headline=(
            *(Headline(f"MIS {m.upper()}", m, "mis") for m in ("asr", "rsr", "rr", "hr")),
            Headline("MIS RSR, images blanked (floor)", "rsr", "mis", variant="image_blanked"),
        ),
    ),
}


def get_eval_set(name: str) -> EvalSet:
    """The row of `name`, or an error that lists the known sets."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; known: {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]


def harm_metric(eval_set: str) -> str:
    """The name of a set's unsafe share: its row's, or `asr` for a set not in the table (a published one)."""
    return EVAL_SETS[eval_set].harm_metric if eval_set in EVAL_SETS else "asr"


def published_names() -> list[str]:
    """Every `published_<name>` table some set reads, in table order."""
    return list(dict.fromkeys(p.name for row in EVAL_SETS.values() for p in row.published))


def published_format(name: str) -> Published:
    """The published layout called `name` (an `EvalSetDataset`'s `format`), or an error listing them."""
    formats = {p.name: p for row in EVAL_SETS.values() for p in row.published}
    if name not in formats:
        raise ValueError(f"unknown format {name!r}; known: {sorted(formats)}")
    return formats[name]
