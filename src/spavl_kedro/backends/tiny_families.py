"""Offline tiny Qwen2-VL / Qwen2.5-VL and InternVL (-hf format) models, for testing the family-generic code.

`tiny.py` stands in for LLaVA; this module stands in for the two other families of the architecture table
(`families.py`), each with its real transformers classes, its own processor, its own tokenizer kind and the chat
template its reference checkpoint ships, at a size that trains in seconds on a CPU (a few hundred thousand
parameters). What is tiny is only width, depth, vocabulary and image resolution; how an image becomes tokens is
the family's own:

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

Neither processor works without a video processor in transformers 5, and every video processor needs
torchvision, which this project does not install. `enable_videoless_processors` lets both processors be built
and loaded with a stand-in that refuses videos (see its docstring); the builders call it, and any code that
loads a saved Qwen2-VL or InternVL processor with `AutoProcessor` in a process without torchvision must call it
first.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
    InternVLVisionConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2Tokenizer,
    Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import is_torchvision_available

VOCAB_SIZE = 1024

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
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-VL's tokenizer adds these (151657..151664); InternVL3-hf's tokenizer is Qwen2.5-VL's.
QWEN2_5_EXTRA_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
# What the InternVL conversion script adds to Qwen2.5-VL's tokenizer (151665.., <IMG_CONTEXT> = 151667 there).
INTERNVL_EXTRA_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --- processors without torchvision -------------------------------------------------------------------------------


def _video_processor_base():
    from transformers.video_processing_utils import VideoProcessorMixin
    return VideoProcessorMixin


class VideolessVideoProcessor(_video_processor_base()):
    """Holds a family's video-processor slot where torchvision is missing: it saves the settings of the real
    video processor it `stands_for` (so a torchvision install loads that one from the same folder) and refuses
    videos. This project only ever sends images."""

    _input_names = {"Qwen2VLVideoProcessor": ["pixel_values_videos", "video_grid_thw"],
                    "InternVLVideoProcessor": ["pixel_values_videos"]}

    def __init__(self, stands_for: str = "Qwen2VLVideoProcessor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stands_for = stands_for
        self.model_input_names = list(self._input_names.get(stands_for, ["pixel_values_videos"]))

    def preprocess(self, videos: Any, **kwargs: Any):
        raise NotImplementedError(f"videos need {self.stands_for}, which needs torchvision; this process has none "
                                  "(backends/tiny_families.py)")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("model_input_names", None)
        output["video_processor_type"] = output.pop("stands_for")
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> "VideolessVideoProcessor":
        from transformers.video_processing_utils import BaseVideoProcessor

        # BaseVideoProcessor only reads the files here (processor_config.json's "video_processor", or the older
        # video_preprocessor_config.json); building one would need torchvision.
        kwargs.pop("trust_remote_code", None)
        settings, _ = BaseVideoProcessor.get_video_processor_dict(pretrained_model_name_or_path, **kwargs)
        settings = dict(settings)
        stands_for = settings.pop("video_processor_type", None) or "Qwen2VLVideoProcessor"
        return cls(stands_for=stands_for, **settings)


def enable_videoless_processors() -> None:
    """Let Qwen2VLProcessor / InternVLProcessor be built and loaded in a process without torchvision.

    transformers 5 gives both a required `video_processor` and (a) checks it against `VideoProcessorMixin`, which
    the top-level package does not export without torchvision, so even constructing the processor fails with
    "VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'", and (b) loads it with AutoVideoProcessor, a
    torchvision-only dummy. This resolves the base class for the check and routes the video slot of
    `ProcessorMixin.from_pretrained` to `VideolessVideoProcessor`. Process-wide and idempotent; a no-op where
    torchvision is installed, where the real video processors load."""
    if is_torchvision_available():
        return
    from transformers import processing_utils

    if not hasattr(processing_utils.transformers_module, "VideoProcessorMixin"):
        setattr(processing_utils.transformers_module, "VideoProcessorMixin", _video_processor_base())
    processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = (
        __name__, VideolessVideoProcessor.__name__)


def _video_processor(stands_for: str, **settings: Any) -> Any:
    """The real video processor where torchvision exists, else the stand-in with the same settings."""
    if is_torchvision_available():
        import transformers
        return getattr(transformers, stands_for)(**settings)
    enable_videoless_processors()
    return VideolessVideoProcessor(stands_for=stands_for, **settings)


# --- tokenizer ----------------------------------------------------------------------------------------------------


def train_qwen2_tokenizer(texts: Sequence[str], added: Sequence[str], vocab_size: int = VOCAB_SIZE,
                          **named: Any) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer whose BPE is trained on `texts` with Qwen2's own normalizer and pre-tokenizer, then the
    `added` tokens after the learned vocabulary (ids in list order, as in Qwen's checkpoints), all special.
    `named` are the tokenizer's eos/pad/... and named extra tokens (InternVL's `start_image_token`, ...)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(added), 257), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for token in added:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, **named)
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in added if t not in tokenizer.all_special_tokens]},
                                 replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"  # decoder-only batched generation
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


def build_qwen2_vl(texts: Sequence[str], seed: int = 0, qwen2_5: bool = False
                   ) -> tuple[Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor]:
    """A randomly initialised Qwen2-VL (or Qwen2.5-VL) of about 0.3M parameters and its Qwen2VLProcessor.

    Both share Qwen2VLProcessor here: Qwen2.5-VL checkpoints ship Qwen2_5_VLProcessor, which differs only by
    returning `second_per_grid_ts` for videos. Qwen2.5-VL's tokenizer additionally has the tool/FIM tokens."""
    added = QWEN2_VL_SPECIAL_TOKENS + (QWEN2_5_EXTRA_TOKENS if qwen2_5 else [])
    tokenizer = train_qwen2_tokenizer(texts, added, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    patch, merge, temporal = 14, 2, 2
    # 28 px per merged token: at least one, at most 8 tokens per image (Qwen2-VL-7B allows 16,384).
    unit = (patch * merge) ** 2
    pixels = dict(min_pixels=unit, max_pixels=8 * unit)
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                                               **pixels)
    video_processor = _video_processor("Qwen2VLVideoProcessor", patch_size=patch, merge_size=merge,
                                       temporal_patch_size=temporal, **pixels)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                # M-RoPE: temporal/height/width sections of head_dim / 2 = 8 (7B: [16, 24, 24] of 64)
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if qwen2_5:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal,
                      window_size=2 * patch * merge, fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=temporal)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                          video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                          vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config)
    _set_generation_ids(model, tokenizer)
    return model, processor


# --- InternVL -----------------------------------------------------------------------------------------------------


def build_internvl(texts: Sequence[str], seed: int = 0) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A randomly initialised InternVL (InternVL3-hf layout: InternViT tower, pixel-shuffle MLP projector, Qwen2
    language model) of about 0.3M parameters and its InternVLProcessor.

    Tiles are 56 px with 14-px patches: 16 patches, 4 tokens after the 0.5 pixel shuffle (448 px, 256 tokens in
    InternVL3); at most 2 tiles plus a thumbnail per image (12 tiles in InternVL3)."""
    added = QWEN2_VL_SPECIAL_TOKENS + QWEN2_5_EXTRA_TOKENS + INTERNVL_EXTRA_TOKENS
    tokenizer = train_qwen2_tokenizer(texts, added, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      extra_special_tokens=dict(INTERNVL_NAMED_TOKENS))
    tile, patch, downsample = 56, 14, 0.5
    image_seq_length = int((tile // patch) ** 2 * downsample ** 2)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=2,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)
    video_processor = _video_processor("InternVLVideoProcessor", size={"height": tile, "width": tile},
                                       image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=image_seq_length,
                                  chat_template=INTERNVL_CHAT_TEMPLATE)

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=[tile, tile], patch_size=[patch, patch], use_qk_norm=False,
                                  norm_type="layer_norm", use_absolute_position_embeddings=True)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                            image_seq_length=image_seq_length, downsample_ratio=downsample,
                            tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    return model, processor
