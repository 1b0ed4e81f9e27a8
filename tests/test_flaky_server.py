"""Generation through a flaky OpenAI-compatible server: a real `transformers serve` behind a proxy that
answers 429, 500, a timeout or truncated JSON at configured, seeded rates.

The responses stage must complete through retries; records whose every attempt fails (here: questions the
proxy always refuses) are kept with their error and counted, never dropped and never answered empty; a
rerun retries only those.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import random
from collections import Counter

import aiohttp
import pandas as pd
import pytest
from aiohttp import web
from PIL import Image
from serving import ChatEndpoint, free_port, served, tiny  # noqa: F401  (pytest fixtures, used by name)

from spavl_kedro.pipelines.generate.nodes import summarise_generation
from spavl_kedro.pipelines.generate.responses import collect_responses, plan_response_shards
from spavl_kedro.schema import TABLES

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

RATES = {"429": 0.15, "500": 0.15, "timeout": 0.1, "truncated": 0.1}  # the rest are forwarded as they are
ALWAYS_FAIL = "unlucky"  # questions containing this word get 500 on every attempt


class FlakyProxy(ChatEndpoint):
    """Forwards /v1/chat/completions to `upstream`, injecting faults by a seeded draw per request."""

    def __init__(self, upstream: str, seed: int = 0, hang_s: float = 3.0) -> None:
        self.upstream, self.hang_s = upstream, hang_s
        self.rng = random.Random(seed)
        self.faults: Counter[str] = Counter()
        super().__init__()

    def _draw(self) -> str:
        x, edge = self.rng.random(), 0.0
        for fault, rate in RATES.items():
            edge += rate
            if x < edge:
                return fault
        return "ok"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if ALWAYS_FAIL.encode() in body:
            self.faults["always_500"] += 1
            return web.json_response({"error": "internal error"}, status=500)
        fault = self._draw()
        self.faults[fault] += 1
        if fault == "429":
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": "0.05"})
        if fault == "500":
            return web.json_response({"error": "internal error"}, status=500)
        if fault == "timeout":
            await asyncio.sleep(self.hang_s)  # longer than the client's timeout
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{self.upstream}/chat/completions", data=body, headers={"Content-Type": "application/json"}
            ) as upstream:
                text = await upstream.text()
                status = upstream.status
        if fault == "truncated" and status == 200:
            return web.Response(text=text[: len(text) // 2], status=200, content_type="application/json")
        return web.Response(text=text, status=status, content_type="application/json")


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (n * 20 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _world(n_questions: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.DataFrame(
        [
            {
                "image_id": f"img{i}",
                "class1": "D",
                "class2": "C",
                "class3": "S",
                "source": "test",
                "sha256": hashlib.sha256(_png(i)).hexdigest(),
                "width": 32,
                "height": 32,
                "caption": "",
                "png": _png(i),
            }
            for i in range(4)
        ],
        columns=TABLES["images"],
    )
    questions = pd.DataFrame(
        [
            {
                "question_id": f"q{k:03d}",
                "image_ids": [f"img{k % 4}"],
                "qtype": "easy",
                "class1": "D",
                "class2": "C",
                "class3": "S",
                "text": f"{'An unlucky' if k in (3, 11) else 'A'} question number {k} about the picture?",
                "writer": "template",
                "harmful": False,
                "screen_raw": "",
                "kept": True,
                "drop_reason": None,
            }
            for k in range(n_questions)
        ],
        columns=TABLES["questions"],
    )
    return questions, images


def _run(questions, images, params, done):
    shards, plan = plan_response_shards(questions, images, {}, {}, done, params)
    stored = dict(done)
    for shard_id, work in sorted(shards.items()):
        frame = work()
        stored[shard_id] = (lambda f: lambda: f)(frame)
    return shards, collect_responses(stored, plan, questions, params), stored


def test_generation_completes_through_faults_and_counts_what_still_failed(served, params):  # noqa: F811
    base_url, model = served
    proxy = FlakyProxy(base_url, seed=0)
    try:
        questions, images = _world(24)
        cfg = copy.deepcopy(params["generate"])
        spec = {
            "kind": "openai",
            "model": model,
            "base_urls": [proxy.base_url],
            "concurrency": 4,
            "timeout_s": 1.5,
            "max_retries": 6,
            "backoff_s": 0.05,
        }
        cfg["responders"] = [{"name": "flaky-a", **spec}, {"name": "flaky-b", **spec}]
        cfg["generation"] = {"max_new_tokens": 8, "do_sample": False}
        cfg["shard_size"] = 8
        _, responses, stored = _run(questions, images, cfg, {})

        assert len(responses) == 24 * 2 and not responses.duplicated(["question_id", "responder"]).any()
        failed = responses[responses["error"].notna()]
        # exactly the two questions the proxy always refuses, for both responders, with the server's answer
        assert sorted(failed["question_id"]) == ["q003", "q003", "q011", "q011"]
        assert failed["error"].str.contains("HTTP 500").all() and failed["text"].fillna("").eq("").all()
        answered = responses[responses["error"].isna()]
        assert (answered["text"].str.len() > 0).all()
        for fault in ("429", "500", "timeout", "truncated"):
            assert proxy.faults[fault] > 0, proxy.faults  # every fault kind happened and was survived
        metrics = summarise_generation(
            {},
            pd.DataFrame(columns=TABLES["image_quarantine"]),
            questions,
            pd.DataFrame(columns=TABLES["mis_cot"]),
            responses,
        )
        counted = {k: v["value"] for k, v in metrics.items()}
        assert counted["generate/responses_failed"] == 4

        # a rerun asks again for the four failed records only (the proxy still refuses them)
        before = sum(proxy.faults.values())
        shards, again, _ = _run(questions, images, cfg, stored)
        assert sum(proxy.faults.values()) - before == 4 * (1 + 6)  # four records, seven attempts each
        assert sorted(again.loc[again["error"].notna(), "question_id"]) == ["q003", "q003", "q011", "q011"]
        pd.testing.assert_frame_equal(
            again[again["error"].isna()].drop(columns="latency_s").reset_index(drop=True),
            answered.drop(columns="latency_s").reset_index(drop=True),
        )
    finally:
        proxy.close()
