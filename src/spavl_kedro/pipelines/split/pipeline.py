from kedro.pipeline import Node, Pipeline

from .nodes import split_dataset
from .release import export_release, export_rlhf_pairs, write_dataset_card


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                split_dataset,
                [
                    "preferences",
                    "questions",
                    "images",
                    "mis_cot",
                    "verdicts",
                    "params:split",
                    "params:judge",
                    "params:generate",
                ],
                ["train", "validation", "test_harm", "test_help", "mis_train", "pair_provenance", "split_metrics"],
                name="split_dataset",
            ),
            Node(
                write_dataset_card,
                [
                    "train",
                    "validation",
                    "test_harm",
                    "test_help",
                    "pair_provenance",
                    "questions",
                    "seed_corpus",
                    "params:split",
                    "params:judge",
                    "params:generate",
                ],
                "dataset_card",
                name="write_dataset_card",
            ),
            Node(
                export_release,
                ["train", "validation", "test_harm", "test_help", "dataset_card"],
                "spa_vl_release",
                name="export_release",
            ),
            Node(
                export_rlhf_pairs,
                ["train", "validation", "pair_provenance", "preferences", "images"],
                "spa_vl_rlhf",
                name="export_rlhf_pairs",
            ),
        ]
    )
