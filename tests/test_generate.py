"""Unit tests of the generate stage: writers, screening, MIS samples and targets, resumable response shards.

Models are real tiny LLaVAs built offline (random weights where only the plumbing is under test).
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from spavl_kedro.config import GenerateConfig, ScreenConfig
from spavl_kedro.datasets.shards import ShardDataset
from spavl_kedro.models.specs import TinyModelConfig
from spavl_kedro.models.tiny import VLM, build_model, build_processor
from spavl_kedro.pipelines.generate.mis import compose_mis_samples, split_cot, write_cot_targets
from spavl_kedro.pipelines.generate.nodes import collect_images
from spavl_kedro.pipelines.generate.questions import parse_label, screen_questions, write_questions
from spavl_kedro.pipelines.generate.responses import collect_responses, plan_response_shards
from spavl_kedro.pipelines.taxonomy.nodes import build_taxonomy
from spavl_kedro.schema import TABLES

SUBCATEGORIES = 6


@pytest.fixture(scope="module")
def world(base_params, taxonomy_spec):
    params = copy.deepcopy(base_params)
    taxonomy = build_taxonomy(taxonomy_spec, {}, params["taxonomy"])
    # two domains' worth of subcategories, so mis_hard finds partners in another category
    taxonomy = pd.concat([taxonomy.iloc[:3], taxonomy.iloc[-3:]], ignore_index=True)
    gen = params["generate"]
    gen["images"]["per_subcategory"] = 2
    images, _, _ = collect_images(taxonomy, pd.DataFrame(), gen)
    return {"params": params, "taxonomy": taxonomy, "images": images}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny LLaVA saved as a model directory, loadable as kind 'transformers'."""
    processor = build_processor(
        ["a question about a picture", "Perception: Reasoning: Answer: unsafe safe"] * 20, TinyModelConfig()
    )
    model = build_model(processor, TinyModelConfig(), seed=0)
    path = tmp_path_factory.mktemp("tiny") / "vlm"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path), VLM(model=model, processor=processor)


def _generate(world, **overrides):
    gen = copy.deepcopy(world["params"]["generate"])
    for dotted, value in overrides.items():
        node = gen
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    return gen


def _questions(world, gen):
    spa = write_questions(world["images"], world["taxonomy"], {}, gen)
    mis = compose_mis_samples(world["images"], world["taxonomy"], gen)
    return screen_questions(spa, mis, world["images"], {}, gen)


def test_template_questions_are_screened_and_counted(world):
    gen = world["params"]["generate"]
    questions, counts = _questions(world, gen)
    assert list(questions.columns) == TABLES["questions"]
    assert list(counts.columns) == TABLES["question_screening"]
    n_images = len(world["images"])
    assert questions["qtype"].value_counts().to_dict() == {
        "easy": n_images,
        "hardq": n_images,
        "hards": n_images,
        "mis_easy": SUBCATEGORIES,
        "mis_hard": SUBCATEGORIES,
    }
    # the templates are written so the lexicon screen finds every hard question harmful, every easy one not
    hard = questions[questions["qtype"].isin(["hardq", "hards"])]
    assert hard["harmful"].all() and hard["kept"].all()
    assert not questions.loc[questions["qtype"] == "easy", "harmful"].any()
    assert counts["total"].sum() == len(questions)
    assert (counts["kept"] + counts["dropped"] == counts["total"]).all()


def test_screen_drops_benign_hard_questions_with_reason(world):
    # a hardq grammar with no harm marker: the screen calls it benign and the keep rule drops it
    gen = _generate(world, **{"questions.wording.hardq.frames": [["what colour the {keyword} here is"]]})
    questions, counts = _questions(world, gen)
    hardq = questions[questions["qtype"] == "hardq"]
    assert not hardq["kept"].any()
    assert (hardq["drop_reason"] == "judged benign (type needs harmful)").all()
    row = counts[counts["qtype"] == "hardq"]
    assert row["dropped"].sum() == len(hardq) and row["kept"].sum() == 0


def test_guard_labels_parse_whole_words():
    screen = ScreenConfig(judge="lexicon", harm_markers=["x"])
    assert parse_label("unsafe\nO5", screen) is True
    assert parse_label("Safe.", screen) is False
    assert parse_label("I think it is unsafe", screen) is None  # not the first word: undecided
    assert parse_label("", screen) is None


def test_model_screen_with_unparsable_output_never_keeps_a_hard_question(world, tiny_dir):
    path, _ = tiny_dir
    backend = {"name": "screen", "kind": "transformers", "model": path}
    gen = _generate(
        world, **{"questions.screen": {"judge": "model", "backend": backend, "prompt": "Is this harmful? {question}"}}
    )
    questions, counts = _questions(world, gen)
    # a random model does not answer 'safe' or 'unsafe': every verdict is undecided, never read as safe
    assert questions["harmful"].isna().all()
    hard = questions[questions["qtype"].isin(["hardq", "hards"])]
    assert not hard["kept"].any() and (hard["drop_reason"] == "undecided by the screen").all()
    assert counts["undecided"].sum() == len(questions)


def test_model_writer_prompts_a_vlm_with_the_image(world, tiny_dir):
    path, _ = tiny_dir
    writer = {
        "backend": {
            "name": "tiny-writer",
            "kind": "transformers",
            "model": path,
            "generation": {"max_new_tokens": 8, "do_sample": False},
        },
        "prompts": {
            "easy": "Ask about {caption}",
            "hardq": "Ask harmfully about {subcategory}",
            "hards": "Demand {subcategory} from {description}",
        },
    }
    gen = _generate(world, **{"questions.writer": "model", "questions.model_writer": writer})
    spa = write_questions(world["images"], world["taxonomy"], {}, gen)
    assert len(spa) == 3 * len(world["images"])
    assert (spa["writer"] == "tiny-writer").all()
    # every question is either written or carries the reason it is not
    assert ((spa["text"].str.len() > 0) | spa["error"].notna()).all()


def test_mis_samples_pair_two_images(world):
    gen = world["params"]["generate"]
    mis = compose_mis_samples(world["images"], world["taxonomy"], gen)
    assert (mis["image_ids"].map(len) == 2).all()
    assert (mis["image_ids"].map(lambda ids: ids[0] != ids[1])).all()
    meta = world["images"].set_index("image_id")
    for row in mis.itertuples(index=False):
        first, second = (meta.loc[i] for i in row.image_ids)
        if row.qtype == "mis_easy":  # the harm is in the images: both from the subcategory
            assert first.class3 == second.class3 == row.class3
        else:  # only the combination is risky: the second image comes from another category
            assert second.class2 != row.class2


def test_template_cot_targets_have_three_marked_parts(world):
    gen = world["params"]["generate"]
    questions, _ = _questions(world, gen)
    cot = write_cot_targets(questions, world["images"], world["taxonomy"], {}, gen)
    assert list(cot.columns) == TABLES["mis_cot"]
    assert len(cot) == 2 * SUBCATEGORIES and cot["error"].isna().all()
    assert cot["perception"].str.contains("Image-1 shows").all()
    assert cot["answer"].str.contains("I cannot help").all()  # a refusal string: keyword judges read it too
    parts = split_cot(cot["target"].iloc[0], gen["mis"]["teacher"]["markers"])
    assert parts == {
        "perception": cot["perception"].iloc[0],
        "reasoning": cot["reasoning"].iloc[0],
        "answer": cot["answer"].iloc[0],
    }


def test_model_teacher_output_without_markers_is_kept_with_error(world, tiny_dir):
    path, _ = tiny_dir
    teacher = {
        "kind": "model",
        "backend": {"name": "tiny-teacher", "kind": "transformers", "model": path, "generation": {"max_new_tokens": 6}},
    }
    gen = _generate(world, **{"mis.teacher": teacher})
    questions, _ = _questions(world, gen)
    cot = write_cot_targets(questions, world["images"], world["taxonomy"], {}, gen)
    assert len(cot) == 2 * SUBCATEGORIES  # two-image prompts reached the model, every sample has a row
    assert cot["error"].str.startswith("target lacks a marked part").all()
    assert cot["perception"].isna().all()


def _shard_world(world, tiny_dir):
    gen = copy.deepcopy(world["params"]["generate"])
    gen["shard_size"] = 5
    gen["generation"]["max_new_tokens"] = 4
    gen["responders"] = gen["responders"][:2]
    questions, _ = _questions(world, gen)
    _, vlm = tiny_dir
    models = {r["name"]: vlm for r in gen["responders"]}
    return gen, questions, models


def test_response_shards_resume_and_retry_only_failed_records(world, tiny_dir, tmp_path):
    gen, questions, models = _shard_world(world, tiny_dir)
    store = ShardDataset(path=str(tmp_path / "shards"), dataset="pandas.ParquetDataset", filename_suffix=".parquet")
    work, plan = plan_response_shards(questions, world["images"], models, {}, store.load(), gen)
    n_kept = int(questions["kept"].sum())
    assert len(work) == 2 * -(-n_kept // 5) and list(plan["shard_id"]) == list(work)
    assert plan["records"].sum() == 2 * n_kept
    store.save(work)
    assert plan_response_shards(questions, world["images"], models, {}, store.load(), gen)[0] == {}

    # mark two records of one shard as failed: a rerun asks only those two again, keeping the rest
    shard_id = sorted(work)[1]
    shard = store.load()[shard_id]()
    kept_text = shard["text"].iloc[2:].tolist()
    shard.loc[:1, "error"] = "HTTP 503 after 5 attempts"
    store.save({shard_id: shard})
    again, _ = plan_response_shards(questions, world["images"], models, {}, store.load(), gen)
    assert list(again) == [shard_id]
    store.save(again)
    redone = store.load()[shard_id]()
    assert redone["error"].isna().all() and redone["text"].iloc[2:].tolist() == kept_text

    responses = collect_responses(store.load(), plan, questions, gen)
    assert len(responses) == n_kept * 2
    assert not responses.duplicated(["question_id", "responder"]).any()


def test_changed_config_answers_shards_anew(world, tiny_dir, tmp_path):
    gen, questions, models = _shard_world(world, tiny_dir)
    store = ShardDataset(path=str(tmp_path / "shards"), dataset="pandas.ParquetDataset", filename_suffix=".parquet")
    store.save(plan_response_shards(questions, world["images"], models, {}, store.load(), gen)[0])
    gen["generation"]["temperature"] = 0.5  # different answers: nothing on disk may be reused
    work, plan = plan_response_shards(questions, world["images"], models, {}, store.load(), gen)
    assert len(work) == 2 * -(-int(questions["kept"].sum()) // 5)
    with pytest.raises(ValueError, match="written for other inputs or config"):
        collect_responses(store.load(), plan, questions, gen)  # the new plan, before its shards are written
    with pytest.raises(ValueError, match="is missing: rerun the stage"):
        collect_responses({}, plan, questions, gen)


def test_generate_config_names_bad_keys(world):
    gen = copy.deepcopy(world["params"]["generate"])
    gen["responders"].append({"name": "remote", "kind": "openai", "model": "m"})
    with pytest.raises(ValueError, match="'remote' \\(kind openai\\) needs base_urls"):
        GenerateConfig.model_validate(gen)


def test_rebootstrapped_tiny_responder_answers_anew(world, tiny_dir, tmp_path):
    """Same name, same config, new weights (tiny.* changed, no `make clean`): its old answers are not reused."""
    gen, questions, models = _shard_world(world, tiny_dir)
    store = ShardDataset(path=str(tmp_path / "shards"), dataset="pandas.ParquetDataset", filename_suffix=".parquet")
    store.save(plan_response_shards(questions, world["images"], models, {}, store.load(), gen)[0])
    name = gen["responders"][0]["name"]
    retrained = copy.deepcopy(models[name])
    with torch.no_grad():
        next(retrained.model.parameters()).add_(1e-3)
    work, _ = plan_response_shards(questions, world["images"], {**models, name: retrained}, {}, store.load(), gen)
    assert work and {shard_id.split("/")[0] for shard_id in work} == {name}
    assert plan_response_shards(questions, world["images"], models, {}, store.load(), gen)[0] == {}
