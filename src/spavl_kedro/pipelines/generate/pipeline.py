from kedro.pipeline import Node, Pipeline

from .nodes import (bootstrap_responders, build_seed_corpus, build_tiny_processor, collect_responses,
                    render_images, write_questions)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(render_images, ["taxonomy", "params:generate"], "images", name="render_images"),
        Node(write_questions, ["images", "taxonomy", "params:generate"], "questions", name="write_questions"),
        Node(build_seed_corpus, ["images", "taxonomy", "seed_text", "params:generate"], "seed_corpus",
             name="build_seed_corpus"),
        Node(build_tiny_processor, ["seed_corpus", "questions", "params:tiny"], "tiny_processor",
             name="build_tiny_processor"),
        Node(bootstrap_responders, ["seed_corpus", "images", "tiny_processor", "params:generate", "params:tiny"],
             "responder_models", name="bootstrap_responders"),
        Node(collect_responses, ["questions", "images", "responder_models", "params:generate"], "responses",
             name="collect_responses"),
    ])
