"""Project hooks: where runs log, and configuration checked before anything runs."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from kedro.framework.hooks import hook_impl

from spavl_kedro.config import validate_parameters
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.models.costs import cost_metrics
from spavl_kedro.numerics import PINNED, describe
from spavl_kedro.run_names import description, run_name, run_tags, runner_name

log = logging.getLogger(__name__)


class RunDescription:
    """Names, describes and tags the MLflow run kedro-mlflow opened for this `kedro run` (run_names.py).
    trylast: kedro-mlflow's own `before_pipeline_run` opens the run first."""

    def __init__(self, checked: ProjectHooks) -> None:
        self._checked = checked  # its before_pipeline_run (not trylast) has validated the blocks already
        self._env = "local"
        self._project: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._env, self._project = context.env or "local", context.project_path

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        if mlflow.active_run() is None:
            return
        configs = self._checked.configs
        pipelines = list(run_params.get("pipeline_names") or ["__default__"])
        name = run_name(pipelines, configs)
        mlflow.set_tags(
            {
                "mlflow.runName": name,
                "mlflow.note.content": description(name, pipelines),
                "runner": runner_name(run_params.get("runner")),  # kedro-mlflow copied its repr
                **run_tags(pipelines, self._env, configs, self._project or Path.cwd()),
            }
        )


class ProjectHooks:
    """Checks the parameter blocks once per run and hands the nodes the checked config objects."""

    def __init__(self) -> None:
        self._configs: dict[str, Any] = {}

    @property
    def configs(self) -> dict[str, Any]:
        """The checked config objects of this run's blocks, by block name."""
        return self._configs

    # tryfirst: kedro-mlflow reads MLFLOW_TRACKING_URI in its own after_context_created, which must see ours.
    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Default MLflow store: an SQLite file in the project, by absolute path (MLflow 3.17 refuses a
        ./mlruns file store). A `server.mlflow_tracking_uri` in mlflow.yml still takes precedence."""
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(context.project_path / 'mlflow.db').resolve()}"
        # Kedro 1.x builds a pydantic-typed `params:` input itself unless the hint is a union; the nodes' hints
        # (`AlignConfig | dict`) keep the catalog's blocks plain dicts, which kedro-mlflow logs as flat params
        # (align.dpo.beta), and `before_node_run` hands the nodes the objects checked with the cross-block
        # checks. Kedro says so once per union at every run; the warning tells nothing new.
        logging.getLogger("kedro.validation.type_extractor").setLevel(logging.ERROR)

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        """Fail on bad parameters before any model loads, naming each bad key; then seed everything."""
        params = catalog.load("parameters")
        self._configs = validate_parameters(params)
        log.info("numerics: %s", describe())
        if (
            os.environ.get("ATEN_CPU_CAPABILITY") == PINNED["ATEN_CPU_CAPABILITY"]
            and torch.backends.cpu.get_cpu_capability() != "AVX2"
        ):
            log.warning(
                "torch was imported before spavl_kedro pinned the CPU kernels: figures may differ from "
                "other machines' (export %s before starting)",
                " ".join(f"{k}={v}" for k, v in PINNED.items()),
            )
        self._preflight(params, pipeline, catalog)
        seed = int(params["generate"]["seed"])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @staticmethod
    def _preflight(params: dict[str, Any], pipeline, catalog) -> None:
        """The preflight gate: a run that loads a real model first checks what its pipelines' parameter
        blocks need (models, endpoints, keys, GPUs, RAM, disk, temp space), writes the preflight reports and
        stops, naming what is short, before any node runs. `preflight.gate: false` turns it off; the
        preflight pipeline itself is its own check."""
        from spavl_kedro.pipelines.preflight.nodes import gate, preflight_verdict

        nodes = pipeline.nodes if pipeline is not None else []
        if not nodes or "run_preflight" in {node.name for node in nodes}:
            return
        inputs = set().union(*(node.inputs for node in nodes))
        blocks = (
            set(params)
            if "parameters" in inputs
            else {name.removeprefix("params:").split(".")[0] for name in inputs if name.startswith("params:")}
        )
        found = gate(params, catalog.load("api_credentials"), blocks)
        if found is None:
            return
        checks, report, estimate = found
        catalog.save("preflight_checks", checks)
        catalog.save("preflight_report", report)
        catalog.save("preflight_estimate", estimate)
        log.info(
            "preflight: %d checks of %s before the first node (data/08_reporting/preflight_report.md)",
            len(checks),
            ", ".join(sorted(blocks)),
        )
        preflight_verdict(checks)

    @hook_impl
    def before_node_run(self, node, inputs) -> dict[str, Any] | None:
        """A node's `params:<block>` inputs become the config objects `before_pipeline_run` checked, so no
        node checks its block again. The catalog keeps the plain dicts, which kedro-mlflow logs as flat params.
        An input no run has written yet (an `OptionalDataset` loads as None) stops a node that does not take
        it missing (`takes_missing`), naming it."""
        allowed = getattr(node.func, "takes_missing", frozenset())
        absent = sorted(
            name
            for name, value in inputs.items()
            if value is None and name not in allowed and not name.startswith("params:")
        )
        if absent:
            raise ValueError(
                f"node {node.name}: {', '.join(absent)} not written yet: run the pipeline that writes "
                f"{'them' if len(absent) > 1 else 'it'} first (kedro-viz shows which)"
            )
        typed = {
            name: self._configs[name.removeprefix("params:")]
            for name in inputs
            if name.startswith("params:") and name.removeprefix("params:") in self._configs
        }
        return typed or None

    # tryfirst: kedro-mlflow's own hooks end the parent run; the cost metrics must reach it before.
    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._log_costs(catalog)

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        """Also when a stage failed, or stopped at its budget: the run then shows what was spent."""
        self._log_costs(catalog)

    def _log_costs(self, catalog) -> None:
        """The API spend ledger's tokens and estimated dollars (`models/costs.py`, `cost_metrics`) as metrics
        of the parent MLflow run; none when no API was ever called (the embedded default)."""
        costs = self._configs.get("costs")
        if costs is None or "api_spend" not in catalog or "api_cost_metrics" not in catalog:
            return
        ledger = catalog.load("api_spend")
        metrics = cost_metrics(ledger, costs.prices)
        if metrics:
            catalog.save("api_cost_metrics", for_mlflow(metrics))
            stages = {name: round(usd, 4) for name, usd in metrics.items() if name.count("/") == 2}  # cost/<stage>/usd
            log.info("API spend so far (%s): %s", ledger.where, stages or "no priced calls")
