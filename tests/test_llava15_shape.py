"""The LLaVA-1.5-shaped tiny model (`tiny.llava15_shape`): llava-hf/llava-1.5-7b-hf's formats at tiny width.

What is checked is what breaks first on the real checkpoint: the SentencePiece tokenizer's BOS and "▁"
spacing, llava-hf's chat template (no BOS, and an assistant turn that ends in a space rather than </s>),
576 image tokens per 336-px image (1,152 for a two-image MIS prompt), and that every trainer feeds the
model the prompt generation feeds it and an answer that ends in EOS. Every method also runs on this model
in tests/test_smoke.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from serving import transformers_serve
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from spavl_kedro.models import tiny
from spavl_kedro.models.families import family_named
from spavl_kedro.models.vlm import OpenAIVLM, Prompt, TransformersVLM, load_vlm, with_system_sentence
from spavl_kedro.training import reward
from spavl_kedro.training.dpo import pairs_to_dataset
from spavl_kedro.training.sft import examples_to_dataset, train_sft
from spavl_kedro.training.sft_config import SFTSettings

REFUSAL = "I cannot help with that."
COMPLIANCE = "Sure, here are the steps."
QUESTION = "What do the two pictures show together?"
GREEDY = {"max_new_tokens": 16, "do_sample": False}
LLAVA = family_named("llava")


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[tiny.VLM, object]:
    """A random LLaVA-1.5-shaped model, saved as a model directory; returns (model, directory)."""
    config = tiny.llava15_shape()
    processor = tiny.build_processor([REFUSAL, COMPLIANCE, QUESTION, "USER: ASSISTANT:"] * 50, config)
    vlm = tiny.VLM(tiny.build_model(processor, config, seed=0).eval(), processor)
    directory = tmp_path_factory.mktemp("llava15-shape")
    vlm.model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return vlm, directory


def generation_ids(processor, question: str, n_images: int) -> list[int]:
    """The prompt ids generation feeds the model (TransformersVLM's encoding: special tokens added)."""
    prompt = processor.apply_chat_template(tiny.user_message(question, n_images), add_generation_prompt=True)
    images = [Image.new("RGB", (64, 64), "red")] * n_images
    return processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()


def test_the_model_directory_has_llava_15s_formats(llava):
    vlm, directory = llava
    loaded = load_vlm(str(directory))
    processor, config = loaded.processor, loaded.model.config
    assert config.vision_feature_layer == -2 and config.vision_config.image_size == 336
    assert config.vision_config.patch_size == 14 and config.image_seq_length == 576
    assert processor.chat_template == tiny.LLAVA15_CHAT_TEMPLATE
    prompt = processor.apply_chat_template(tiny.user_message(QUESTION, 2), add_generation_prompt=True)
    assert prompt == f"USER: <image>\n<image>\n{QUESTION} ASSISTANT:"

    ids = generation_ids(processor, QUESTION, 2)
    tokenizer = processor.tokenizer
    assert ids[0] == tokenizer.bos_token_id == 1 and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(config.image_token_id) == 1152  # two images, 576 tokens each
    assert tokenizer.convert_ids_to_tokens(ids[1]).startswith("▁")  # SentencePiece's word prefix
    assert tokenizer.pad_token_id not in ids[:-1] and tokenizer.padding_side == "left"
    assert ids == generation_ids(vlm.processor, QUESTION, 2)  # the saved tokenizer encodes as the trained one


VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)  # conv_vicuna_v1's system, llava/conversation.py


def trainer_ids(processor, images, answer: str, scratch) -> dict[str, list[int]]:
    """The ids each trainer feeds the model for one (images, QUESTION, answer) example: DPO's collator (the chosen
    row), SFT's collator, the reward model's encoding and the tiny bootstrap's; GRPO / RLOO render and tokenize
    their prompts with the processor's own `apply_chat_template(tokenize=True)`, given under "grpo_prompt"."""
    pair = {"images": images, "question": QUESTION, "chosen": answer, "rejected": COMPLIANCE}
    dpo = DataCollatorForVisionPreference(processor)([pairs_to_dataset([pair], processor, str(scratch))[0]])
    sft = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(
        [examples_to_dataset([{"images": images, "question": QUESTION, "target": answer}], processor, str(scratch))[0]]
    )
    seed = tiny._encode(processor, tiny.SeedExample.harmful_request(images, QUESTION, answer, COMPLIANCE))
    asked = [
        {
            "role": "user",
            "content": [*({"type": "image", "image": image} for image in images), {"type": "text", "text": QUESTION}],
        }
    ]
    grpo = processor.apply_chat_template(
        conversation=[asked], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return {
        "dpo": dpo["input_ids"][0][dpo["attention_mask"][0].bool()].tolist(),  # the first row is the chosen
        "sft": sft["input_ids"][0][sft["attention_mask"][0].bool()].tolist(),
        "sft_labels": sft["labels"][0][sft["labels"][0] != -100].tolist(),
        "reward": reward._encode(processor, LLAVA, images, QUESTION, answer).input_ids.tolist(),
        "bootstrap": seed.prompt.tolist() + seed.refusal.tolist(),
        "grpo_prompt": list(grpo["input_ids"][0]),
    }


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("system", [None, VICUNA_V1])
def test_every_trainer_sees_the_generation_prompt_and_an_answer_ending_in_eos(llava, n_images, system, tmp_path):
    vlm, _ = llava
    processor = vlm.processor if system is None else with_system_sentence(vlm.processor, system)
    tokenizer = processor.tokenizer
    prompt_ids = generation_ids(processor, QUESTION, n_images)
    answer_ids = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seen = trainer_ids(processor, [Image.new("RGB", (64, 64), "red")] * n_images, REFUSAL, tmp_path)

    # llava-1.5's template has no BOS and ends an assistant turn with " " instead of </s>: rendered as it
    # is, training would drop the BOS generation sees and never teach the model to stop.
    for path in ("dpo", "sft", "reward", "bootstrap"):
        assert seen[path] == prompt_ids + answer_ids, path
    assert seen["sft_labels"] == answer_ids
    assert seen["grpo_prompt"] == prompt_ids


CONV_VICUNA_V1 = Path(__file__).parents[1] / "conf" / "paper" / "templates" / "llava_conv_vicuna_v1.jinja"


def llava_ids(tokenizer, image_token_id: int, n_images: int, answer: str | None) -> list[int]:
    """The ids LLaVA itself feeds LLaVA-1.5 for a question about `n_images` images, written here from
    github.com/haotian-liu/LLaVA: llava/conversation.py's `conv_vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2
    "</s>"; each image as DEFAULT_IMAGE_TOKEN + "\n" before the question) and `Conversation.get_prompt`, then
    llava/mm_utils.py's `tokenizer_image_token`: the text split at each "<image>", every chunk tokenized on its
    own (so with its BOS, kept for the first chunk only), and IMAGE_TOKEN_INDEX between chunks, which the model
    replaces with the image's 576 features (here: 576 image tokens, as llava-hf's processor expands them)."""
    seps = [" ", "</s>"]
    messages = [("USER", "<image>\n" * n_images + QUESTION), ("ASSISTANT", answer)]
    prompt = VICUNA_V1 + seps[0]
    for i, (role, message) in enumerate(messages):
        prompt += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    assert chunks[0][0] == tokenizer.bos_token_id
    ids = [tokenizer.bos_token_id]
    for n, chunk in enumerate(chunks):
        ids += ([image_token_id] * 576 if n else []) + chunk[1:]
    return ids


@pytest.mark.parametrize("n_images", [1, 2])
def test_the_conv_vicuna_v1_template_feeds_llavas_own_token_ids(llava, n_images, tmp_path):
    """conf/paper's `align.policy.chat_template` on the LLaVA-1.5-shaped policy: generation and every trainer
    feed exactly the ids LLaVA's own code gives. llava-hf's template with conv_vicuna_v1's sentence renders the
    same text, yet its ids differ by the "▁" LLaVA's chunked tokenization puts after each image."""
    from spavl_kedro.pipelines.align.nodes import prepare_policy

    vlm, directory = llava
    align = {"policy": {"kind": "transformers", "model": str(directory), "chat_template": str(CONV_VICUNA_V1)}}
    processor = prepare_policy(None, None, align, {}).processor
    tokenizer, image_id = processor.tokenizer, vlm.model.config.image_token_id
    images = [Image.new("RGB", (64, 64), "red")] * n_images
    prompt = llava_ids(tokenizer, image_id, n_images, None)
    assert generation_ids(processor, QUESTION, n_images) == prompt
    seen = trainer_ids(processor, images, REFUSAL, tmp_path)
    answered = llava_ids(tokenizer, image_id, n_images, REFUSAL)
    for path in ("dpo", "sft", "reward", "bootstrap"):
        assert seen[path] == answered, path
    assert seen["sft_labels"] == answered[len(prompt) :] and seen["grpo_prompt"] == prompt
    # the sentence through llava-hf's own template: the same text, not the same ids
    assert generation_ids(with_system_sentence(vlm.processor, VICUNA_V1), QUESTION, n_images) != prompt


@pytest.mark.slow
def test_sft_on_two_image_prompts_teaches_the_answer_and_where_it_stops(llava, tmp_path):
    vlm, _ = llava
    colours = ["red", "green", "blue", "yellow"]
    examples = [
        {
            "images": [Image.new("RGB", (64, 64), colours[i % 4]), Image.new("RGB", (64, 64), colours[(i + 1) % 4])],
            "question": QUESTION,
            "target": REFUSAL,
        }
        for i in range(8)
    ]
    settings = SFTSettings(
        output_dir=str(tmp_path), report_to=[], num_train_epochs=25, per_device_train_batch_size=4, learning_rate=4e-3
    )
    policy, _, metrics = train_sft(vlm, examples, settings)
    assert metrics["loss_last"] < 0.2 * metrics["loss_first"]

    answers = TransformersVLM("sft", policy, batch_size=2, generation=GREEDY, progress=False).generate(
        [Prompt(QUESTION, (png("purple"), png("orange"))), Prompt(QUESTION, (png("red"), png("blue")))]
    )
    assert [a.text for a in answers] == [REFUSAL, REFUSAL]
    assert [a.finish_reason for a in answers] == ["stop", "stop"]  # </s> was learned, within 16 tokens


@pytest.mark.slow
def test_transformers_serve_answers_the_llava_15_shape_like_the_local_model(llava, tmp_path):
    vlm, directory = llava
    prompts = [
        Prompt(QUESTION, (png("red"),)),
        Prompt(QUESTION, (png("red"), png("blue"))),
        Prompt("Describe it.", (png("green"), png("red"))),
    ]
    local = TransformersVLM("local", vlm, batch_size=3, generation=GREEDY, progress=False).generate(prompts)
    with transformers_serve(directory, tmp_path) as base_url:
        remote = OpenAIVLM(
            "served",
            base_urls=[base_url],
            model=str(directory),
            generation=GREEDY,
            concurrency=3,
            timeout_s=60,
            progress=False,
        ).generate(prompts)
    assert [g.error for g in remote] == [None] * 3
    assert [g.text for g in remote] == [g.text for g in local]
    assert len({g.text for g in local}) >= 2  # the images reach the model: answers differ


def test_the_llava_15_layout_is_a_configuration_choice():
    config = tiny.TinyModelConfig(layout="llava-1.5")
    assert config.vision_feature_layer == -2 and tiny.TinyModelConfig().vision_feature_layer == -1
    with pytest.raises(ValueError, match="layout"):
        tiny.TinyModelConfig(layout="llava-2")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's own padding (llava/mm_utils.py in github.com/haotian-liu/LLaVA), copied in its logic: the
    image centred on a square of its longer side, filled with the image processor's mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def test_a_padded_policy_feeds_every_path_the_pixels_llava_pads_to(llava, tmp_path):
    """`align.policy.image_preprocessing: pad` on a 3:1 image: generation, DPO's collator and the reward
    model's encoding all see what LLaVA's expand2square + CLIP preprocessing gives, also after the policy is
    saved and loaded as the catalog's policy_base; `default` centre-crops instead."""
    import numpy as np
    import torch

    from spavl_kedro.datasets import ModelDirectoryDataset
    from spavl_kedro.pipelines.align.nodes import prepare_policy

    _, directory = llava
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 336, 3), dtype=np.uint8))
    clip = load_vlm(str(directory)).processor.image_processor
    expected = clip(expand2square(wide, tuple(int(x * 255) for x in clip.image_mean)), return_tensors="pt")[
        "pixel_values"
    ][0]
    cropped = clip(wide, return_tensors="pt")["pixel_values"][0]
    assert (expected - cropped).abs().max() > 1  # the two preprocessings differ on this image

    def policy(mode: str):
        align = {"policy": {"kind": "transformers", "model": str(directory), "image_preprocessing": mode}}
        store = ModelDirectoryDataset(str(tmp_path / mode), kind="vlm")
        store.save(prepare_policy(None, None, align, {}))
        return store.load()

    padded = policy("pad")
    processor = padded.processor
    prompt = processor.apply_chat_template(tiny.user_message(QUESTION, 1), add_generation_prompt=True)
    generation = processor(text=[prompt], images=[wide], return_tensors="pt")["pixel_values"][0]
    pair = {"images": [wide], "question": QUESTION, "chosen": REFUSAL, "rejected": COMPLIANCE}
    dpo = DataCollatorForVisionPreference(processor)([pairs_to_dataset([pair], processor, str(tmp_path))[0]])
    scored = reward._encode(processor, LLAVA, [wide], QUESTION, REFUSAL).images["pixel_values"][0]
    for pixels in (generation, dpo["pixel_values"][0], scored):
        assert torch.equal(pixels, expected)
    default = policy("default").processor(text=[prompt], images=[wide], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(default, cropped)


def test_the_system_sentence_renders_llavas_conv_vicuna_v1(llava, tmp_path):
    """`align.policy.system_sentence` with conv_vicuna_v1's sentence: the prompt generation renders is the string
    LLaVA's Conversation.get_prompt gives for SeparatorStyle.TWO (system + sep, then "USER: " + message + sep,
    then "ASSISTANT:"), written out here from llava/conversation.py; an answered turn ends with sep2, </s>.
    It survives saving the policy as the catalog's policy_base."""
    from spavl_kedro.datasets import ModelDirectoryDataset
    from spavl_kedro.pipelines.align.nodes import prepare_policy

    _, directory = llava
    align = {"policy": {"kind": "transformers", "model": str(directory), "system_sentence": VICUNA_V1}}
    store = ModelDirectoryDataset(str(tmp_path / "policy"), kind="vlm")
    store.save(prepare_policy(None, None, align, {}))
    processor = store.load().processor
    sep, sep2, question = " ", "</s>", "What is shown?"
    llava_prompt = VICUNA_V1 + sep + "USER: " + "<image>\n" + question + sep + "ASSISTANT:"
    rendered = processor.apply_chat_template(tiny.user_message(question, 1), add_generation_prompt=True)
    assert rendered == llava_prompt
    prompt, completion = tiny.prompt_and_completion(processor, question, 1, "It is red.")
    assert completion == " It is red." + sep2 and prompt.endswith("ASSISTANT:")
    # an explicit system turn replaces the sentence rather than adding a second one
    own = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *tiny.user_message(question, 1)]
    assert processor.apply_chat_template(own, add_generation_prompt=True).startswith("Be brief. USER:")
