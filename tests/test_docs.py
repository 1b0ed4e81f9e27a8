"""docs/configuration.md has a row for every parameter key a user can set, and no row for a key that is gone.

A key is documented when it is in backticks in the first cell of a table row: | `align.dpo.beta` | ... |
(a row may name several keys that share type, values and meaning, as `align.grpo.*` and `align.rloo.*` do).

Keys that need a row:
1. Every key conf/base or conf/paper sets, loaded with Kedro's OmegaConfigLoader as tests/test_config.py
   loads them, flattened to dotted paths:
   - a mapping adds `.key` (`generate.images.per_subcategory`);
   - a list of mappings adds `[]`, then its items' keys (`generate.responders[].name`);
   - a scalar, a null or a list of scalars is a leaf (`evaluate.sets`);
   - a `generation` or `load_kwargs` mapping is a leaf too, documented as a whole: its keys are
     transformers' `generate()` / `from_pretrained` keyword arguments, passed through, not ours.
2. Every field of every configuration class, at the path where it sits in the parameters, whether or not a
   YAML file sets it: the tree of pydantic models under `config.SECTIONS`, walked through the fields'
   types (a model adds `.field`, a list of models `[]`). `spavl_kedro.config` imports without torch or
   TRL (backends/settings.py), so the classes themselves are read, not their source.
3. Model specs are documented once. `generate.responders[]` is a list of BackendSpec, and every other key
   holding one (`backend`, `evaluate.served[]`) is documented by its own row, so `judge.pairwise.backend.model` is covered by the rows `judge.pairwise.backend`
   and `generate.responders[].model`.
"""

from __future__ import annotations

import re
import types
import typing

import pytest
from kedro.config import OmegaConfigLoader
from pydantic import BaseModel

from conftest import PROJECT
from spavl_kedro.backends.methods import METHODS
from spavl_kedro.config import SECTIONS, BackendSpec

DOC = PROJECT / "docs" / "configuration.md"
SPEC = "generate.responders[]"  # where BackendSpec's fields are documented
WHOLE = {"generation", "load_kwargs", "max_new_tokens_per_set"}


def _parameters(env: str) -> dict:
    """Parameters as `kedro run --env <env>` sees them. The merge strategy is settings.py's (importing
    settings would import torch through the hooks)."""
    loader = OmegaConfigLoader(conf_source=str(PROJECT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft"})
    return dict(loader["parameters"])


def _yaml_keys(value, path: str = ""):
    if isinstance(value, dict) and value and path.rpartition(".")[2] not in WHOLE:
        for key, item in value.items():
            yield from _yaml_keys(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for item in value:
            yield from _yaml_keys(item, f"{path}[]")
    else:
        yield path


def _models(annotation) -> list[tuple[str, type[BaseModel]]]:
    """The pydantic models a field's type holds, with the path suffix each adds: '' or '[]' (a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [("[]" + suffix, model) for arg in args for suffix, model in _models(arg)]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _models(arg)]
    return []


def _field_keys() -> set[str]:
    """Every field of every configuration model, as a dotted path from its parameter block."""
    keys: set[str] = set()

    def walk(model: type[BaseModel], path: str) -> None:
        for name, info in model.model_fields.items():
            keys.add(f"{path}.{name}")
            for suffix, inner in _models(info.annotation):
                if inner is not BackendSpec or f"{path}.{name}{suffix}" == SPEC:  # a model spec: documented once
                    walk(inner, f"{path}.{name}{suffix}")

    for block, model in SECTIONS.items():
        walk(model, block)
    keys.remove("align.recipes")  # written as align.<method>, one per row of the methods table
    for method, row in METHODS.items():  # align.<method> holds a recipe, checked against its settings class
        keys.add(f"align.{method}")
        walk(row.settings, f"align.{method}")
    return keys


def _rows_for(key: str) -> set[str]:
    """The rows that document `key`: its own, or for a key inside a model spec, the spec's and the field's."""
    spec, inside, rest = key.partition(".backend.")
    return {f"{spec}.backend", f"{SPEC}.{rest.split('.')[0]}"} if inside else {key}


def _documented() -> set[str]:
    first_cells = re.findall(r"^\|([^|\n]*)\|", DOC.read_text(), flags=re.M)
    return {key for cell in first_cells for key in re.findall(r"`([^`]+)`", cell)}


def _undocumented(keys) -> list[str]:
    documented = _documented()
    return sorted({row for key in keys for row in _rows_for(key)} - documented)


@pytest.mark.parametrize("env", ["base", "paper"])
def test_every_parameter_key_is_documented(env):
    keys = set(_yaml_keys(_parameters(env)))
    assert {"generate.responders[].name", "align.launch.accelerate_config", "evaluate.sets"} <= keys
    missing = _undocumented(keys)
    assert not missing, f"docs/configuration.md has no row for these conf/{env} keys:\n  " + "\n  ".join(missing)


def test_every_config_field_is_documented():
    keys = _field_keys()
    assert {"align.dpo.activation_checkpointing", "align.rloo.num_generations", "generate.responders[].timeout_s",
            "generate.images.clip_prompt"} <= keys
    missing = _undocumented(keys)
    assert not missing, "docs/configuration.md has no row for these config class fields:\n  " + "\n  ".join(missing)


def test_no_row_documents_a_key_that_is_gone():
    keys = _field_keys() | {key for env in ("base", "paper") for key in _yaml_keys(_parameters(env))}
    known = {row for key in keys for row in _rows_for(key)}
    stale = sorted(_documented() - known)
    assert not stale, "docs/configuration.md documents keys no YAML file or config class has:\n  " + "\n  ".join(stale)
