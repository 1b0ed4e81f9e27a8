import copy

import pytest

from spavl_kedro.pipelines.taxonomy.nodes import build_taxonomy
from spavl_kedro.schema import TABLES


def test_committed_taxonomy_has_published_shape(taxonomy_spec, params):
    table = build_taxonomy(taxonomy_spec, {}, params["taxonomy"])
    assert list(table.columns) == TABLES["taxonomy"]
    assert len(table) == 53
    assert table["class1"].nunique() == 6
    assert len(table[["class1", "class2"]].drop_duplicates()) == 13
    assert (table["provenance"] == "released").sum() == 35
    # published spellings, typos included
    for label in ("Representation & ToxicityHarms", "Human Autonomy & IntegrityHarms"):
        assert label in set(table["class1"])
    for label in ("disablity discrimination", "scamns", "paypal lending", "multi-level marketing"):
        assert label in set(table["class3"])
    assert table["keywords"].map(len).min() >= 4


def test_duplicated_triplet_is_named(taxonomy_spec, params):
    spec = copy.deepcopy(taxonomy_spec)
    subs = spec["domains"][0]["categories"][0]["subcategories"]
    subs.append(copy.deepcopy(subs[0]))
    with pytest.raises(ValueError, match=r"'Representation & ToxicityHarms / Toxic / bully' is duplicated"):
        build_taxonomy(spec, {}, params["taxonomy"])


def test_missing_level_is_named(taxonomy_spec, params):
    spec = copy.deepcopy(taxonomy_spec)
    del spec["domains"][1]["categories"][0]["subcategories"]
    with pytest.raises(ValueError, match=r"category 'Misinformation Harms / .*': missing level 'subcategories'"):
        build_taxonomy(spec, {}, params["taxonomy"])


def test_missing_field_is_named(taxonomy_spec, params):
    spec = copy.deepcopy(taxonomy_spec)
    del spec["domains"][0]["categories"][1]["subcategories"][0]["keywords"]
    with pytest.raises(ValueError, match=r"'Representation & ToxicityHarms / Unfair / ageism': missing 'keywords'"):
        build_taxonomy(spec, {}, params["taxonomy"])


def test_wrong_count_names_the_parameter(taxonomy_spec, params):
    spec = copy.deepcopy(taxonomy_spec)
    spec["domains"][0]["categories"][0]["subcategories"].pop()
    with pytest.raises(ValueError, match=r"52 subcategories, expected 53 \(parameter taxonomy.subcategories\)"):
        build_taxonomy(spec, {}, params["taxonomy"])
