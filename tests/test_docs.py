"""docs/configuration.md's tables are what `spavl_kedro.config_docs` generates from the config classes and
the YAML files now, they have a row for every parameter key a user can set, and no row for a key that is gone.

A key is documented when it is in backticks in the first cell of a table row: | `align.dpo.beta` | ... |
(a row may name several keys that share type, values and meaning, as `align.grpo.*` and `align.rloo.*` do).

Keys that need a row:
1. Every key conf/base or conf/paper sets, loaded with Kedro's OmegaConfigLoader as `kedro run` loads them
   (`config.load_parameters`), flattened to dotted paths:
   - a mapping adds `.key` (`generate.images.per_subcategory`);
   - a list of mappings adds `[]`, then its items' keys (`generate.responders[].name`);
   - a scalar, a null or a list of scalars is a leaf (`evaluate.sets`);
   - a `generation` or `load_kwargs` mapping is a leaf too, documented as a whole: its keys are
     transformers' `generate()` / `from_pretrained` keyword arguments, passed through, not ours; so is
     `align.launch.per_method`, whose keys are method names (`config_docs.WHOLE`).
2. Every field of every configuration class, at the path where it sits in the parameters, whether or not a
   YAML file sets it: the tree of pydantic models under `config.SECTIONS`, walked through the fields'
   types (a model adds `.field`, a list of models `[]`): `config_docs.field_keys`. `spavl_kedro.config`
   imports without torch or TRL (models/specs.py, training/*_config.py), so the classes themselves are read, not their source.
3. Model specs are documented once. `generate.responders[]` is a list of BackendSpec, and every other key
   holding one (`backend`, `evaluate.served[]`) is documented by its own row, so
   `judge.pairwise.backend.model` is covered by the rows `judge.pairwise.backend` and
   `generate.responders[].model`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import PROJECT

from spavl_kedro import config_docs
from spavl_kedro.config import load_parameters as parameters
from spavl_kedro.config_docs import DOC, SPEC, WHOLE, field_keys


def _yaml_keys(value, path: str = ""):
    if isinstance(value, dict) and value and path.rpartition(".")[2] not in WHOLE:
        for key, item in value.items():
            yield from _yaml_keys(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for item in value:
            yield from _yaml_keys(item, f"{path}[]")
    else:
        yield path


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
    keys = set(_yaml_keys(parameters(env)))
    assert {"generate.responders[].name", "align.launch.accelerate_config", "evaluate.sets"} <= keys
    missing = _undocumented(keys)
    assert not missing, f"docs/configuration.md has no row for these conf/{env} keys:\n  " + "\n  ".join(missing)


def test_every_config_field_is_documented():
    keys = field_keys()
    assert {
        "align.dpo.activation_checkpointing",
        "align.rloo.num_generations",
        "generate.responders[].timeout_s",
        "generate.images.clip_prompt",
    } <= keys
    missing = _undocumented(keys)
    assert not missing, "docs/configuration.md has no row for these config class fields:\n  " + "\n  ".join(missing)


def test_no_row_documents_a_key_that_is_gone():
    keys = field_keys() | {key for env in ("base", "paper") for key in _yaml_keys(parameters(env))}
    known = {row for key in keys for row in _rows_for(key)}
    stale = sorted(_documented() - known)
    assert not stale, "docs/configuration.md documents keys no YAML file or config class has:\n  " + "\n  ".join(stale)


def test_generated_tables_are_current():
    """Each table between `generated` markers is what the config classes' Field descriptions and the YAML
    files give now; a changed description, default or YAML value needs `make docs`."""
    stale = config_docs.stale_blocks(DOC.read_text(), config_docs.tables())
    assert not stale, (
        f"docs/configuration.md: the generated tables {stale} differ from the config classes; run `make docs`"
    )


def test_results_page_was_generated_from_the_current_default_inputs():
    """docs/results.md records the fingerprint of the configuration and raw text it was run from; a recipe or
    seed text changed since then makes its figures describe another default."""
    sys.path.insert(0, str(PROJECT / "benchmarks"))
    from results import inputs_fingerprint, recorded_fingerprint

    recorded = recorded_fingerprint((PROJECT / "docs" / "results.md").read_text())
    assert recorded == inputs_fingerprint(PROJECT), (
        f"docs/results.md was generated from inputs {recorded}, the default's are now "
        f"{inputs_fingerprint(PROJECT)}: run `.venv/bin/python benchmarks/miniature_seeds.py --report`"
    )


def test_make_docs_rewrites_only_the_generated_blocks():
    text, tables = DOC.read_text(), config_docs.tables()
    edited = text.replace("| `taxonomy.domains` | int |", "| `taxonomy.domains` | str |").replace(
        "# Configuration reference\n", "# Configuration reference, edited\n"
    )
    assert "taxonomy" in config_docs.stale_blocks(edited, tables)
    rendered = config_docs.rendered(edited, tables)
    assert "| `taxonomy.domains` | int |" in rendered
    assert rendered.startswith("# Configuration reference, edited\n")


def test_config_docs_imports_without_the_training_stack():
    code = "import sys, spavl_kedro.config_docs; sys.exit('torch' in sys.modules or 'trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
