"""One MLflow run per evaluated policy, nested under the `kedro run`'s run, so MLflow's runs table, compare view,
parallel coordinates and charts put base, DPO and SFT side by side: every policy run carries the same metric
names (`test_harm/unsafe_rate.tiny-guard`, ...), is named `eval · <policy>`, tagged `spavl.role: evaluation`
and `spavl.policy`, takes the evaluation sets as dataset inputs (context `evaluation`) and, when MLflow holds
the run that trained the policy (a training child run tagged `spavl.model`, the latest of that name), links
it (`spavl.trained_in_run`, and in its description). Outside an MLflow run saving only keeps the data.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import mlflow.data
from kedro.io import AbstractDataset, DatasetError
from mlflow.entities import DatasetInput, InputTag, Metric

from spavl_kedro.datasets.mlflow_metrics import BATCH

log = logging.getLogger(__name__)


class MlflowPolicyRunsDataset(AbstractDataset):
    """Saves {"metrics": {policy: {name: value}}, "items": {eval_set: DataFrame}}: a run per policy."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = metadata
        self._last: dict[str, Any] = {}

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict) or set(data) != {"metrics", "items"}:
            raise DatasetError("MlflowPolicyRunsDataset saves {'metrics': {policy: {...}}, 'items': {set: table}}")
        self._last = data
        parent = mlflow.active_run()
        if parent is None:
            log.debug("no active MLflow run: %d policy runs not logged", len(data["metrics"]))
            return
        client = mlflow.MlflowClient()
        experiment = parent.info.experiment_id
        inputs = [
            DatasetInput(
                mlflow.data.from_pandas(rows.reset_index(drop=True), name=f"eval: {name}")._to_mlflow_entity(),
                [InputTag("mlflow.data.context", "evaluation")],
            )
            for name, rows in sorted(data["items"].items())
        ]
        for policy, metrics in sorted(data["metrics"].items()):
            trained = trained_in(client, experiment, policy)
            tags = {
                "mlflow.parentRunId": parent.info.run_id,
                "spavl.role": "evaluation",
                "spavl.policy": policy,
                "mlflow.note.content": (
                    f"Evaluation of `{policy}` in the run `{parent.info.run_name}`"
                    + (f"; trained in run `{trained}`." if trained else "; no training run of it in this experiment.")
                ),
            }
            if trained:
                tags["spavl.trained_in_run"] = trained
            run = client.create_run(experiment, tags=tags, run_name=f"eval · {policy}")
            now = int(time.time() * 1000)
            batch = [Metric(name, float(value), now, 0) for name, value in sorted(metrics.items())]
            for start in range(0, len(batch), BATCH):
                client.log_batch(run.info.run_id, metrics=batch[start : start + BATCH])
            if inputs:
                client.log_inputs(run.info.run_id, datasets=inputs)
            client.set_terminated(run.info.run_id)

    def load(self) -> dict[str, Any]:
        return self._last

    def _describe(self) -> dict[str, Any]:
        return {}


def trained_in(client: mlflow.MlflowClient, experiment: str, policy: str) -> str | None:
    """The id of the latest run that trained `policy` (tags spavl.role training, spavl.model), if any."""
    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`spavl.role` = 'training' and tags.`spavl.model` = '{policy}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None
