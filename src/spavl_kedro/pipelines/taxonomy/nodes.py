"""The SPA-VL harm taxonomy as a validated table: one row per subcategory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from spavl_kedro.config import TaxonomyConfig
from spavl_kedro.schema import validate

PROVENANCES = {"released", "inferred_salad_bench"}


def build_taxonomy(spec: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Flatten the nested taxonomy file and check it has the published shape.

    Raises ValueError naming the offending entry (by its path in the file) for a missing level or field,
    a duplicated (domain, category, subcategory) triplet, or counts that differ from the expected ones.
    """
    expected = TaxonomyConfig.model_validate(params)
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
                rows.append({"class1": dname, "class2": cname, "class3": sname,
                             "description": sub["description"], "keywords": list(sub["keywords"]),
                             "provenance": sub["provenance"]})
    table = pd.DataFrame(rows)
    duplicated = table[table.duplicated(["class1", "class2", "class3"], keep="first")]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise ValueError(f"taxonomy entry '{first.class1} / {first.class2} / {first.class3}' is duplicated")
    counts = {"domains": table["class1"].nunique(),
              "categories": len(table[["class1", "class2"]].drop_duplicates()),
              "subcategories": len(table)}
    for level, count in counts.items():
        if count != getattr(expected, level):
            raise ValueError(f"taxonomy has {count} {level}, expected {getattr(expected, level)} "
                             f"(parameter taxonomy.{level})")
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
