import pytest
import torch
from kedro.io import DatasetError
from PIL import Image

from spavl_kedro.backends import tiny
from spavl_kedro.backends.vlm import Prompt, TransformersVLM
from spavl_kedro.datasets import ModelDirectoryDataset
from spavl_kedro.pipelines.generate.synthetic import _render


@pytest.fixture(scope="module")
def vlm():
    cfg = tiny.TinyModelConfig(text_layers=1, vision_layers=1)
    processor = tiny.build_processor(["I'm sorry, I cannot help.", "Sure, here are the steps."] * 20, cfg)
    return tiny.VLM(tiny.build_model(processor, cfg, seed=0), processor)


def greedy(vlm, n_images=1):
    import random
    png = _render("knife", (200, 40, 40), "circle", 64, random.Random(0))
    prompts = [Prompt("What is shown?", (png,) * n_images)] * 3
    return [g.text for g in TransformersVLM("t", vlm, 2, {"max_new_tokens": 6, "do_sample": False},
                                            progress=False).generate(prompts)]


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
