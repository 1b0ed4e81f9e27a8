from kedro.pipeline import Node, Pipeline

from .nodes import answer_policies, score_answers


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(answer_policies, ["policy_base", "aligned_models", "test_harm", "test_help", "params:evaluate"],
             "answers", name="answer_policies"),
        Node(score_answers, ["answers", "api_credentials", "params:judge"],
             ["eval_scores", "eval_metrics", "eval_report"], name="score_answers"),
    ])
