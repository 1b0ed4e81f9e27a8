"""Shared fixtures: the project's real configuration, shrunk where a test needs speed."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

import spavl_kedro  # noqa: F401  (first: it pins the CPU kernels before any test imports torch, numerics.py)
from spavl_kedro import paper_dryrun
from spavl_kedro.config import load_parameters

PROJECT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def base_params() -> dict:
    return load_parameters("base")


@pytest.fixture
def params(base_params) -> dict:
    return copy.deepcopy(base_params)


@pytest.fixture(scope="session")
def taxonomy_spec() -> dict:
    return yaml.safe_load((PROJECT / "data/01_raw/taxonomy.yml").read_text())


@pytest.fixture(scope="session")
def seed_text() -> dict:
    """Every form of each kind of answer, grammars expanded (`guard.answer_forms`)."""
    from spavl_kedro.judges.guard import answer_forms

    return answer_forms(yaml.safe_load((PROJECT / "data/01_raw/seed_text.yml").read_text()))


def copy_project(root: Path) -> Path:
    """A runnable copy of this project's conf/base and raw seeds at `root` (paper_dryrun.copy_project)."""
    return paper_dryrun.copy_project(PROJECT, root)


def shrink_taxonomy(root: Path, domains: int = 2, categories: int = 1, subcategories: int = 2) -> None:
    """Cut the project copy's taxonomy.yml to the first `domains` x `categories` x `subcategories` (pass the
    matching taxonomy.* counts as parameters), for runs that need the whole chain but not 53 subcategories."""
    spec = yaml.safe_load((PROJECT / "data/01_raw/taxonomy.yml").read_text())
    spec["domains"] = spec["domains"][:domains]
    for domain in spec["domains"]:
        domain["categories"] = domain["categories"][:categories]
        for category in domain["categories"]:
            category["subcategories"] = category["subcategories"][:subcategories]
    (root / "data/01_raw/taxonomy.yml").write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(autouse=True)
def _no_active_mlflow_run(monkeypatch):
    """Each test starts outside any MLflow run and experiment. An in-process KedroSession (the end-to-end
    tests) leaves kedro-mlflow's experiment selected, and can leave its run active, in the process; a later
    test's own `mlflow.start_run` against another store would then fail or nest."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # no public way to unselect an experiment
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


# The modules whose one fixture runs a whole world (minutes each), longest first. `make test` hands whole
# modules to two workers in collection order (--dist loadfile): started first, they run beside the many short
# modules instead of leaving one worker alone with a long one at the end.
LONGEST_FIRST = ("test_faults.py", "test_pipelines.py", "test_end_to_end.py")


def pytest_collection_modifyitems(items):
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
