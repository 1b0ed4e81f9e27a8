from kedro.pipeline import Node, Pipeline

from .nodes import judge_responses, pair_preferences


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(judge_responses, ["responses", "params:judge"], "verdicts", name="judge_responses"),
        Node(pair_preferences, ["questions", "responses", "verdicts", "params:judge"],
             ["preferences", "judge_metrics"], name="pair_preferences"),
    ])
