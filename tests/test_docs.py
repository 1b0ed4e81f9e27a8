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
2. Every field of every configuration class, at the path where the class lives (HOMES), whether or not a
   YAML file sets it: the pydantic models of src/spavl_kedro/config.py, BackendSpec, the tiny model's
   classes and the four trainers' recipe settings. Fields are read from the source (annotated class
   attributes, inherited ones included): importing them would pull in torch and TRL, 10-20 s here.
3. Model specs are documented once. `generate.responders[]` is a list of BackendSpec and every key named
   `backend` holds one, so `judge.pairwise.backend.model` is covered by the rows `judge.pairwise.backend`
   and `generate.responders[].model`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from conftest import PROJECT

DOC = PROJECT / "docs" / "configuration.md"
SRC = PROJECT / "src" / "spavl_kedro"
SOURCES = ["config.py", "backends/factory.py", "backends/tiny.py", "backends/recipe.py", "backends/training.py",
           "backends/sft.py", "backends/reward.py", "backends/online_rl.py"]

# Where each configuration class sits in the parameters; a class used in two places has two homes.
HOMES = {
    "TaxonomyConfig": ["taxonomy"],
    "GenerateConfig": ["generate"],
    "ImagesConfig": ["generate.images"],
    "QuestionsConfig": ["generate.questions"],
    "QuestionTemplates": ["generate.questions.templates"],
    "ModelWriterConfig": ["generate.questions.model_writer"],
    "WriterPrompts": ["generate.questions.model_writer.prompts"],
    "ScreenConfig": ["generate.questions.screen"],
    "MisConfig": ["generate.mis"],
    "TeacherConfig": ["generate.mis.teacher"],
    "CotTemplates": ["generate.mis.teacher.templates"],
    "SeedCorpusConfig": ["generate.seed_corpus"],
    "BackendSpec": ["generate.responders[]"],
    "TinyConfig": ["tiny"],
    "TinyModelConfig": ["tiny.model"],
    "BootstrapConfig": ["tiny.bootstrap"],
    "FoundationConfig": ["tiny.foundation"],
    "VisionPretrainConfig": ["tiny.vision"],
    "JudgeConfig": ["judge"],
    "VerdictJudgeSpec": ["judge.judges[]"],
    "PairwiseJudgeSpec": ["judge.pairwise", "evaluate.help_judge.pairwise"],
    "SplitConfig": ["split"],
    "SubsetConfig": ["split.subset"],
    "AlignConfig": ["align"],
    "PolicyConfig": ["align.policy"],
    "Behaviour": ["generate.responders[]", "align.policy"],
    "RLRewardConfig": ["align.rl"],
    "LaunchConfig": ["align.launch"],
    "DPOSettings": ["align.dpo"],
    "SFTSettings": ["align.sft"],
    "RewardSettings": ["align.reward"],
    "OnlineRLSettings": ["align.grpo", "align.rloo"],
    "EvaluateConfig": ["evaluate"],
    "TypographyConfig": ["evaluate.typography"],
    "CapabilityConfig": ["evaluate.capability"],
    "HelpJudgeConfig": ["evaluate.help_judge"],
    "MisJudgeSpec": ["evaluate.mis_judge"],
    "BenchmarkTemplates": ["evaluate.templates"],
}
BASES = {"Strict", "ImageSourceConfig", "RecipeSettings"}  # their fields are documented through subclasses
SPEC = HOMES["BackendSpec"][0]
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


def _model_classes() -> dict[str, ast.ClassDef]:
    """The pydantic models defined in SOURCES, by name."""
    classes = {node.name: node for source in SOURCES for node in ast.parse((SRC / source).read_text()).body
               if isinstance(node, ast.ClassDef)}

    def is_model(node: ast.ClassDef) -> bool:
        return any(ast.unparse(base) in ("BaseModel", "pydantic.BaseModel")
                   or (isinstance(base, ast.Name) and base.id in classes and is_model(classes[base.id]))
                   for base in node.bases)

    return {name: node for name, node in classes.items() if is_model(node)}


def _fields(name: str, classes: dict[str, ast.ClassDef]) -> list[str]:
    node = classes[name]
    inherited = [field for base in node.bases if isinstance(base, ast.Name) and base.id in classes
                 for field in _fields(base.id, classes)]
    own = [stmt.target.id for stmt in node.body
           if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
           and not stmt.target.id.startswith("_") and "ClassVar" not in ast.unparse(stmt.annotation)]
    return list(dict.fromkeys(inherited + own))


def _field_keys() -> set[str]:
    classes = _model_classes()
    return {f"{home}.{field}" for name, homes in HOMES.items() for home in homes for field in _fields(name, classes)}


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


def test_every_config_class_has_a_home():
    unplaced = sorted(set(_model_classes()) - set(HOMES) - BASES)
    assert not unplaced, f"add these classes to HOMES in tests/test_docs.py (where they sit in the parameters): {unplaced}"
    assert set(HOMES) <= set(_model_classes()), f"HOMES names classes that are gone: {set(HOMES) - set(_model_classes())}"


def test_no_row_documents_a_key_that_is_gone():
    keys = _field_keys() | {key for env in ("base", "paper") for key in _yaml_keys(_parameters(env))}
    known = {row for key in keys for row in _rows_for(key)}
    stale = sorted(_documented() - known)
    assert not stale, "docs/configuration.md documents keys no YAML file or config class has:\n  " + "\n  ".join(stale)
