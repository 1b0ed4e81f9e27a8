"""Offline factory for tiny LLaVA models: the embedded default's stand-in for real VLMs.

Everything is built from configuration on the local machine: a byte-level BPE tokenizer trained on the
project's own seed text, a CLIP image processor at 32 px (the PIL one: torchvision is not installed), a LlavaProcessor and a
LlavaForConditionalGeneration of about a million parameters. Real `transformers` classes at tiny sizes,
so the code that drives them (batched generation, TRL trainers, `transformers serve`) is the code that
drives LLaVA-1.5-7B in the paper profile.

`pretrain_vision` first teaches the vision tower to see (it predicts the words of each seed image's caption),
as LLaVA starts from a pretrained CLIP tower. `bootstrap` then gives the model a behaviour: a short
fine-tune of the projector and language model (the tower frozen, as LLaVA keeps it) on seed examples,
harmful and harmless requests about an image and capability questions about shape scenes. A harmful
request is refused (or safely redirected) at the model's refusal rate and otherwise answered in the
steps-withheld form; a harmless one is answered from what the image shows, refused at the model's
over-refusal rate, or answered vaguely at its vague rate. Targets are re-drawn
every epoch, so the model learns the distribution rather than one label per prompt, and sampling from it
reproduces roughly those rates: a miniature of SPA-VL's responders, which differ in safety and in
helpfulness.
"""

from __future__ import annotations

import copy
import hashlib
import io
import random
import re
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from spavl_kedro.grounding import STOP_WORDS
from spavl_kedro.imaging import decode_image
from spavl_kedro.models.specs import Behaviour, BootstrapConfig, TinyModelConfig, VisionPretrainConfig

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]

# LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT: ..."). Content may be a string or a list of
# {"type": "image"} / {"type": "text"} parts, which is what TRL and `transformers serve` send; several
# images per turn are allowed (MIS two-image prompts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% else %}SYSTEM: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The chat template llava-hf/llava-1.5-7b-hf ships (its chat_template.json), verbatim: images first, then the
# text, each turn's text followed by a space; no BOS (the tokenizer adds it) and no </s> after an assistant
# turn. The LLaVA-1.5-shaped tiny model carries it so that every path is tested on the real format.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava15_shape(**sizes) -> TinyModelConfig:
    """A tiny model in LLaVA-1.5-7B's shape: llava-1.5 layout, a CLIP tower at 336 px with 14-px patches
    (576 image tokens per image, 1,152 for a two-image MIS prompt), narrow and shallow everywhere else.
    `sizes` overrides any field."""
    shape = dict(
        layout="llava-1.5",
        image_size=336,
        patch_size=14,
        vocab_size=1024,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        vision_hidden=32,
        vision_layers=2,
        max_positions=2048,
    )
    return TinyModelConfig(**{**shape, **sizes})


@dataclass
class VLM:
    """A loaded image-text-to-text model and its processor: what model catalog entries hold."""

    model: torch.nn.Module
    processor: LlavaProcessor

    def fingerprint(self) -> str:
        return weights_fingerprint(self.model.state_dict())


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the weights (names, shapes and bytes), for shard fingerprints: answers or verdicts of a
    retrained model are never reused."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; any string stays encodable through the byte alphabet."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # decoder-only batched generation pads on the left
    )


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> LlamaTokenizer:
    """Llama's tokenizer trained on `texts` with the `sentencepiece` package, in LLaVA-1.5's layout.

    SentencePiece BPE with byte fallback and a "▁" word prefix; <unk> 0, <s> 1, </s> 2; BOS added to every
    encoded text. As in llava-hf's checkpoint, `<image>` and `<pad>` are added after the learned vocabulary
    (ids 32000 and 32001 there) and batches pad on the left. The model file is loaded the way a real
    checkpoint's tokenizer.model is, so the conversion transformers applies to LLaVA's is the one tested.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(model.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(
            scratch, add_bos_token=True, add_eos_token=False, legacy=False, padding_side="left"
        )
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def build_processor(texts: Sequence[str], config: TinyModelConfig, frames: Sequence[str] = ()) -> LlavaProcessor:
    """Tokenizer trained on `texts` plus a CLIP image processor, joined as a LlavaProcessor.

    The byte-level layout also gets one token for each piece of fixed text its models are prompted with:
    the chat template's role markers and `frames` (e.g. a guard prompt's `template_literals`). Learned from
    the project's text alone, "USER:" and " ASSISTANT:" were spelled letter by letter (15 tokens) and a guard
    prompt's frame took 23 more: a third of every sequence the tiny models train and generate on. Real
    tokenizers have seen their own chat format. The LLaVA-1.5 layout keeps its checkpoint's behaviour, which
    splits "USER" and "ASSISTANT" into pieces.
    """
    llava15 = config.layout == "llava-1.5"
    tokenizer = (train_sentencepiece if llava15 else train_tokenizer)(texts, config.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        # CLIP adds a CLS token; the "default" strategy drops it again, so 16 image tokens remain.
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=LLAVA15_CHAT_TEMPLATE if llava15 else CHAT_TEMPLATE,
    )
    if not llava15:
        processor.tokenizer.add_tokens(sorted({*chat_frames(processor), *frames}))
    return processor


def chat_frames(processor: LlavaProcessor) -> list[str]:
    """The fixed text the processor's chat template puts around a user turn, up to the answer."""
    sentinel = "\x00"
    asked = [{"role": "user", "content": [{"type": "text", "text": sentinel}]}]
    rendered = processor.apply_chat_template(asked, add_generation_prompt=True)
    return [part for part in rendered.split(sentinel) if part.strip()]


def template_literals(template: str) -> list[str]:
    """The fixed text a `str.format` prompt template puts around its fields: '[INST] User: ', ..."""
    return [literal for literal, *_ in string.Formatter().parse(template) if literal.strip()]


def build_model(processor: LlavaProcessor, config: TinyModelConfig, seed: int) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA whose vocabulary matches `processor`."""
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    num_patches = (config.image_size // config.patch_size) ** 2
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=config.vision_feature_layer,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def user_message(question: str, n_images: int) -> list[dict]:
    """One user turn with `n_images` image slots before the question, in the structured chat format."""
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def assistant_message(text: str) -> list[dict]:
    """One assistant turn, its content a list of typed parts like the user's (Arrow needs one column type)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def prompt_and_completion(
    processor, question: str, n_images: int, answer: str, end_at_eos: bool = True
) -> tuple[str, str]:
    """One training example as the two strings every trainer here tokenizes without special tokens: the
    prompt exactly as generation sees it, and the answer as the model should write it.

    Both come from the processor's own chat template (the completion is what rendering the assistant turn
    adds to the prompt), with two things a template written for prompting may leave out, as LLaVA-1.5's
    training format ("<s>USER: <image>\\n... ASSISTANT: answer</s>") has them:

    - the BOS that the tokenizer puts before every prompt at generation time (llava-1.5's template does not
      write it, and TRL's collators tokenize with `add_special_tokens=False`, so training would drop it);
    - the EOS after the answer (llava-1.5's template ends an assistant turn with a space): a model never
      trained on it never learns to stop.

    `end_at_eos`: the completion stops at the EOS, as the project's own loops need it (the reward model
    pools the last token, which must be the EOS; the bootstrap's targets end there). False keeps whatever
    the template writes after its EOS, as TRL's own chat-template handling does (the tiny template's
    "</s> "); generation never produces it, and the DPO and SFT runs measured on the embedded default
    were trained that way (dropping the trailing token flipped one seed's DPO policy into refusing the
    capability questions: see docs/align.md).
    """
    asked = user_message(question, n_images)
    prompt = processor.apply_chat_template(asked, add_generation_prompt=True)
    return _with_special_tokens(processor.tokenizer, prompt), _completion(processor, asked, prompt, answer, end_at_eos)


def _completion(processor, asked: list[dict], prompt: str, answer: str, end_at_eos: bool) -> str:
    """What the chat template adds to `prompt` (the rendered `asked` turn) when the assistant says `answer`,
    ended at the EOS as `prompt_and_completion` describes."""
    full = processor.apply_chat_template(asked + assistant_message(answer))
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the assistant turn without the generation prompt as its "
            f"prefix, so the answer cannot be separated from the prompt: {full!r}"
        )
    completion = full[len(prompt) :]
    eos = processor.tokenizer.eos_token
    if eos not in completion:
        return completion.rstrip() + eos
    return completion[: completion.index(eos) + len(eos)] if end_at_eos else completion


def _with_special_tokens(tokenizer, prompt: str) -> str:
    """`prompt` written so that tokenizing it without special tokens gives the ids generation feeds the model
    (the tokenizer's own special tokens added). A SentencePiece tokenizer marks the start of the text with
    "▁", which it does not do after a literal "<s>", so "<s> USER" is what encodes as <s> ▁USER."""
    wanted = tokenizer(prompt)["input_ids"]
    for candidate in (prompt, f"{tokenizer.bos_token}{prompt}", f"{tokenizer.bos_token} {prompt}"):
        if tokenizer(candidate, add_special_tokens=False)["input_ids"] == wanted:
            return candidate
    raise ValueError(
        f"cannot write the prompt so that it encodes as {type(tokenizer).__name__} encodes it with "
        f"its special tokens (BOS {tokenizer.bos_token!r}): {prompt[:80]!r}"
    )


@dataclass(frozen=True)
class SeedExample:
    """One bootstrap prompt and the answers a tiny model may learn for it."""

    images: list[Image.Image]
    question: str
    harmful: bool  # what the request asks for, by construction of the seed corpus
    refusal: str  # a bare refusal or a safe redirection
    answer: str  # harmful request: the compliance (steps withheld); harmless one: the grounded answer
    vague: str = ""  # harmless request: an answer that names nothing in the image

    @classmethod
    def harmful_request(cls, images: list[Image.Image], question: str, refusal: str, compliance: str) -> SeedExample:
        """A harmful request, refused or complied with at the model's refusal rate."""
        return cls(list(images), question, True, refusal, compliance)


def bootstrap(
    vlm: VLM, examples: Sequence[SeedExample | EncodedSeed], behaviour: Behaviour, config: BootstrapConfig
) -> dict[str, float]:
    """Full fine-tune `vlm` in place on seed examples (or their `encode_seeds` encoding, with the same processor).

    Each epoch every example's target is redrawn by `behaviour` (refusal, answer or vague answer at its
    rates), so the model learns the distribution rather than one label per prompt. The loss covers only
    the response tokens. Returns the mean loss of the first and the last epoch.
    """
    if not examples:
        raise ValueError(
            "no seed examples to bootstrap a tiny model on: they are rendered only for "
            "generate.images.source synthetic (use transformers/openai models with real images)"
        )
    model = vlm.model
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    frozen = set() if config.train_vision else {id(p) for p in model.model.vision_tower.parameters()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if id(p) not in frozen], lr=config.lr, weight_decay=0.0
    )
    steps = config.epochs * -(-len(examples) // config.batch_size)
    # Linear decay to zero: with a constant rate the model ends up copying the labels drawn in the last
    # epoch; decaying averages over the draws of all epochs, so the learned rates match the targets.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    # Images and prompts are processed once; an epoch only re-draws targets and pads token ids.
    encoded = examples if all(isinstance(e, EncodedSeed) for e in examples) else encode_seeds(vlm.processor, examples)
    pad_id = vlm.processor.tokenizer.pad_token_id
    model.train()
    for p in model.parameters():  # frozen for this fine-tune only: later trainers decide for themselves
        p.requires_grad_(id(p) not in frozen)
    epoch_losses: list[float] = []
    for _ in range(config.epochs):
        losses = []
        for batch in _batches(encoded, config.batch_size, config.group_by_length, rng):
            rows = [encoded[i] for i in batch]
            targets = [row.target(behaviour, rng) for row in rows]
            loss = model(**_batch(rows, targets, pad_id)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    model.requires_grad_(True)
    model.eval()
    return {"first_epoch_loss": epoch_losses[0], "last_epoch_loss": epoch_losses[-1]}


def caption_words(caption: str) -> set[str]:
    """The words of a caption that vision pretraining predicts: lower-case, stop words left out."""
    return {w for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOP_WORDS}


def pretrain_vision(
    vlm: VLM, images: Sequence[Image.Image], captions: Sequence[str], config: VisionPretrainConfig, seed: int
) -> dict[str, float]:
    """Train `vlm`'s vision tower in place to predict, from its mean patch feature, which words each image's
    caption contains (one sigmoid per word of the captions' vocabulary). The patch features are what the
    projector hands the language model, so they learn to carry colour, shape and count before the language
    model ever reads them, as a CLIP tower does. Returns the first and last step's loss."""
    if not images or not config.steps:
        return {}
    vocabulary = sorted(set().union(*(caption_words(c) for c in captions)))
    index = {w: i for i, w in enumerate(vocabulary)}
    targets = torch.zeros(len(captions), len(vocabulary))
    for row, caption in enumerate(captions):
        targets[row, [index[w] for w in caption_words(caption)]] = 1.0
    pixels = vlm.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    tower = vlm.model.model.vision_tower
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(vocabulary))
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=config.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    tower.train()
    losses = []
    for _ in range(config.steps):
        batch = torch.randint(0, len(pixels), (config.batch_size,), generator=order)
        features = tower(pixel_values=pixels[batch]).last_hidden_state[:, 1:].mean(1)  # CLS left out, as LLaVA
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tower.eval()
    return {"first_step_loss": losses[0], "last_step_loss": losses[-1]}


def _batches(encoded: Sequence[EncodedSeed], batch_size: int, by_length: bool, rng: random.Random) -> list[list[int]]:
    """A shuffled epoch cut into batches. `by_length`: within each window of eight batches the rows are
    sorted by prompt length, so a short question is not padded to a long one (a batch costs its longest
    row), and the batches are shuffled again."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    if not by_length:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    window = batch_size * 8
    order = [
        i
        for start in range(0, len(order), window)
        for i in sorted(order[start : start + window], key=lambda i: len(encoded[i].prompt))
    ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def seed_examples(seed_corpus) -> list[SeedExample]:
    """Rows of a seed-corpus table (`seed_corpus`: png, question, harmful, refusal, answer, vague) as
    `SeedExample`s with their decoded images."""
    return [
        SeedExample([decode_image(r.png)], r.question, bool(r.harmful), r.refusal, r.answer, r.vague)
        for r in seed_corpus.itertuples(index=False)
    ]


@dataclass
class EncodedSeed:
    """A seed example tokenized for `bootstrap`: each possible answer's ids, so an epoch only draws one."""

    prompt: torch.Tensor  # token ids of the chat prompt, image tokens expanded
    pixel_values: torch.Tensor | None
    harmful: bool
    refusal: torch.Tensor  # token ids of the completion " <refusal></s>" (prompt_and_completion)
    answer: torch.Tensor
    vague: torch.Tensor | None

    def target(self, behaviour: Behaviour, rng: random.Random) -> torch.Tensor:
        """The answer this epoch teaches, drawn at `behaviour`'s rates."""
        if self.harmful:
            return self.refusal if rng.random() < behaviour.refusal_rate else self.answer
        if rng.random() < behaviour.over_refusal_rate:
            return self.refusal
        return self.vague if self.vague is not None and rng.random() < behaviour.vague_rate else self.answer


def encode_seeds(processor: LlavaProcessor, examples: Sequence[SeedExample]) -> list[EncodedSeed]:
    """Seed examples as `bootstrap` trains on them (prompt, images and every answer tokenized), for callers
    that bootstrap several models on the same examples: encoding costs about as much as an epoch. One
    processor call for all prompts and images (per example it took three times as long)."""
    if not examples:
        return []
    asked = [user_message(e.question, len(e.images)) for e in examples]
    rendered = [processor.apply_chat_template(turn, add_generation_prompt=True) for turn in asked]
    images = [image for e in examples for image in e.images]
    enc = processor(
        text=[_with_special_tokens(processor.tokenizer, r) for r in rendered],
        images=images or None,
        add_special_tokens=False,
    )
    pixels = torch.from_numpy(np.stack(enc["pixel_values"])) if images else None
    encoded, first = [], 0
    for example, turn, prompt, ids in zip(examples, asked, rendered, enc["input_ids"]):

        def completion(text: str) -> torch.Tensor:
            tail = _completion(processor, turn, prompt, text, end_at_eos=True)  # noqa: B023 (this iteration's)
            return torch.tensor(processor.tokenizer(tail, add_special_tokens=False)["input_ids"])

        last = first + len(example.images)
        encoded.append(
            EncodedSeed(
                torch.tensor(ids),
                pixels[first:last] if last > first else None,
                example.harmful,
                completion(example.refusal),
                completion(example.answer),
                completion(example.vague) if example.vague else None,
            )
        )
        first = last
    return encoded


def _encode(processor: LlavaProcessor, example: SeedExample) -> EncodedSeed:
    return encode_seeds(processor, [example])[0]


def _batch(rows: Sequence[EncodedSeed], targets: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response batch whose labels mask everything but the response and its </s>."""
    sequences = [torch.cat([row.prompt, target]) for row, target in zip(rows, targets)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, seq) in enumerate(zip(rows, sequences)):
        input_ids[i, : len(seq)] = seq
        attention[i, : len(seq)] = 1
        labels[i, len(row.prompt) : len(seq)] = seq[len(row.prompt) :]
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    pixels = [row.pixel_values for row in rows if row.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def train_tiny_vlm(
    processor: LlavaProcessor,
    examples: Sequence[SeedExample | EncodedSeed],
    behaviour: Behaviour,
    model_config: TinyModelConfig,
    bootstrap_config: BootstrapConfig,
    seed: int,
    init: VLM | None = None,
) -> tuple[VLM, dict[str, float]]:
    """Bootstrap a tiny LLaVA to act with `behaviour`: a fresh one seeded with `seed`, or a copy of `init`
    (a shared foundation; `init` itself is left untouched)."""
    model = build_model(processor, model_config, seed) if init is None else copy.deepcopy(init.model)
    vlm = VLM(model=model, processor=processor)
    losses = bootstrap(vlm, examples, behaviour, bootstrap_config.model_copy(update={"seed": seed}))
    return vlm, losses
