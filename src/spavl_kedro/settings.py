"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from spavl_kedro.config import MERGE_STRATEGY
from spavl_kedro.hooks import ProjectHooks, RunDescription

_CHECKED = ProjectHooks()
HOOKS = (_CHECKED, RunDescription(_CHECKED))

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    "merge_strategy": MERGE_STRATEGY,  # key by key (config.py says why)
}
