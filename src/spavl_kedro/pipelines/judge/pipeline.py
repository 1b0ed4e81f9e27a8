from kedro.pipeline import Node, Pipeline

from .nodes import (
    bootstrap_guards,
    collect_verdicts,
    judge_agreement,
    judge_templates,
    pair_preferences,
    plan_verdict_shards,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                bootstrap_guards,
                ["seed_corpus", "tiny_foundation", "seed_text", "params:judge", "params:tiny"],
                "judge_models",
                name="bootstrap_guards",
            ),
            Node(
                plan_verdict_shards,
                [
                    "responses",
                    "questions",
                    "images",
                    "api_credentials",
                    "verdict_shards_done",
                    "params:judge",
                    "judge_models",
                    "api_spend",
                    "params:costs",
                ],
                ["verdict_shards", "verdict_plan"],
                name="plan_verdict_shards",
            ),
            Node(
                collect_verdicts,
                ["verdict_shards", "verdict_plan", "responses", "params:judge"],
                "verdicts",
                name="collect_verdicts",
            ),
            Node(
                pair_preferences,
                [
                    "questions",
                    "responses",
                    "verdicts",
                    "images",
                    "api_credentials",
                    "params:judge",
                    "api_spend",
                    "params:costs",
                ],
                ["preferences", "pair_outcomes", "judge_metrics"],
                name="pair_preferences",
            ),
            Node(
                judge_agreement,
                ["verdicts", "responses", "questions", "pair_outcomes", "params:judge", "params:generate"],
                ["judge_agreement", "judge_accuracy", "judge_agreement_metrics", "judge_report"],
                name="measure_judge_agreement",
            ),
            Node(judge_templates, "params:judge", "judge_template_params", name="name_judge_templates"),
        ]
    )
