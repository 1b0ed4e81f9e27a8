"""The wording grammar: families, the held-out share, and the skeleton check that keeps held-out sentence forms
out of everything taught."""

from __future__ import annotations

import copy

import pytest

from spavl_kedro.config import GenerateConfig, WordingConfig
from spavl_kedro.pipelines.generate.questions import fill
from spavl_kedro.wording import SkeletonMatcher, skeleton


@pytest.fixture()
def generate(base_params) -> GenerateConfig:
    return GenerateConfig.model_validate(base_params["generate"])


class _Sub:
    class3, class2 = "online fraud", "Fraud & Scams"


def test_default_grammar_hides_the_label_from_openings_and_the_harm_name(generate):
    wording = generate.questions.wording
    families = wording.families()
    per_type = {q: [f for f in families if f.qtype == q] for q in ("easy", "hardq", "hards")}
    assert all(len(fs) >= 12 for fs in per_type.values())
    assert len({skeleton(f.template) for f in families}) == len(families)  # every family its own sentence form
    harmful = per_type["hardq"] + per_type["hards"]
    # harmless families name the harm, harmful ones sometimes do not: `{subcategory}` is no label
    assert any("{subcategory}" in f.template for f in per_type["easy"])
    assert any("{subcategory}" not in f.template for f in harmful)
    # openings are shared between harmless and harmful types
    assert set(wording.easy.openings) & set(wording.hardq.openings)
    assert set(wording.easy.openings) & set(wording.hards.openings)


def test_held_out_share_is_seeded_and_leaves_seen_families(generate):
    wording = generate.questions.wording
    held0, held1 = wording.held_out_ids(0), wording.held_out_ids(1)
    assert held0 == wording.held_out_ids(0) and held0 != held1
    for qtype in ("easy", "hardq", "hards"):
        n = sum(f.qtype == qtype for f in wording.families())
        assert sum(h.startswith(f"{qtype}/") for h in held0) == round(wording.held_out * n)
    with pytest.raises(ValueError, match="holds out all"):
        WordingConfig.model_validate({**wording.model_dump(), "held_out": 0.99})


def test_skeleton_matcher_finds_held_out_forms_whatever_fills_the_slots(generate):
    matcher = generate.unseen_matcher()
    held = generate.questions.wording.held_out_ids(generate.seed)
    for family in generate.questions.wording.families():
        for keyword in ("knife", "credit card"):
            text = fill(family.template, keyword, _Sub)
            # a held-out family's question matches in any case and punctuation; a seen one never does
            assert matcher.matches(text.upper().rstrip("?.")) == (family.family_id in held), text
    seen = generate.seen_templates(("easy", "hardq", "hards"))
    assert len(seen) == len(generate.questions.wording.families()) - len(held)
    assert not any(matcher.matches(fill(t, "knife", _Sub)) for t in seen)
    # a model writer has no families: nothing is held out
    paper_like = copy.deepcopy(generate)
    paper_like.questions.writer = "model"
    assert not paper_like.unseen_matcher().matches(fill(next(iter(seen)), "knife", _Sub))


def test_skeleton_is_the_sentence_form():
    assert skeleton("Tell me about {keyword}, then {subcategory}.") == "tell me about * then *"
    assert SkeletonMatcher(["Tell me about {keyword}."]).matches("tell me about two knives")
    assert not SkeletonMatcher(["Tell me about {keyword}."]).matches("please tell me about knives")


def test_grammar_rejects_bad_slots():
    with pytest.raises(ValueError, match="exactly once"):
        WordingConfig.model_validate(
            {
                "easy": {"openings": ["Hi"], "frames": [["x"]]},
                "hardq": {"openings": ["{request}"], "frames": [["x"]]},
                "hards": {"openings": ["{request}"], "frames": [["x"]]},
            }
        )
    with pytest.raises(ValueError, match=r"names \['target'\]"):
        WordingConfig.model_validate(
            {
                "easy": {"openings": ["{request}"], "frames": [["{target}"]]},
                "hardq": {"openings": ["{request}"], "frames": [["x"]]},
                "hards": {"openings": ["{request}"], "frames": [["x"]]},
            }
        )
