from kedro.pipeline import Node, Pipeline

from .nodes import split_dataset


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(split_dataset, ["preferences", "questions", "images", "params:split"],
             ["train", "validation", "test_harm", "test_help"], name="split_dataset"),
    ])
