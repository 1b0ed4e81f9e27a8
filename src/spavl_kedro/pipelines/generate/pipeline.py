from kedro.pipeline import Node, Pipeline

from .mis import compose_mis_samples, write_cot_targets
from .nodes import (
    bootstrap_foundation,
    bootstrap_responders,
    build_seed_corpus,
    build_tiny_processor,
    collect_images,
    render_seed_images,
    summarise_generation,
)
from .questions import screen_questions, write_questions
from .responses import collect_responses, plan_response_shards


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                collect_images,
                ["taxonomy", "image_records", "params:generate"],
                ["images", "image_quarantine", "image_report"],
                name="collect_images",
            ),
            Node(
                write_questions,
                ["images", "taxonomy", "api_credentials", "params:generate", "api_spend", "params:costs"],
                "spa_questions",
                name="write_questions",
            ),
            Node(
                compose_mis_samples,
                ["images", "taxonomy", "params:generate"],
                "mis_questions",
                name="compose_mis_samples",
            ),
            Node(
                screen_questions,
                [
                    "spa_questions",
                    "mis_questions",
                    "images",
                    "api_credentials",
                    "params:generate",
                    "api_spend",
                    "params:costs",
                ],
                ["questions", "question_screening"],
                name="screen_questions",
            ),
            Node(
                write_cot_targets,
                ["questions", "images", "taxonomy", "api_credentials", "params:generate", "api_spend", "params:costs"],
                "mis_cot",
                name="write_cot_targets",
            ),
            Node(
                render_seed_images,
                ["taxonomy", "images", "params:generate"],
                ["seed_images", "seed_scenes"],
                name="render_seed_images",
            ),
            Node(
                build_seed_corpus,
                ["seed_images", "seed_scenes", "taxonomy", "seed_text", "params:generate"],
                "seed_corpus",
                name="build_seed_corpus",
            ),
            Node(
                build_tiny_processor,
                ["seed_corpus", "questions", "mis_cot", "params:judge", "params:tiny"],
                "tiny_processor",
                name="build_tiny_processor",
            ),
            Node(
                bootstrap_foundation,
                ["seed_corpus", "seed_scenes", "tiny_processor", "params:tiny"],
                "tiny_foundation",
                name="bootstrap_foundation",
            ),
            Node(
                bootstrap_responders,
                ["seed_corpus", "tiny_foundation", "params:generate", "params:tiny"],
                "responder_models",
                name="bootstrap_responders",
            ),
            Node(
                plan_response_shards,
                [
                    "questions",
                    "images",
                    "responder_models",
                    "api_credentials",
                    "response_shards_done",
                    "params:generate",
                    "api_spend",
                    "params:costs",
                ],
                ["response_shards", "response_plan"],
                name="plan_response_shards",
            ),
            Node(
                collect_responses,
                ["response_shards", "response_plan", "questions", "params:generate"],
                "responses",
                name="collect_responses",
            ),
            Node(
                summarise_generation,
                ["image_report", "image_quarantine", "questions", "mis_cot", "responses"],
                "generate_metrics",
                name="summarise_generation",
            ),
        ]
    )
