"""The six stages, runnable alone (`kedro run --pipeline align`) or together (`kedro run`), and `preflight`,
which checks what a configuration needs without running any stage (not part of the default run)."""

from kedro.pipeline import Pipeline

from spavl_kedro.pipelines import align, evaluate, generate, judge, preflight, split, taxonomy

STAGES = {
    "taxonomy": taxonomy,
    "generate": generate,
    "judge": judge,
    "split": split,
    "align": align,
    "evaluate": evaluate,
}


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {name: module.create_pipeline() for name, module in STAGES.items()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    pipelines["preflight"] = preflight.create_pipeline()
    return pipelines
