"""evaluate: evaluation sets -> every policy answers (sharded) -> every scorer scores (sharded) -> metrics,
report, plots and the item-by-item table; help items without a reference answer get one from the reference
responder first. See sets.py, references.py, answers.py, scoring.py, report.py and browse.py."""

from kedro.pipeline import Node, Pipeline

from spavl_kedro.evalsets.registry import published_names
from spavl_kedro.training.methods import METHODS

from .answers import collect_eval_answers, gather_aligned_models, plan_eval_shards
from .browse import item_table
from .judging import judges_on_policies
from .references import collect_reference_answers, plan_reference_answers
from .report import policy_runs, summarise_eval
from .scoring import collect_eval_scores, plan_score_shards, score_gold_cot
from .sets import build_eval_sets


def _published(**tables):
    return tables


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                _published,
                {name: f"published_{name}" for name in published_names()},
                "published_eval_sets",
                name="gather_published_eval_sets",
            ),
            Node(
                build_eval_sets,
                [
                    "test_harm",
                    "test_help",
                    "questions",
                    "images",
                    "responses",
                    "published_eval_sets",
                    "spa_vl_official",
                    "seed_corpus",
                    "seed_scenes",
                    "params:evaluate",
                ],
                ["eval_items", "eval_set_summary"],
                name="build_eval_sets",
            ),
            Node(
                plan_reference_answers,
                [
                    "eval_items",
                    "responder_models",
                    "api_credentials",
                    "reference_answer_shards_done",
                    "params:evaluate",
                    "params:generate",
                    "api_spend",
                    "params:costs",
                ],
                ["reference_answer_shards", "reference_answer_plan"],
                name="plan_reference_answers",
            ),
            Node(
                collect_reference_answers,
                [
                    "reference_answer_shards",
                    "reference_answer_plan",
                    "eval_items",
                    "params:evaluate",
                    "params:generate",
                ],
                "reference_answers",
                name="collect_reference_answers",
            ),
            Node(
                gather_aligned_models,
                {name: f"aligned_{name}" for name in METHODS},
                "aligned_models",
                name="gather_aligned_models",
            ),
            Node(
                plan_eval_shards,
                [
                    "eval_items",
                    "policy_base",
                    "aligned_models",
                    "eval_answer_shards_done",
                    "api_credentials",
                    "params:evaluate",
                    "api_spend",
                    "params:costs",
                    "policy_bases",
                ],
                ["eval_answer_shards", "eval_answer_plan"],
                name="plan_eval_answers",
            ),
            Node(
                collect_eval_answers,
                ["eval_answer_shards", "eval_answer_plan", "eval_items"],
                "eval_answers",
                name="collect_eval_answers",
            ),
            Node(
                plan_score_shards,
                [
                    "eval_answers",
                    "eval_items",
                    "api_credentials",
                    "eval_score_shards_done",
                    "params:evaluate",
                    "params:judge",
                    "judge_models",
                    "reference_answers",
                    "api_spend",
                    "params:costs",
                ],
                ["eval_score_shards", "eval_score_plan"],
                name="plan_eval_scores",
            ),
            Node(
                collect_eval_scores, ["eval_score_shards", "eval_score_plan"], "eval_scores", name="collect_eval_scores"
            ),
            Node(
                score_gold_cot,
                [
                    "mis_cot",
                    "eval_items",
                    "api_credentials",
                    "params:judge",
                    "params:evaluate",
                    "judge_models",
                    "api_spend",
                    "params:costs",
                ],
                ["gold_cot_scores", "gold_cot_metrics"],
                name="score_gold_cot",
            ),
            Node(
                judges_on_policies,
                ["eval_answers", "eval_scores", "eval_items", "params:evaluate", "params:judge", "params:generate"],
                "eval_judge_accuracy",
                name="measure_judges_on_policies",
            ),
            Node(
                summarise_eval,
                [
                    "eval_scores",
                    "eval_items",
                    "params:evaluate",
                    "params:judge",
                    "reference_answers",
                    "params:align",
                    "eval_judge_accuracy",
                ],
                ["eval_metrics_table", "eval_metrics", "eval_report", "eval_plot_domains", "eval_plot_tradeoff"],
                name="summarise_eval",
            ),
            Node(
                policy_runs,
                ["eval_metrics_table", "eval_items", "params:evaluate", "params:judge"],
                "eval_policy_runs",
                name="log_policy_runs",
            ),
            Node(
                item_table, ["eval_items", "eval_answers", "eval_scores"], "eval_item_table", name="tabulate_eval_items"
            ),
        ]
    )
