from kedro.pipeline import Node, Pipeline

from .nodes import prepare_policy, select_training_pairs, train_aligned


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(prepare_policy, ["seed_corpus", "tiny_foundation", "params:align", "params:tiny"],
             "policy_base", name="prepare_policy"),
        Node(select_training_pairs, ["spa_vl_release", "spa_vl_official", "params:align"],
             ["align_train", "align_validation"], name="select_training_pairs"),
        Node(train_aligned, ["policy_base", "align_train", "align_validation", "mis_train", "images",
                             "seed_corpus", "aligned_models_before", "api_credentials", "judge_models", "params:align",
                             "params:judge"],
             ["aligned_models", "align_summary", "align_run_params"], name="train_aligned"),
    ])
