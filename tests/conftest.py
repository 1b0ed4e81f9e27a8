"""Shared fixtures: the project's real configuration, shrunk where a test needs speed."""

from __future__ import annotations

import copy
import os
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
