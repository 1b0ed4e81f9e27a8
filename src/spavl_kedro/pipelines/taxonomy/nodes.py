"""The SPA-VL harm taxonomy as a validated table: one row per subcategory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from spavl_kedro.config import TaxonomyConfig, typed
from spavl_kedro.schema import validate

PROVENANCES = {"released", "inferred_salad_bench"}


def build_taxonomy(
    spec: dict[str, Any], release: dict[str, pd.DataFrame], params: TaxonomyConfig | dict[str, Any]
) -> pd.DataFrame:
    """The taxonomy from the file (`source: file`) or from the official release's labelled splits.

    The file is checked for the published shape: a ValueError names the offending entry (by its path in
    the file) for a missing level or field, a duplicated (domain, category, subcategory) triplet, or counts
    that differ from the expected ones.
    """
    expected = typed(TaxonomyConfig, params)
    if expected.source == "official":
        return _check_counts(_from_release(release, _from_spec(spec)), expected)
    return _check_counts(_from_spec(spec), expected)


def _from_release(release: dict[str, pd.DataFrame], described: pd.DataFrame) -> pd.DataFrame:
    """The exact triplets of the release: sorted(set(zip(class1, class2, class3))) over its labelled splits
    (validation, test harm, test help); descriptions and keywords come from the file where names match."""
    labelled = [release[k] for k in ("validation", "test_harm", "test_help") if k in release]
    if not labelled:
        raise ValueError(
            "taxonomy.source is 'official' but the release (spa_vl_official) has no validation or "
            "test split: set align.official_dir to the folder of the official SPA-VL release"
        )
    triplets = sorted({t for table in labelled for t in zip(table["class1"], table["class2"], table["class3"])})
    known = described.set_index(["class1", "class2", "class3"])
    rows = []
    for triplet in triplets:
        row = known.loc[triplet] if triplet in known.index else None
        rows.append(
            {
                "class1": triplet[0],
                "class2": triplet[1],
                "class3": triplet[2],
                "description": row["description"] if row is not None else triplet[2],
                "keywords": list(row["keywords"]) if row is not None else [triplet[2]],
                "provenance": "released",
            }
        )
    return pd.DataFrame(rows)


def _from_spec(spec: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for i, domain in enumerate(_children(spec, "domains", "taxonomy")):
        dname = _name(domain, f"domains[{i}]")
        for j, category in enumerate(_children(domain, "categories", f"domain '{dname}'")):
            cname = _name(category, f"domain '{dname}' categories[{j}]")
            where = f"'{dname} / {cname}'"
            for k, sub in enumerate(_children(category, "subcategories", f"category {where}")):
                sname = _name(sub, f"category {where} subcategories[{k}]")
                entry = f"'{dname} / {cname} / {sname}'"
                for field in ("description", "keywords", "provenance"):
                    if not sub.get(field):
                        raise ValueError(f"taxonomy entry {entry}: missing '{field}'")
                if sub["provenance"] not in PROVENANCES:
                    raise ValueError(f"taxonomy entry {entry}: provenance must be one of {sorted(PROVENANCES)}")
                rows.append(
                    {
                        "class1": dname,
                        "class2": cname,
                        "class3": sname,
                        "description": sub["description"],
                        "keywords": list(sub["keywords"]),
                        "provenance": sub["provenance"],
                    }
                )
    return pd.DataFrame(rows)


def _check_counts(table: pd.DataFrame, expected: TaxonomyConfig) -> pd.DataFrame:
    duplicated = table[table.duplicated(["class1", "class2", "class3"], keep="first")]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise ValueError(f"taxonomy entry '{first.class1} / {first.class2} / {first.class3}' is duplicated")
    counts = {
        "domains": table["class1"].nunique(),
        "categories": len(table[["class1", "class2"]].drop_duplicates()),
        "subcategories": len(table),
    }
    for level, count in counts.items():
        if count != getattr(expected, level):
            raise ValueError(
                f"taxonomy has {count} {level}, expected {getattr(expected, level)} (parameter taxonomy.{level})"
            )
    return validate(table, "taxonomy")


def _children(node: Any, key: str, where: str) -> list[dict]:
    if not isinstance(node, dict) or not node.get(key):
        raise ValueError(f"taxonomy {where}: missing level '{key}'")
    return node[key]


def _name(node: dict, where: str) -> str:
    name = node.get("name") if isinstance(node, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"taxonomy {where}: missing 'name'")
    return name
