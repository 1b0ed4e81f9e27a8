"""Offline tiny Qwen2-VL / Qwen2.5-VL and InternVL (-hf format) models, for testing the family-generic code.

`tiny.py` stands in for LLaVA; this module stands in for the two other families of the architecture table
(`families.py`), each with its real transformers classes, its own processor, its own tokenizer kind and the chat
template its reference checkpoint ships, at a size that trains in seconds on a CPU (0.2-0.3M parameters with a
1,024-token vocabulary). What is tiny is only width, depth, vocabulary and image resolution; how an image becomes
tokens is the family's own:

- Qwen2-VL: `Qwen2VLImageProcessorPil` resizes each image to multiples of 28 px (patch 14 x merge 2) within
  `min_pixels`/`max_pixels`, and every 2x2 patches become one `<|image_pad|>`; the processor returns
  `image_grid_thw` (one row per image) and `mm_token_type_ids`, and the model places images by M-RoPE. Here a
  64x64 image becomes 4 tokens and a 96x48 one 6 (at most 8).
- InternVL: `GotOcr2ImageProcessorPil` cuts an image into up to `max_patches` square tiles (plus a thumbnail when
  there are several) and each tile becomes `image_seq_length` `<IMG_CONTEXT>` tokens between `<img>` and
  `</img>`, after the vision tower's pixel shuffle. Here a square image is 1 tile (4 tokens), a 2:1 one 2 tiles
  plus a thumbnail (12 tokens).

Tokenizers are `Qwen2Tokenizer` (byte-level BPE with Qwen2's pre-tokenizer; `Qwen2TokenizerFast` is the same
class in transformers 5) trained on the caller's texts, with the special tokens of the reference checkpoints in
their order, so their ids follow the learned vocabulary as Qwen's do.

Neither processor can be built without a video processor, which needs torchvision; `models/videoless.py` stands
in for it here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from spavl_kedro.models.videoless import video_processor as _video_processor

VOCAB_SIZE = 1024  # learned merges plus the added tokens
MAX_POSITIONS = 4096

# The chat template Qwen/Qwen2-VL-7B-Instruct ships (chat_template.json), verbatim, as transformers' own test of the
# Qwen2-VL processor copies it: huggingface/transformers, tests/models/qwen2_vl/test_processor_qwen2_vl.py
# (`prepare_processor_dict`, commit 00368c17bfb3f240a56108c796cb80a04cb0448c), whose processor is loaded from that
# checkpoint. Qwen2.5-VL-7B-Instruct ships the same template. A system turn is added when the conversation has none.
QWEN2_VL_CHAT_TEMPLATE = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"  # noqa: E501

# The chat template of the OpenGVLab/InternVL3-*-hf checkpoints, verbatim: the `chat_template` of the script that
# converted them, huggingface/transformers src/transformers/models/internvl/convert_internvl_weights_to_hf.py (its
# InternVL3.5-era version; default --hub_dir OpenGVLab/InternVL3-1B-hf), there written as concatenated pieces. An
# image is `<IMG_CONTEXT>`, which InternVLProcessor expands to `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` +
# `</img>`. No system turn is added.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Added tokens of Qwen/Qwen2-VL-7B-Instruct in id order (151643..151656 there).
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL's tokenizer adds these (151657..151664); InternVL3-hf's tokenizer is Qwen2.5-VL's.
QWEN2_5_EXTRA_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# What the InternVL conversion script adds to Qwen2.5-VL's tokenizer (151665.., <IMG_CONTEXT> = 151667 there).
INTERNVL_EXTRA_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# Widths and depths (`sizes` of the builders; `make smoke --size gpu` widens them). Unless `text_heads` says
# otherwise, language-model heads are 16 wide.
DEFAULT_SIZES = {"text_hidden": 64, "text_layers": 2, "text_heads": 0, "vision_hidden": 32, "vision_layers": 2}


def _widths(sizes: dict[str, int]) -> dict[str, int]:
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; the tiny families take {sorted(DEFAULT_SIZES)}")
    width = {**DEFAULT_SIZES, **sizes}
    width["text_heads"] = width["text_heads"] or width["text_hidden"] // 16
    head_dim = width["text_hidden"] // width["text_heads"]
    if head_dim % 16:
        raise ValueError(f"text_hidden / text_heads = {head_dim}: the tiny families need a multiple of 16 (M-RoPE)")
    # Qwen2-VL's M-RoPE splits half of each head into temporal, height and width sections as 2:3:3
    # (Qwen2-VL-7B: [16, 24, 24] of 64)
    width["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    return width


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --- tokenizer ----------------------------------------------------------------------------------------------------


def train_qwen2_tokenizer(
    texts: Sequence[str], added: Sequence[str], vocab_size: int = VOCAB_SIZE, **named: Any
) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer whose BPE is trained on `texts` with Qwen2's own normalizer and pre-tokenizer, then the
    `added` tokens after the learned vocabulary (ids in list order, as in Qwen's checkpoints), all special.
    `named` are the tokenizer's eos/pad/... and named extra tokens (InternVL's `start_image_token`, ...)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    named_extra = dict(named.get("extra_special_tokens") or {}).values()
    reserved = len(set(added) | set(named_extra))  # named extras (InternVL's <video>) are added tokens too
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - reserved, 257),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for token in added:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    # Left padding for decoder-only batched generation; passed here, not set afterwards, so that it is saved.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        **named,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [t for t in added if t not in tokenizer.all_special_tokens]},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def _set_generation_ids(model: torch.nn.Module, tokenizer: Qwen2Tokenizer) -> None:
    """As the reference checkpoints' generation_config.json: stop at <|im_end|> or <|endoftext|>, pad with
    <|endoftext|> (Qwen2-VL's tokenizer has no BOS; its generation config names <|endoftext|>)."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, endoftext]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = endoftext
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


# --- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------------------------------


def build_qwen2_vl(
    texts: Sequence[str], seed: int = 0, qwen2_5: bool = False, **sizes: int
) -> tuple[
    Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor | Qwen2_5_VLProcessor
]:
    """A randomly initialised Qwen2-VL (or, with `qwen2_5`, Qwen2.5-VL) of about 0.3M parameters and its processor.

    The two share the image processor, the chat template and, for images, the processor's behaviour
    (Qwen2_5_VLProcessor differs only in what it returns for videos); Qwen2.5-VL's tokenizer adds the tool/FIM
    tokens, and its vision tower uses windowed attention, RMSNorm and a SwiGLU MLP."""
    added = QWEN2_VL_SPECIAL_TOKENS + (QWEN2_5_EXTRA_TOKENS if qwen2_5 else [])
    tokenizer = train_qwen2_tokenizer(texts, added, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    patch, merge, temporal = 14, 2, 2
    # 28 px per merged token: at least one, at most 8 tokens per image (Qwen2-VL-7B allows 16,384).
    unit = (patch * merge) ** 2
    pixels = dict(min_pixels=unit, max_pixels=8 * unit)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=temporal, **pixels
    )
    video_processor = _video_processor(
        "Qwen2VLVideoProcessor", patch_size=patch, merge_size=merge, temporal_patch_size=temporal, **pixels
    )
    processor_class = Qwen2_5_VLProcessor if qwen2_5 else Qwen2VLProcessor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )

    ids = tokenizer.convert_tokens_to_ids
    width = _widths(sizes)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=width["text_hidden"],
        intermediate_size=2 * width["text_hidden"],
        num_hidden_layers=width["text_layers"],
        num_attention_heads=width["text_heads"],
        num_key_value_heads=max(1, width["text_heads"] // 2),
        max_position_embeddings=MAX_POSITIONS,
        # M-RoPE: temporal / height / width sections of half a head (`_widths`)
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": width["mrope_section"]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if qwen2_5:
        vision = dict(
            depth=width["vision_layers"],
            hidden_size=width["vision_hidden"],
            intermediate_size=2 * width["vision_hidden"],
            num_heads=4,
            out_hidden_size=width["text_hidden"],
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=temporal,
            window_size=2 * patch * merge,
            fullatt_block_indexes=[1],
        )
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(
            depth=width["vision_layers"],
            embed_dim=width["vision_hidden"],
            hidden_size=width["text_hidden"],
            mlp_ratio=2,
            num_heads=4,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=temporal,
        )
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _set_generation_ids(model, tokenizer)
    return model, processor


# --- InternVL -----------------------------------------------------------------------------------------------------


def build_internvl(
    texts: Sequence[str], seed: int = 0, **sizes: int
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A randomly initialised InternVL (InternVL3-hf layout: InternViT tower, pixel-shuffle MLP projector, Qwen2
    language model) of about 0.2M parameters and its InternVLProcessor.

    Tiles are 56 px with 14-px patches: 16 patches, 4 tokens after the 0.5 pixel shuffle (448 px, 256 tokens in
    InternVL3); at most 2 tiles plus a thumbnail per image (12 tiles in InternVL3)."""
    added = QWEN2_VL_SPECIAL_TOKENS + QWEN2_5_EXTRA_TOKENS + INTERNVL_EXTRA_TOKENS
    tokenizer = train_qwen2_tokenizer(
        texts,
        added,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(INTERNVL_NAMED_TOKENS),
    )
    tile, patch, downsample = 56, 14, 0.5
    image_seq_length = int((tile // patch) ** 2 * downsample**2)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=2,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    video_processor = _video_processor(
        "InternVLVideoProcessor", size={"height": tile, "width": tile}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )

    width = _widths(sizes)
    vision = InternVLVisionConfig(
        hidden_size=width["vision_hidden"],
        intermediate_size=2 * width["vision_hidden"],
        num_hidden_layers=width["vision_layers"],
        num_attention_heads=4,
        image_size=[tile, tile],
        patch_size=[patch, patch],
        use_qk_norm=False,
        norm_type="layer_norm",
        use_absolute_position_embeddings=True,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=width["text_hidden"],
        intermediate_size=2 * width["text_hidden"],
        num_hidden_layers=width["text_layers"],
        num_attention_heads=width["text_heads"],
        num_key_value_heads=max(1, width["text_heads"] // 2),
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=downsample,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    return model, processor


def build_llava15(texts: Sequence[str], seed: int = 0, **sizes: int):
    """The LLaVA-1.5-shaped tiny model (`tiny.llava15_shape`) as the other builders return theirs."""
    from spavl_kedro.models import tiny

    config = tiny.llava15_shape(**sizes)
    processor = tiny.build_processor(texts, config)
    return tiny.build_model(processor, config, seed), processor


def build_llava_next(texts: Sequence[str], seed: int = 0, **sizes: int):
    """A randomly initialised LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and its `LlavaNextProcessor`: the
    LLaVA-1.5-shaped tokenizer and chat template (the Vicuna-based LLaVA-NeXT checkpoints keep LLaVA's
    `USER: ... ASSISTANT:` format), and LLaVA-NeXT's "anyres" images. Each image is cut into the tiles of the
    `image_grid_pinpoints` grid that fits it best plus the whole image at tile size, 4 tokens per 28-px tile
    (576 per 336-px tile in llava-v1.6), with a newline embedding after each row of tile features; the processor
    returns `image_sizes` so that the model can undo the padding of the tiles."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from spavl_kedro.models import tiny

    width = _widths(sizes)
    tile, patch = 28, 14
    tokenizer = tiny.train_sentencepiece(texts, VOCAB_SIZE)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]  # llava-v1.6: up to 2 x 2 of 336 px
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tiny.LLAVA15_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=width["vision_hidden"],
        intermediate_size=2 * width["vision_hidden"],
        num_hidden_layers=width["vision_layers"],
        num_attention_heads=4,
        image_size=tile,
        patch_size=patch,
        projection_dim=width["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width["text_hidden"],
        intermediate_size=2 * width["text_hidden"],
        num_hidden_layers=width["text_layers"],
        num_attention_heads=width["text_heads"],
        num_key_value_heads=width["text_heads"],
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=pinpoints,
        image_token_id=tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
        image_seq_length=(tile // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, processor


# One tiny fixture per row of the architecture table (`families.FAMILIES`), by row name (Qwen2.5-VL beside
# Qwen2-VL, whose row it shares): what `make smoke` and tests/test_families.py run every stage on.
FIXTURES = {
    "llava-1.5": build_llava15,
    "llava-next": build_llava_next,
    "qwen2-vl": build_qwen2_vl,
    "qwen2.5-vl": lambda texts, seed=0, **sizes: build_qwen2_vl(texts, seed, qwen2_5=True, **sizes),
    "internvl": build_internvl,
}
