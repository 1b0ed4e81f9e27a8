import re
from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError
from PIL import Image

from spavl_kedro.datasets import ModelDirectoryDataset
from spavl_kedro.models import tiny
from spavl_kedro.models.vlm import Prompt, TransformersVLM
from spavl_kedro.pipelines.generate.synthetic import render_image


@pytest.fixture(scope="module")
def vlm():
    cfg = tiny.TinyModelConfig(text_layers=1, vision_layers=1)
    processor = tiny.build_processor(["I'm sorry, I cannot help.", "Sure, here are the steps."] * 20, cfg)
    return tiny.VLM(tiny.build_model(processor, cfg, seed=0), processor)


def greedy(vlm, n_images=1):
    import random

    png = render_image("knife", (200, 40, 40), "circle", (250, 200, 0), 64, random.Random(0))
    prompts = [Prompt("What is shown?", (png,) * n_images)] * 3
    return [
        g.text
        for g in TransformersVLM("t", vlm, 2, {"max_new_tokens": 6, "do_sample": False}, progress=False).generate(
            prompts
        )
    ]


def test_tiny_llava_shape(vlm):
    assert sum(p.numel() for p in vlm.model.parameters()) < 2_000_000
    prompt = vlm.processor.apply_chat_template(tiny.user_message("hi", 2), add_generation_prompt=True)
    ids = vlm.processor(text=[prompt], images=[Image.new("RGB", (40, 40))] * 2, return_tensors="pt")["input_ids"]
    assert int((ids == vlm.model.config.image_token_id).sum()) == 2 * 16  # 16 tokens per image


def test_vlm_round_trip_generates_the_same(vlm, tmp_path):
    ds = ModelDirectoryDataset(str(tmp_path / "m"), kind="vlm")
    ds.save(vlm)
    assert greedy(ds.load()) == greedy(vlm)
    assert greedy(ds.load(), n_images=2) == greedy(vlm, n_images=2)  # two images per prompt work too


def test_collection_loads_lazily_by_name(vlm, tmp_path):
    ds = ModelDirectoryDataset(str(tmp_path / "pool"), kind="vlm", collection=True)
    ds.save({"a": vlm, "b": vlm})
    loaders = ds.load()
    assert sorted(loaders) == ["a", "b"]
    assert torch.equal(loaders["b"]().model.lm_head.weight, vlm.model.lm_head.weight)


def test_wrong_object_and_missing_directory_are_reported(vlm, tmp_path):
    with pytest.raises(DatasetError, match="expected a LoraAdapter"):
        ModelDirectoryDataset(str(tmp_path / "x"), kind="adapter").save(vlm)
    with pytest.raises(DatasetError, match="does not exist"):
        ModelDirectoryDataset(str(tmp_path / "none")).load()


def test_answering_models_follow_one_placement_rule(vlm, tmp_path, monkeypatch):
    """Responders, judges and evaluated policies: the GPUs when there are any (device_map auto), else the CPU in
    float32, whatever dtype the checkpoint holds; what is configured wins."""
    import copy

    from spavl_kedro.models import factory
    from spavl_kedro.models.vlm import answering_kwargs, place_for_answering

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert answering_kwargs({}) == {"dtype": torch.float32}
    assert answering_kwargs({"dtype": "bfloat16"}) == {"dtype": "bfloat16"}
    half = tiny.VLM(copy.deepcopy(vlm.model).half(), vlm.processor)
    placed = place_for_answering(half)
    assert {p.dtype for p in placed.model.parameters()} == {torch.float32}
    assert greedy(placed) == greedy(vlm)  # back in float32 it answers as the original
    with pytest.raises(ValueError, match=r"dtype and device_map only, got \['low_cpu_mem_usage'\]"):
        place_for_answering(half, {"low_cpu_mem_usage": True})

    # a transformers responder or judge is loaded with the rule's kwargs over its own load_kwargs
    path = tmp_path / "half"
    half.model.half().save_pretrained(path)
    vlm.processor.save_pretrained(path)
    spec = factory.BackendSpec(name="r", kind="transformers", model=str(path))
    backend = factory.build_backend(spec, progress=False)
    assert {p.dtype for p in backend.vlm.model.parameters()} == {torch.float32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert answering_kwargs({"dtype": "bfloat16"}) == {"dtype": "bfloat16", "device_map": "auto"}
    assert answering_kwargs({"device_map": {"": "cuda:1"}}) == {"device_map": {"": "cuda:1"}, "dtype": "auto"}


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module's MLflow tests (creating one runs MLflow's migrations, seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_mlflow_table_is_parquet_on_disk_and_a_table_with_thumbnails_in_the_run(tmp_path, mlflow_store):
    import mlflow
    import pandas as pd

    from spavl_kedro.datasets.mlflow_table import MlflowTableDataset
    from spavl_kedro.imaging import png_bytes

    rows = pd.DataFrame(
        {
            "question": ["q1", "q2"],
            "answer": ["Sure, here", None],
            "images": [png_bytes(Image.new("RGB", (8, 8), c)) for c in ("red", "blue")],
        }
    )
    dataset = MlflowTableDataset(str(tmp_path / "out/items.parquet"), "eval/items.json", image_columns=["images"])
    dataset.save(rows)  # no run: the parquet file only
    assert dataset.load().equals(rows)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_store)
    try:
        experiment = mlflow.create_experiment("tables", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            dataset.save(rows)
        shown = mlflow.MlflowClient().load_table(experiment, "eval/items.json", run_ids=[run.info.run_id])
    finally:
        mlflow.set_tracking_uri(previous)
    assert shown["question"].tolist() == ["q1", "q2"] and shown["answer"].isna().tolist() == [False, True]
    assert all(cell["type"] == "image" and cell["filepath"].endswith(".png") for cell in shown["images"])
    with pytest.raises(DatasetError, match="image columns \\['picture'\\]"):
        MlflowTableDataset(str(tmp_path / "x.parquet"), "t.json", image_columns=["picture"]).save(rows)
    with pytest.raises(DatasetError, match="must end in .json or .parquet"):
        MlflowTableDataset(str(tmp_path / "x.parquet"), "t.csv")


def test_policy_runs_are_one_run_per_policy_with_the_same_metric_names_linked_to_their_training(tmp_path, mlflow_store):
    """MlflowPolicyRunsDataset under an active run: a child run per policy, named `eval · <policy>`, each with
    the same metric names and the evaluation sets as dataset inputs; the policy trained in a run tagged
    `spavl.model` links to it, the base (trained nowhere) links to nothing. Outside a run nothing is logged."""
    import mlflow
    import pandas as pd

    from spavl_kedro.datasets.mlflow_policy_runs import MlflowPolicyRunsDataset

    items = {"test_harm": pd.DataFrame({"item_id": ["a", "b"], "question": ["q1", "q2"], "images_sha256": ["x", "y"]})}
    data = {
        "metrics": {
            p: {"test_harm/unsafe_rate.guard": v, "benign/refusal_rate.rules": 0.1}
            for p, v in (("base", 0.9), ("dpo", 0.2))
        },
        "items": items,
    }
    MlflowPolicyRunsDataset().save(data)  # no run: kept, not logged
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_store)
    try:
        experiment = mlflow.create_experiment("policies", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as parent:
            training_tags = {"spavl.role": "training", "spavl.model": "dpo"}
            with mlflow.start_run(experiment_id=experiment, nested=True, tags=training_tags) as training:
                pass
            MlflowPolicyRunsDataset().save(data)
        client = mlflow.MlflowClient()
        runs = client.search_runs([experiment], filter_string="tags.`spavl.role` = 'evaluation'")
        runs = {r.data.tags["spavl.policy"]: client.get_run(r.info.run_id) for r in runs}
    finally:
        mlflow.set_tracking_uri(previous)
    assert sorted(runs) == ["base", "dpo"]
    assert runs["base"].data.metrics == {"test_harm/unsafe_rate.guard": 0.9, "benign/refusal_rate.rules": 0.1}
    assert runs["dpo"].data.metrics["test_harm/unsafe_rate.guard"] == 0.2
    assert {r.info.run_name for r in runs.values()} == {"eval · base", "eval · dpo"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    assert runs["dpo"].data.tags["spavl.trained_in_run"] == training.info.run_id
    assert "spavl.trained_in_run" not in runs["base"].data.tags
    for run in runs.values():
        (given,) = run.inputs.dataset_inputs
        assert given.dataset.name == "eval: test_harm" and given.dataset.digest and given.tags[0].value == "evaluation"
    with pytest.raises(DatasetError, match="saves"):
        MlflowPolicyRunsDataset().save({"metrics": {}})


def test_a_run_is_named_and_tagged_from_what_ran():
    from spavl_kedro.config import load_parameters, validate_parameters
    from spavl_kedro.run_names import run_name, run_tags, runner_name

    configs = validate_parameters(load_parameters("base"))
    assert run_name(["align"], configs) == "align · dpo+sft · ours · seed 0"
    assert run_name(["judge"], configs) == "judge · seed 0"  # no methods where nothing trains
    tags = run_tags(["align"], "local", configs, Path(__file__).resolve().parents[1])
    assert tags["spavl.methods"] == "dpo,sft" and tags["spavl.env"] == "local" and "split=" in tags["spavl.seeds"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tags["spavl.git_commit"])  # this checkout's commit
    assert runner_name("<kedro.runner.sequential_runner.SequentialRunner object at 0x7f3a>") == "SequentialRunner"
    assert runner_name("ParallelRunner") == "ParallelRunner"
    assert runner_name("None") == "SequentialRunner"  # KedroSession.run() without a runner records "None"
