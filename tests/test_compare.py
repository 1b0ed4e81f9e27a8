"""Reading runs back from an MLflow store: the per-policy trade-off table and the data-scale curve."""

from __future__ import annotations

import mlflow
import pytest

from spavl_kedro import compare


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("spavl")
    # an old run and a newer one that re-evaluated base and dpo: the newer values win
    for base_unsafe, dpo_unsafe in ((0.9, 0.5), (1.0, 0.2)):
        with mlflow.start_run(run_name="evaluate"):
            mlflow.log_metrics(
                {
                    "eval/base/test_harm/unsafe_rate.keyword": base_unsafe,
                    "eval/dpo/test_harm/unsafe_rate.keyword": dpo_unsafe,
                    "eval/dpo/test_harm/unsafe_rate.lower": 0.7,  # another judge: not mixed in
                    "eval/base/test_help/win_rate.helpfulness_rule": 0.8,
                    "eval/dpo/test_help/win_rate.helpfulness_rule": 0.4,
                }
            )
    # a sweep over data scale: each run trains and evaluates its own policy
    for pairs, unsafe in ((100, 0.6), (1000, 0.3), (30, 0.9)):
        with mlflow.start_run(run_name=f"dpo-{pairs}"):
            # what the align nodes log: every trained model with its method and data size (SFT trained too)
            mlflow.log_params(
                {
                    "align.method": "dpo",
                    f"align.trained.dpo-{pairs}.method": "dpo",
                    f"align.trained.dpo-{pairs}.train_examples": pairs,
                    "align.trained.sft.method": "sft",
                    "align.trained.sft.train_examples": 40,
                }
            )
            mlflow.log_metrics(
                {
                    f"eval/dpo-{pairs}/test_harm/unsafe_rate.keyword": unsafe,
                    "eval/base/test_harm/unsafe_rate.keyword": 1.0,
                }
            )
            with mlflow.start_run(run_name="dpo", nested=True):  # the training's child run is not a kedro run
                mlflow.log_metric("loss", 0.5)
    return uri


def test_policy_table_takes_each_policys_latest_evaluation_by_the_named_judge(store):
    runs = compare.load_runs(store)
    assert len(runs) == 5  # the nested training runs are left out
    table = compare.policy_table(runs, "keyword", "helpfulness_rule").set_index("model")
    assert table.loc["dpo", "unsafe_rate"] == 0.2 and table.loc["dpo", "win_rate"] == 0.4
    assert table.loc["base", "unsafe_rate"] == 1.0
    assert set(table.index) == {"base", "dpo", "dpo-30", "dpo-100", "dpo-1000"}


def test_scale_curve_pairs_each_run_with_its_own_policy(store):
    curve = compare.scale_curve(compare.load_runs(store), "keyword")
    assert list(curve["train_pairs"]) == [30, 100, 1000]
    assert list(curve["unsafe_rate"]) == [0.9, 0.6, 0.3]
    assert set(curve["method"]) == {"dpo"}


def test_cli_writes_the_comparison(store, tmp_path):
    compare.main(["--tracking-uri", store, "--out", str(tmp_path / "out")])
    text = (tmp_path / "out/run_comparison.md").read_text()
    assert "| dpo | 0.200 | 0.400 |" in text and "| dpo-1000 | dpo | 1000 | 0.300 |" in text
    assert (tmp_path / "out/run_comparison_scale.png").stat().st_size > 1000
