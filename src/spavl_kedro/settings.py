"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from spavl_kedro.hooks import ProjectHooks

HOOKS = (ProjectHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    # An environment (conf/paper) overrides single keys deep inside a block; the default (destructive)
    # merge would replace the whole `generate:` block with the few keys the environment sets.
    "merge_strategy": {"parameters": "soft", "catalog": "soft"},
}
