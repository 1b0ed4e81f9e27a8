"""Shared fixtures: the project's real configuration, shrunk where a test needs speed."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml
from kedro.config import OmegaConfigLoader

PROJECT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def base_params() -> dict:
    loader = OmegaConfigLoader(conf_source=str(PROJECT / "conf"), base_env="base", default_run_env="base")
    return dict(loader["parameters"])


@pytest.fixture
def params(base_params) -> dict:
    return copy.deepcopy(base_params)


@pytest.fixture(scope="session")
def taxonomy_spec() -> dict:
    return yaml.safe_load((PROJECT / "data/01_raw/taxonomy.yml").read_text())


@pytest.fixture(scope="session")
def seed_text() -> dict:
    return yaml.safe_load((PROJECT / "data/01_raw/seed_text.yml").read_text())


def copy_project(root: Path) -> Path:
    """A runnable copy of the project at `root`: configuration, raw seeds, an empty conf/local. The package
    itself is the installed one; Kedro only checks that src/ exists."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT / "pyproject.toml", root)
    shutil.copytree(PROJECT / "conf" / "base", root / "conf" / "base")
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()
    shutil.copytree(PROJECT / "data" / "01_raw", root / "data" / "01_raw")
    return root


@pytest.fixture(autouse=True)
def _no_active_mlflow_run():
    """Each test starts outside any MLflow run. An in-process KedroSession (the end-to-end tests) can leave
    kedro-mlflow's run active in the process; a later test's own `mlflow.start_run` would then fail or nest."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
