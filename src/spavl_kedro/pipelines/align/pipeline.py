from kedro.pipeline import Node, Pipeline

from .nodes import prepare_policy, train_dpo_policy


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(prepare_policy, ["seed_corpus", "images", "tiny_processor", "params:align", "params:tiny"],
             "policy_base", name="prepare_policy"),
        Node(train_dpo_policy, ["policy_base", "train", "validation", "params:align"],
             ["policy_dpo_adapter", "dpo_summary"], name="train_dpo_policy"),
    ])
