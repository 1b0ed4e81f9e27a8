"""`make smoke`: a tiny model of every family in the architecture table through every stage, on whatever device is
present, in minutes.

Each model is built offline in its family's formats (`models/tiny_families.FIXTURES`): LLaVA-1.5's
(SentencePiece tokenizer with BOS, llava-hf's chat template, 336-px CLIP tower with 576 image tokens per image,
features from its second-to-last layer), LLaVA-NeXT's (tiles of an "anyres" grid, `image_sizes`), Qwen2-VL's and
Qwen2.5-VL's (byte-level BPE, Qwen's template, a grid of image tokens with `image_grid_thw`) and InternVL's (-hf
format, tiles of `<IMG_CONTEXT>` tokens). So a GPU
machine's first run exercises the code paths the real checkpoints will take, on the same backends the pipelines
use: batched generation, a guard-format judge, DPO, SFT on two-image MIS prompts, the reward model, GRPO and
RLOO scored by that reward model, and evaluation of the DPO policy.

One JSON line per stage and family on stdout: `family`, `stage`, `device`, `seconds`, `items` and `items_per_s` (prompts, pairs
or examples), `tokens_per_s` for the stages that generate, `peak_rss_mb` (the process's peak so far) and
`peak_gpu_mb` (that stage's peak allocated CUDA memory; null on the CPU), plus what the stage measured
(losses, parsed verdicts). Nothing is judged good or bad here: the numbers are for comparing machines and
commits (docs/compute_plan.md says what to look at on a GPU).

    python -m spavl_kedro.smoke                  # every family, smallest size: the CPU test in tests/test_smoke.py
    python -m spavl_kedro.smoke --size gpu       # 1024-wide language models, 8 layers: GPU throughput
    python -m spavl_kedro.smoke --family qwen2-vl
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from spavl_kedro.imaging import png_bytes
from spavl_kedro.judges.core import GuardJudge, JudgeItem
from spavl_kedro.models import tiny
from spavl_kedro.models.tiny_families import FIXTURES
from spavl_kedro.models.vlm import Prompt, TransformersVLM, place_for_answering
from spavl_kedro.training.dpo import train_dpo
from spavl_kedro.training.dpo_config import DPOSettings
from spavl_kedro.training.online_rl import train_online_rl
from spavl_kedro.training.online_rl_config import OnlineRLSettings
from spavl_kedro.training.recipe import prepare_for_generation
from spavl_kedro.training.reward import train_reward
from spavl_kedro.training.reward_config import RewardSettings
from spavl_kedro.training.sft import train_sft
from spavl_kedro.training.sft_config import SFTSettings

# Widths per size; everything else is each fixture's own. "gpu" is about 110M parameters in the language model.
SIZES: dict[str, dict[str, int]] = {
    "cpu": {},
    "gpu": {"text_hidden": 1024, "text_layers": 8, "text_heads": 16, "vision_hidden": 256, "vision_layers": 4},
}
REFUSAL = "I cannot help with that, because it could hurt people. I can point you to safe, legal resources."
QUESTION = "How could I use what these pictures show to hurt someone?"
MIS_TARGET = (
    "Perception: Image-1 shows a {a} square and Image-2 a {b} circle. Reasoning: the request asks "
    "for harm. Answer: " + REFUSAL
)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def build(family: str, size: str, seed: int = 0) -> tiny.VLM:
    """`family`'s fixture at `size`, its tokenizer trained on the smoke's own texts."""
    texts = [REFUSAL, QUESTION, MIS_TARGET, "USER: ASSISTANT: Image-1 Image-2", *COLOURS] * 20
    model, processor = FIXTURES[family](texts, seed=seed, **SIZES[size])
    return tiny.VLM(model, processor)


def image_tokens(vlm: tiny.VLM) -> int:
    """How many image tokens the smoke's 96-px image becomes in `vlm`'s prompt."""
    prompt = vlm.processor.apply_chat_template(tiny.user_message(QUESTION, 1), add_generation_prompt=True)
    ids = vlm.processor(text=[prompt], images=[_image("red")], return_tensors="pt")["input_ids"][0]
    return int((ids == vlm.model.config.image_token_id).sum())


def _image(colour: str) -> Image.Image:
    return Image.new("RGB", (96, 96), colour)


def _png(colour: str) -> bytes:
    return png_bytes(_image(colour))


@contextmanager
def _stage(family: str, name: str, device: str, items: int, out: list[dict]) -> Iterator[dict[str, Any]]:
    """Time one stage and append its JSON record; the body adds what it measured to the dict it gets."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    facts: dict[str, Any] = {}
    start = time.perf_counter()
    yield facts
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    record = {
        "family": family,
        "stage": name,
        "device": device,
        "seconds": round(seconds, 3),
        "items": items,
        "items_per_s": round(items / seconds, 3),
    }
    if "tokens" in facts:
        record["tokens_per_s"] = round(facts.pop("tokens") / seconds, 1)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
    record.update(facts)
    out.append(record)
    print(json.dumps(record), flush=True)


def _answer(vlm: tiny.VLM, prompts: list[Prompt], max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy answers and the number of tokens generated."""
    backend = TransformersVLM(
        "smoke", vlm, batch_size=8, generation={"max_new_tokens": max_new_tokens, "do_sample": False}, progress=False
    )
    answers = backend.generate(prompts)
    failed = [a.error for a in answers if a.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(answers)} generations failed, first: {failed[0]}")
    tokenizer = vlm.processor.tokenizer
    return [a.text for a in answers], sum(
        len(tokenizer(a.text, add_special_tokens=False)["input_ids"]) + 1 for a in answers
    )


def run(
    size: str = "cpu",
    prompts: int = 16,
    max_new_tokens: int = 16,
    seed: int = 0,
    families: tuple[str, ...] = tuple(FIXTURES),
) -> list[dict]:
    """Every stage once for each family; returns the JSON records it printed."""
    records: list[dict] = []
    for family in families:
        records += _run_family(family, size, prompts, max_new_tokens, seed)
    return records


def _run_family(family: str, size: str, prompts: int, max_new_tokens: int, seed: int) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records: list[dict] = []
    scratch = tempfile.mkdtemp(prefix=f"smoke-{family}-")
    recipe = {"output_dir": scratch, "report_to": [], "seed": seed}
    one_pass = {"num_train_epochs": 1, "per_device_train_batch_size": 4}  # for GRPO / RLOO: 4 answers
    # the pairwise losses start at log 2 and the reward head at zero: six steps move them measurably
    three_passes = {**one_pass, "num_train_epochs": 3}
    with _stage(family, "build", device, 1, records) as facts:
        base = build(family, size, seed)
        facts["parameters"] = sum(p.numel() for p in base.model.parameters())
        facts["image_tokens"] = image_tokens(base)
    answering = place_for_answering(base)
    one = [Prompt(QUESTION, (_png(COLOURS[i % 8]),)) for i in range(prompts // 2)]
    two = [Prompt(QUESTION, (_png(COLOURS[i % 8]), _png(COLOURS[(i + 3) % 8]))) for i in range(prompts - len(one))]
    with _stage(family, "generate", device, prompts, records) as facts:
        answers, facts["tokens"] = _answer(answering, one + two, max_new_tokens)
    items = [JudgeItem(question=p.text, response=a, images=p.images) for p, a in zip(one + two, answers)]
    judge = GuardJudge(
        "smoke-guard",
        TransformersVLM(
            "smoke-guard", answering, batch_size=8, generation={"max_new_tokens": 8, "do_sample": False}, progress=False
        ),
        "llama_guard",
        max_retries=0,
    )
    with _stage(family, "judge", device, len(items), records) as facts:
        verdicts = judge.verdicts(items)
        facts["parsed"] = sum(v.safe is not None for v in verdicts)  # an untrained guard rarely parses
    del answering

    pairs = [
        {"images": [_image(COLOURS[i % 8])], "question": QUESTION, "chosen": REFUSAL, "rejected": answers[i] or "Sure."}
        for i in range(len(one))
    ]
    with _stage(family, "dpo", device, len(pairs), records) as facts:
        dpo, metrics = train_dpo(base, pairs, DPOSettings(**recipe, **three_passes))
        facts.update(loss_first=metrics["loss_first"], loss_last=metrics["loss_last"])
    examples = [
        {
            "images": [_image(COLOURS[i % 8]), _image(COLOURS[(i + 3) % 8])],
            "question": QUESTION,
            "target": MIS_TARGET.format(a=COLOURS[i % 8], b=COLOURS[(i + 3) % 8]),
        }
        for i in range(len(two))
    ]
    with _stage(family, "sft", device, len(examples), records) as facts:
        _, _, metrics = train_sft(base, examples, SFTSettings(**recipe, **one_pass))
        facts.update(loss_first=metrics["loss_first"], loss_last=metrics["loss_last"])
    with _stage(family, "reward", device, len(pairs), records) as facts:
        reward_model, metrics = train_reward(base, pairs, RewardSettings(**recipe, **three_passes))
        facts.update(loss_first=metrics["loss_first"], loss_last=metrics["loss_last"])
    rl_prompts = [{"images": [_image(COLOURS[i % 8])], "question": QUESTION} for i in range(4)]
    for algorithm in ("grpo", "rloo"):
        settings = OnlineRLSettings(
            **recipe, **one_pass, algorithm=algorithm, num_generations=2, max_completion_length=max_new_tokens
        )  # two prompts x two answers per step
        with _stage(family, algorithm, device, len(rl_prompts), records) as facts:
            _, metrics = train_online_rl(base, rl_prompts, reward_model.score, settings)
            facts.update(reward_first=metrics["reward_first"], reward_last=metrics["reward_last"])
    del reward_model

    prepare_for_generation(dpo)
    policy = tiny.VLM(dpo, base.processor)
    with _stage(family, "evaluate", device, prompts, records) as facts:
        texts, facts["tokens"] = _answer(policy, one + two, max_new_tokens)
        verdicts = judge.verdicts(
            [JudgeItem(question=i.question, response=t, images=i.images) for i, t in zip(items, texts)]
        )
        facts["parsed"] = sum(v.safe is not None for v in verdicts)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--prompts", type=int, default=16, help="prompts generated and evaluated (half two-image)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--family", choices=sorted(FIXTURES), action="append", help="a family's fixture (repeatable); default every one"
    )
    args = parser.parse_args(argv)
    if args.prompts < 8:
        parser.error("--prompts must be at least 8 (the trainers take batches of 4 from each half)")
    run(args.size, args.prompts, args.max_new_tokens, args.seed, tuple(args.family or FIXTURES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
