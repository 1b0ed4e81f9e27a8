"""Measure what batching and concurrency buy: TransformersVLM batch 16 vs 1, OpenAIVLM concurrency 8 vs 1.

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--batch-size 16] [--max-new-tokens 32] [--record] [--quick]
                                              [--requests 32] [--concurrency 8] [--delay 0.2] [--threads 1]

1. Local: a tiny LLaVA built offline with the `tiny.model` sizes of conf/base/parameters_generate.yml
   answers `--prompts` single-image prompts, greedy. min_new_tokens = max_new_tokens: the model is random
   and may emit </s> early, so every row is forced to the full length and both runs do the same work.
2. API: an aiohttp server started here answers every /v1/chat/completions after a fixed `--delay` (a
   stand-in for a remote GPU), and OpenAIVLM sends it `--requests` single-image prompts. The ideal
   speedup is the concurrency (8); the gap is client and server overhead.

The last line printed is JSON: {"batched_speedup": ..., "api_concurrency_speedup": ..., the raw seconds
and the settings}. With another busy process on the second core, keep --threads 1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from PIL import Image  # noqa: E402

from spavl_kedro.models.specs import TinyModelConfig
from spavl_kedro.models.tiny import VLM, build_model, build_processor
from spavl_kedro.models.vlm import OpenAIVLM, Prompt, TransformersVLM  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))
from record import record, table  # noqa: E402
from serving import ChatEndpoint  # noqa: E402  (the test suite's stub endpoint)


def single_image_prompts(n: int) -> list[Prompt]:
    prompts = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (96, 96), (i * 37 % 256, 80, 255 - i * 11 % 256)).save(buffer, "PNG")
        prompts.append(Prompt(f"Question {i}: what does this picture show?", (buffer.getvalue(),)))
    return prompts


def tiny_llava() -> VLM:
    sizes = yaml.safe_load((PROJECT / "conf/base/parameters_generate.yml").read_text())["tiny"]["model"]
    config = TinyModelConfig(**sizes)
    texts = ["I'm sorry, but I cannot help with that request.", "Sure, here are the steps: first, [step withheld]."]
    processor = build_processor(texts * 50, config)
    return VLM(model=build_model(processor, config, seed=0).eval(), processor=processor)


def time_local(vlm: VLM, prompts: list[Prompt], batch_size: int, max_new_tokens: int) -> float:
    generation = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    backend = TransformersVLM(f"batch{batch_size}", vlm, batch_size=batch_size, generation=generation, progress=False)
    began = time.perf_counter()
    results = backend.generate(prompts)
    seconds = time.perf_counter() - began
    assert all(g.error is None for g in results), [g.error for g in results if g.error][:1]
    return seconds


class SlowServer(ChatEndpoint):
    """/v1/chat/completions that answers after `delay_s` (tests/serving.py's endpoint)."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        super().__init__(max_body=16 * 2**20)

    async def _chat(self, request: web.Request) -> web.Response:
        await request.json()
        await asyncio.sleep(self.delay_s)
        message = {"role": "assistant", "content": "I'm sorry, but I cannot help with that request."}
        return web.json_response({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


def time_api(base_url: str, prompts: list[Prompt], concurrency: int) -> float:
    backend = OpenAIVLM(
        "bench",
        base_urls=[base_url],
        model="slow",
        concurrency=concurrency,
        generation={"max_new_tokens": 32, "do_sample": False},
        progress=False,
    )
    began = time.perf_counter()
    results = backend.generate(prompts)
    seconds = time.perf_counter() - began
    assert all(g.error is None for g in results), [g.error for g in results if g.error][:1]
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="local single-image prompts")
    parser.add_argument("--batch-size", type=int, default=16, help="batched run's batch size (vs 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer, forced (min = max)")
    parser.add_argument("--requests", type=int, default=32, help="API requests")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent run's requests in flight (vs 1)")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the fake server takes per answer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the local runs")
    parser.add_argument("--quick", action="store_true", help="a few prompts and requests: checks that it runs")
    parser.add_argument("--record", action="store_true", help="write the figures into docs/generate.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.batch_size, args.max_new_tokens = 4, 2, 2
        args.requests, args.concurrency, args.delay = 4, 2, 0.01
    torch.set_num_threads(args.threads)

    vlm = tiny_llava()
    prompts = single_image_prompts(args.prompts)
    time_local(vlm, prompts[:2], 2, 4)  # warm-up: first-call allocations and lazy imports
    seconds_batch_1 = time_local(vlm, prompts, 1, args.max_new_tokens)
    seconds_batched = time_local(vlm, prompts, args.batch_size, args.max_new_tokens)

    server = SlowServer(args.delay)
    try:
        requests = single_image_prompts(args.requests)
        time_api(server.base_url, requests[:2], 2)  # warm-up: connection set-up, imports
        seconds_sequential = time_api(server.base_url, requests, 1)
        seconds_concurrent = time_api(server.base_url, requests, args.concurrency)
    finally:
        server.close()

    figures = {
        "batched_speedup": round(seconds_batch_1 / seconds_batched, 2),
        "api_concurrency_speedup": round(seconds_sequential / seconds_concurrent, 2),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "seconds_batch_1": round(seconds_batch_1, 2),
        f"seconds_batch_{args.batch_size}": round(seconds_batched, 2),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "server_delay_s": args.delay,
        "seconds_concurrency_1": round(seconds_sequential, 2),
        f"seconds_concurrency_{args.concurrency}": round(seconds_concurrent, 2),
    }
    print(json.dumps(figures))
    if args.record and not args.quick:
        rows = [
            [
                "`batched_speedup`",
                f"{args.prompts} single-image prompts, {args.max_new_tokens} new tokens each, batch "
                f"{args.batch_size} vs batch 1, {args.threads} torch thread(s)",
                f"**{figures['batched_speedup']}** ({seconds_batch_1:.2f} s → {seconds_batched:.2f} s)",
            ],
            [
                "`api_concurrency_speedup`",
                f"{args.requests} requests to a local OpenAI-compatible server answering after "
                f"{args.delay * 1000:.0f} ms, concurrency {args.concurrency} vs 1",
                f"**{figures['api_concurrency_speedup']}** ({seconds_sequential:.2f} s → {seconds_concurrent:.2f} s)",
            ],
        ]
        body = table(["measure", "setting", "result"], rows)
        record("generate.md", "generation.py", "benchmarks/generation.py --record", body)


if __name__ == "__main__":
    main()
