from kedro.pipeline import Node, Pipeline

from .nodes import build_taxonomy


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_taxonomy,
                inputs=["taxonomy_spec", "spa_vl_official", "params:taxonomy"],
                outputs="taxonomy",
                name="build_taxonomy",
            ),
        ]
    )
