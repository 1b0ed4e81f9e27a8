from functools import partial

from kedro.pipeline import Node, Pipeline

from .nodes import answer_tests, merge_adapter, score_answers


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(merge_adapter, ["policy_base", "policy_dpo_adapter"], "policy_dpo", name="merge_adapter"),
        Node(partial(answer_tests, model="base"), ["policy_base", "test_harm", "test_help", "params:evaluate"],
             "answers_base", name="answer_tests_base"),
        Node(partial(answer_tests, model="dpo"), ["policy_dpo", "test_harm", "test_help", "params:evaluate"],
             "answers_dpo", name="answer_tests_dpo"),
        Node(score_answers, ["answers_base", "answers_dpo", "api_credentials", "params:judge"],
             ["eval_scores", "eval_metrics", "eval_report"], name="score_answers"),
    ])
