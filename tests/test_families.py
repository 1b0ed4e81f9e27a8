"""The architecture table (`models/families.py`): every trainer and the reward model read a model's row, so a
family is one row plus its fixture. Here: generation and every method on the LLaVA-NeXT-, Qwen2-VL-, Qwen2.5-VL-
and InternVL-shaped fixtures (`models/tiny_families.py`) with two-image prompts, the reward model's extra inputs,
a toy family added by one row, and the rows' module names checked against transformers' own classes. The
LLaVA-1.5-shaped fixture runs every method in tests/test_smoke.py and tests/test_llava15_shape.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration

from spavl_kedro.imaging import png_bytes
from spavl_kedro.models import families, tiny
from spavl_kedro.models.families import FAMILIES, Family, family_of
from spavl_kedro.models.tiny_families import FIXTURES
from spavl_kedro.models.vlm import Prompt, TransformersVLM, load_vlm
from spavl_kedro.training import reward
from spavl_kedro.training.adapters import LoraAdapter
from spavl_kedro.training.dpo import train_dpo
from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.methods import get_method, settings_for
from spavl_kedro.training.recipe import freeze_for_full_finetune
from spavl_kedro.training.reward import train_reward
from spavl_kedro.training.reward_config import RewardSettings

REFUSAL, COMPLIANCE = "I cannot help with that.", "Sure, here are the steps."
QUESTION = "What do the two pictures show together?"


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = [(64, 64), (96, 48), (48, 80)]  # square and not: the grid and tile families size them differently
TEXTS = [REFUSAL, COMPLIANCE, QUESTION, "Perception: Image-1 and Image-2 show", *COLOURS] * 20


def two_images(i: int) -> list[Image.Image]:
    return [
        Image.new("RGB", SHAPES[i % 3], COLOURS[i % 6]),
        Image.new("RGB", SHAPES[(i + 1) % 3], COLOURS[(i + 2) % 6]),
    ]


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl", "qwen2.5-vl", "internvl"])
def fixture(request, tmp_path_factory) -> tuple[str, tiny.VLM]:
    """(name, model) of one family's fixture, saved and loaded back as a model directory is."""
    model, processor = FIXTURES[request.param](TEXTS, seed=0)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return request.param, load_vlm(str(directory))


def test_batched_generation_answers_two_image_prompts_as_one_at_a_time(fixture):
    name, vlm = fixture
    prompts = [Prompt(QUESTION, tuple(png_bytes(image) for image in two_images(i))) for i in range(3)]
    prompts.append(Prompt(QUESTION, (png_bytes(two_images(3)[0]),)))  # one image beside two-image prompts
    greedy = {"max_new_tokens": 6, "do_sample": False}
    batched = TransformersVLM(name, vlm, batch_size=4, generation=greedy, progress=False).generate(prompts)
    alone = TransformersVLM(name, vlm, batch_size=1, generation=greedy, progress=False).generate(prompts)
    assert [g.error for g in batched] == [None] * 4
    assert [g.text for g in batched] == [g.text for g in alone]
    assert family_of(vlm.model).multi_image


def records(method: str, n: int = 4) -> list[dict]:
    kind = get_method(method).records
    rows = [{"images": two_images(i), "question": QUESTION} for i in range(n)]
    if kind == "pairs":
        return [{**row, "chosen": REFUSAL, "rejected": COMPLIANCE} for row in rows]
    if kind == "targets":
        return [
            {**row, "target": f"Perception: Image-1 and Image-2 show {COLOURS[i % 6]}. {REFUSAL}"}
            for i, row in enumerate(rows)
        ]
    return rows


# Each method as conf/paper runs it where that differs from the default: SFT and the reward model fine-tune fully
# (the row's tower frozen), DPO and GRPO train LoRA on the language model, RLOO fully with a KL reference.
RECIPES = {
    "dpo": {},
    "sft": {"lora": False},
    "reward": {"lora": False, "freeze_vision_tower": True},
    "grpo": {
        "algorithm": "grpo",
        "num_generations": 2,
        "max_completion_length": 4,
        "per_device_train_batch_size": 4,
    },  # answers: two prompts of two answers each per step
    "rloo": {
        "algorithm": "rloo",
        "num_generations": 2,
        "max_completion_length": 4,
        "lora": False,
        "beta": 0.1,
        "per_device_train_batch_size": 4,
    },
}


def _weights(model: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    """The weights of the row's `part`; the tower's without a projector inside it (Qwen2-VL's merger trains)."""
    family = family_of(model)
    inner = family.projector.removeprefix(family.vision_tower + ".") + "."
    return {
        name: p.detach().clone()
        for name, p in family.modules(model, part).named_parameters()
        if part != "vision_tower" or not name.startswith(inner)
    }


@pytest.mark.slow  # 20 trainings; make test runs them
@pytest.mark.parametrize("method", list(RECIPES))
def test_every_method_trains_the_family_on_two_image_prompts(fixture, method, tmp_path):
    """One pass over four two-image records; the row decides what trains: a full fine-tune leaves the vision tower
    as it was and moves the language model, LoRA adapts the language model only."""
    name, vlm = fixture
    settings = settings_for(
        method,
        {
            "output_dir": str(tmp_path),
            "report_to": [],
            "num_train_epochs": 1,
            "per_device_train_batch_size": 2,
            **RECIPES[method],
        },
    )
    reward_fn = (
        (lambda items: [float(len(item["response"]) % 3) for item in items]) if method in ("grpo", "rloo") else None
    )
    tower, language = _weights(vlm.model, "vision_tower"), _weights(vlm.model, "language_model")
    artifact, metrics = get_method(method).train(vlm, records(method), settings, reward_fn=reward_fn)

    assert metrics["global_step"] == 2, name
    if method in ("dpo", "reward"):
        assert metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = reference / zero head
    if isinstance(artifact, LoraAdapter):
        assert artifact.state_dict
        assert all(f".{family_of(vlm.model).language_model}." in key for key in artifact.state_dict), name
    else:  # a full fine-tune: a policy, or a reward model's backbone
        trained = artifact.backbone if isinstance(artifact, reward.RewardModel) else artifact.model
        assert all(torch.equal(p, tower[k]) for k, p in _weights(trained, "vision_tower").items())
        assert any(not torch.equal(p, language[k]) for k, p in _weights(trained, "language_model").items())
    assert all(torch.equal(p, tower[k]) for k, p in _weights(vlm.model, "vision_tower").items())  # input untouched


def test_preflight_sizes_an_image_at_least_as_long_as_the_processor_makes_it(fixture):
    """`image_tokens_per_image`, which preflight sizes sequences by, against the tokens the family's own
    processor writes for square, wide and tall images: never fewer, and exact for the tile families' largest
    grid (InternVL: tiles x the tokens a tile keeps after the 0.5 pixel shuffle, plus the thumbnail;
    LLaVA-NeXT: 2 x 2 tiles and the base image, plus a newline token after each row of patches)."""
    name, vlm = fixture
    bound = families.image_tokens_per_image(vlm.model.config, vlm.processor.image_processor.to_dict())
    prompt = vlm.processor.apply_chat_template(tiny.user_message(QUESTION, 1), add_generation_prompt=True)
    counts = []
    for size in [*SHAPES, (160, 40), (40, 160), (224, 224)]:
        ids = vlm.processor(text=[prompt], images=[Image.new("RGB", size, "red")])["input_ids"][0]
        counts.append(sum(i == vlm.model.config.image_token_id for i in ids))
    assert max(counts) <= bound, (name, counts, bound)
    if name == "internvl":
        assert max(counts) == bound == 3 * 4, counts  # two 56-px tiles and a thumbnail, 4 tokens each
    if name == "llava-next":
        assert max(counts) == bound == 5 * 4 + 2 * 2, counts  # 28-px tiles of 2 x 2 patches; 4 rows of patches


def test_the_reward_model_feeds_the_familys_extra_inputs(fixture):
    """Per-image inputs (Qwen2-VL's image_grid_thw: one row per image) and per-token ones (mm_token_type_ids, padded
    like the ids) reach the forward pass, and a reward reads the images: other pictures, another score."""
    _, vlm = fixture
    family = family_of(vlm.model)
    rows = [reward._encode(vlm.processor, family, two_images(i), QUESTION, REFUSAL) for i in range(2)]
    batch = reward._collate(rows, vlm.processor.tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", *family.image_inputs, *family.token_inputs}
    if "image_grid_thw" in batch:
        assert batch["image_grid_thw"].shape == (4, 3)  # two images in each of two rows
    for key in family.token_inputs:
        assert batch[key].shape == batch["input_ids"].shape
    torch.manual_seed(0)
    head = torch.nn.Linear(vlm.model.config.get_text_config().hidden_size, 1)
    model = reward.RewardModel(vlm, head=head)
    items = [{"images": two_images(i), "question": QUESTION, "response": REFUSAL} for i in (0, 3)]  # same sizes
    first, second = model.score(items)
    assert first != pytest.approx(second, abs=1e-6)


class ToyConfig(LlavaConfig):
    model_type = "toy_vlm"


class ToyVLM(LlavaForConditionalGeneration):
    """A family the table does not know: LLaVA's layers under a model type of its own."""

    config_class = ToyConfig


TOY = Family(
    name="toy",
    model_types=("toy_vlm",),
    model_class="ToyVLM",
    vision_tower="vision_tower",
    projector="multi_modal_projector",
    language_model="language_model",
    image_tokens="fixed",
)


@pytest.fixture(scope="module")
def toy() -> tiny.VLM:
    config = tiny.TinyModelConfig(text_hidden=32, text_layers=1)
    processor = tiny.build_processor([REFUSAL, COMPLIANCE, QUESTION] * 20, config)
    llava = tiny.build_model(processor, config, seed=0)
    model = ToyVLM(ToyConfig(**{k: v for k, v in llava.config.to_dict().items() if k != "model_type"}))
    model.load_state_dict(llava.state_dict(), strict=False)
    return tiny.VLM(model.eval(), processor)


def pairs(n: int) -> list[dict]:
    colours = ["red", "green", "blue", "yellow"]
    return [
        {
            "images": [Image.new("RGB", (32, 32), colours[i % 4]), Image.new("RGB", (32, 32), colours[(i + 1) % 4])],
            "question": QUESTION,
            "chosen": REFUSAL,
            "rejected": COMPLIANCE,
        }
        for i in range(n)
    ]


def test_a_family_is_one_row_away(toy, monkeypatch, tmp_path):
    """Unknown, the toy family fails at once, naming the table; with its row added, full fine-tuning freezes the
    row's modules, DPO's LoRA stays off them, and the reward model trains on two-image pairs."""
    with pytest.raises(ValueError, match=r"families\.py.*toy_vlm"):
        family_of(toy.model)
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, TOY))
    assert family_of(toy.model) is TOY

    model = ToyVLM(toy.model.config)
    freeze_for_full_finetune(model, train_projector=False)
    frozen = {name.split(".")[1] for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_tower", "multi_modal_projector"}

    recipe = {"output_dir": str(tmp_path), "report_to": [], "num_train_epochs": 1, "per_device_train_batch_size": 2}
    trained, metrics = train_dpo(toy, pairs(4), DPOSettings(**recipe, lora_target_modules="all-linear"))
    adapted = {name.split(".")[3] for name, _ in trained.named_parameters() if "lora_" in name}
    assert adapted == {"language_model"} and metrics["global_step"] == 2
    reward, metrics = train_reward(toy, pairs(4), RewardSettings(**recipe))
    assert metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3) and metrics["global_step"] == 2


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_row_names_modules_its_transformers_class_has(family):
    """Each row's tower, projector and language model exist, under those paths, in the class transformers builds
    for the row's model types (default configs, on the meta device: no weights)."""
    import transformers

    for model_type in family.model_types:
        config = transformers.AutoConfig.for_model(model_type)
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(config)
        assert family_of(model) is family
        names = {name for name, _ in model.named_modules()}
        for which in ("vision_tower", "projector", "language_model"):
            assert f"model.{getattr(family, which)}" in names, (model_type, which)


MIS_INTERNVL = Path(__file__).parents[1] / "conf" / "paper" / "templates" / "mis_internvl2_5.jinja"
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


def test_the_mis_template_feeds_internvl_mis_numbered_images_in_internvls_own_conversation(tmp_path):
    """conf/paper/templates/mis_internvl2_5.jinja as `align.policy.chat_template` of an InternVL policy: the ids
    generation and SFT feed are those of InternVL's "internvl2_5" conversation (internvl/conversation.py,
    github.com/OpenGVLab/InternVL: system_template "<|im_start|>system\\n{system_message}", roles
    "<|im_start|>user\\n" / "<|im_start|>assistant\\n", SeparatorStyle.MPT with sep "<|im_end|>\\n") around MIS's
    two-image prompt "Image-1: <image>\\nImage-2: <image>\\n\\n{question}" (github.com/DripNowhy/MIS), each <image>
    replaced as InternVL's `chat` does: <img>, one <IMG_CONTEXT> per visual token, </img>."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from spavl_kedro.pipelines.align.nodes import prepare_policy
    from spavl_kedro.training.sft import examples_to_dataset

    model, processor = FIXTURES["internvl"](TEXTS, seed=0)
    model.save_pretrained(tmp_path / "internvl")
    processor.save_pretrained(tmp_path / "internvl")
    align = {
        "policy": {"kind": "transformers", "model": str(tmp_path / "internvl"), "chat_template": str(MIS_INTERNVL)}
    }
    policy = prepare_policy(None, None, align, {})
    tokenizer, images = (
        policy.processor.tokenizer,
        [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")],
    )

    tokens = "<img>" + "<IMG_CONTEXT>" * model.config.image_seq_length + "</img>"  # a square image: one tile
    message = f"Image-1: {tokens}\nImage-2: {tokens}\n\n{QUESTION}"
    internvl = (
        f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = tokenizer(internvl, add_special_tokens=False)["input_ids"]
    rendered = policy.processor.apply_chat_template(tiny.user_message(QUESTION, 2), add_generation_prompt=True)
    assert policy.processor(text=[rendered], images=images)["input_ids"][0] == expected

    target = "Perception: Image-1 and Image-2 show red and blue."
    sft = DataCollatorForVisionLanguageModeling(policy.processor, completion_only_loss=True)(
        [
            examples_to_dataset(
                [{"images": images, "question": QUESTION, "target": target}], policy.processor, str(tmp_path)
            )[0]
        ]
    )
    # the turn as the template ends it, "<|im_end|>\n" (what TRL keeps after the EOS; InternVL's own training
    # turns end with the same separator)
    answer = tokenizer(target + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert sft["input_ids"][0].tolist() == expected + answer
    assert sft["labels"][0][sft["labels"][0] != -100].tolist() == answer


@pytest.mark.slow
def test_a_method_trains_from_the_base_align_base_of_names_and_is_evaluated_beside_it(tmp_path):
    """MIS's recipe as conf/paper runs it: SFT trains from a second base policy (`align.bases`, an InternVL with
    MIS's template) while the others train from `align.policy` (LLaVA). The adapter remembers its base through
    the catalog, and evaluation answers with `base`, the InternVL base and SFT merged into the InternVL."""
    from spavl_kedro.datasets import ModelDirectoryDataset
    from spavl_kedro.pipelines.align.nodes import prepare_bases, prepare_policy, train_method
    from spavl_kedro.pipelines.evaluate.answers import policies

    for name in ("llava-1.5", "internvl"):
        model, processor = FIXTURES[name](TEXTS, seed=0)
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    align = {
        "policy": {"kind": "transformers", "model": str(tmp_path / "llava-1.5")},
        "bases": {
            "internvl": {
                "kind": "transformers",
                "model": str(tmp_path / "internvl"),
                "chat_template": str(MIS_INTERNVL),
            }
        },
        "base_of": {"sft": "internvl"},
        "method": "sft",
        "sft_data": "cot",
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "sft": {"lora": True, "num_train_epochs": 1, "per_device_train_batch_size": 2},
    }
    policy, bases = prepare_policy(None, None, align, {}), prepare_bases(None, None, align, {})
    assert list(bases) == ["internvl"] and family_of(bases["internvl"].model).name == "internvl"
    pictures = [png_bytes(image) for i in range(6) for image in two_images(i)]
    images = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(pictures))], "png": pictures})
    mis_train = pd.DataFrame(
        {
            "image_ids": [[f"i{2 * i}", f"i{2 * i + 1}"] for i in range(6)],
            "question": [QUESTION] * 6,
            "target": [f"Perception: Image-1 and Image-2 show {COLOURS[i]}. {REFUSAL}" for i in range(6)],
        }
    )

    trained, summary, _ = train_method("sft", policy, bases, align, {"train": pd.DataFrame()}, {}, mis_train, images)
    assert summary["sft"]["base"] == "internvl" and summary["sft"]["family"] == "internvl"
    assert summary["sft"]["chat_template"] == str(MIS_INTERNVL)
    store = ModelDirectoryDataset(str(tmp_path / "aligned"), kind="auto", collection=True, merge=True)
    store.save(trained)
    adapter = store.load()["sft"]()
    assert isinstance(adapter, LoraAdapter) and adapter.base == "internvl"  # kept in the weights' metadata

    found = policies(policy, {"sft": adapter}, bases)
    assert list(found) == ["base", "internvl", "sft"]
    assert found["sft"].weights != found["internvl"].weights
    merged = found["sft"].load()
    assert family_of(merged.model).name == "internvl" and family_of(found["base"].load().model).name == "llava-1.5"
    prompt = Prompt(QUESTION, tuple(png_bytes(image) for image in two_images(0)))
    answer = TransformersVLM(
        "sft", merged, generation={"max_new_tokens": 4, "do_sample": False}, progress=False
    ).generate([prompt])[0]
    assert answer.error is None and answer.finish_reason == "length"  # random weights: four tokens, maybe special
    with pytest.raises(ValueError, match="LoRA adapter of base 'internvl', which is not a base policy here"):
        policies(policy, {"sft": adapter})  # its base gone: never merged into LLaVA
