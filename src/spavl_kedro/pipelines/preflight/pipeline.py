from kedro.pipeline import Node, Pipeline

from .nodes import preflight_verdict, run_preflight


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                run_preflight,
                ["parameters", "api_credentials"],
                ["preflight_checks", "preflight_report", "preflight_estimate"],
                name="run_preflight",
            ),
            Node(preflight_verdict, "preflight_checks", None, name="preflight_verdict"),
        ]
    )
