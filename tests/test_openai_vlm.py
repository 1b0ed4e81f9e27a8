"""OpenAIVLM against a real `transformers serve` of a tiny LLaVA, and against a scripted fake server for
the failure paths a real server will not produce on demand (503s, 400s, hangs, Retry-After).

The tiny model and the server are the fixtures of tests/serving.py (shared with tests/test_judges.py).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter

import pytest
from aiohttp import web
from PIL import Image
from serving import ChatEndpoint, free_port, served, tiny  # noqa: F401  (pytest fixtures, used by name)

from spavl_kedro.models.vlm import Generation, OpenAIVLM, Prompt, TransformersVLM
from spavl_kedro.seeding import offset_seed

GREEDY = {"max_new_tokens": 12, "do_sample": False}
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230)]


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


def prompts_with_images(n: int, images_per_prompt) -> list[Prompt]:
    """Distinct questions and colours, so a random model answers each differently and order is visible."""
    return [
        Prompt(
            f"Question {i}: what do these pictures show{'?' * (i + 1)}",
            tuple(png(COLOURS[(i + k) % len(COLOURS)]) for k in range(images_per_prompt(i))),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- the real server


@pytest.mark.slow
def test_served_tiny_llava_answers_like_the_local_model_in_order(served, tiny):
    base_url, model = served
    prompts = prompts_with_images(6, lambda i: 1 + i % 2)  # one- and two-image prompts mixed
    backend = OpenAIVLM(
        "served",
        base_urls=[base_url + "/"],
        model=model,
        generation=GREEDY,
        concurrency=3,
        timeout_s=60,
        progress=False,
    )
    remote = backend.generate(prompts)

    assert len(remote) == 6
    assert [g.error for g in remote] == [None] * 6
    assert {g.finish_reason for g in remote} <= {"stop", "length"}
    assert all(g.latency_s > 0 for g in remote)
    # Greedy on the same weights: the server saw exactly the prompt TransformersVLM builds (image parts,
    # then text) and answers came back in input order — the six answers differ, so a swap would show.
    local = TransformersVLM("local", tiny[0], batch_size=1, generation=GREEDY, progress=False).generate(prompts)
    assert [g.text for g in remote] == [g.text for g in local]
    assert len({g.text for g in remote}) >= 4


@pytest.mark.slow
def test_served_two_image_prompts_reach_the_model_whole(served, tiny):
    base_url, model = served
    red, blue = png(COLOURS[0]), png(COLOURS[2])
    # Same question; only the second image differs between the first two prompts.
    prompts = [Prompt("Compare the two pictures.", images) for images in ((red, blue), (red, red), (blue, red))]
    backend = OpenAIVLM(
        "served", base_urls=[base_url], model=model, generation=GREEDY, concurrency=3, timeout_s=60, progress=False
    )
    remote = backend.generate(prompts)
    local = TransformersVLM("local", tiny[0], batch_size=3, generation=GREEDY, progress=False).generate(prompts)
    assert [g.error for g in remote] == [None] * 3
    assert [g.text for g in remote] == [g.text for g in local]
    assert remote[0].text != remote[1].text  # the second image changed the answer: it reached the model


@pytest.mark.slow
def test_served_wrong_model_name_fails_at_once_with_the_servers_reason(served):
    base_url, _ = served
    backend = OpenAIVLM(
        "served",
        base_urls=[base_url],
        model="not-the-served-model",
        generation=GREEDY,
        max_retries=3,
        backoff_s=5.0,
        progress=False,
    )
    began = time.perf_counter()
    [result] = backend.generate(prompts_with_images(1, lambda i: 1))
    assert result.finish_reason == "error"
    assert result.error.startswith("HTTP 400 after 1 attempt:") and "pinned" in result.error
    assert time.perf_counter() - began < 5.0  # no backoff for a 4xx


# ---------------------------------------------------------------- TransformersVLM, batched, two images


def test_transformers_vlm_batches_two_image_prompts_in_order(tiny):
    prompts = prompts_with_images(6, lambda i: 2)
    batched = TransformersVLM("tiny", tiny[0], batch_size=4, generation=GREEDY, progress=False).generate(prompts)
    single = TransformersVLM("tiny", tiny[0], batch_size=1, generation=GREEDY, progress=False).generate(prompts)
    assert len(batched) == 6
    assert [g.error for g in batched] == [None] * 6
    assert {g.finish_reason for g in batched} <= {"stop", "length"}
    # Left padding in a batch of 4 (2 + 2 ragged batches) changes nothing, and order is kept.
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({g.text for g in batched}) >= 4


# ---------------------------------------------------------------- a scripted fake server


class FakeServer(ChatEndpoint):
    """An OpenAI-style endpoint on 127.0.0.1 in a background thread. The question text picks the behaviour:
    "flaky*" 503 twice then 200, "down*" always 503, "bad*" 400, "slow*" sleeps `slow_s`, "limited*" one
    429 with Retry-After: `retry_after`; anything else 200 echoing the question and its image count."""

    def __init__(self, slow_s: float = 2.0, retry_after: str = "0.3"):
        self.slow_s, self.retry_after = slow_s, retry_after
        self.seen: Counter[str] = Counter()
        self.requests: list[dict] = []
        super().__init__()

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        parts = body["messages"][0]["content"]
        question = parts[-1]["text"]
        self.seen[question] += 1
        self.requests.append({"authorization": request.headers.get("Authorization"), "body": body})
        if question.startswith("flaky") and self.seen[question] <= 2 or question.startswith("down"):
            return web.json_response({"error": "overloaded, try again"}, status=503)
        if question.startswith("bad"):
            return web.json_response({"error": "unknown field 'frobnicate'"}, status=400)
        if question.startswith("limited") and self.seen[question] == 1:
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": self.retry_after})
        if question.startswith("slow"):
            await asyncio.sleep(self.slow_s)
        n_images = sum(part["type"] == "image_url" for part in parts)
        answer = {"role": "assistant", "content": f"echo {question} [{n_images} images]"}
        return web.json_response({"choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def fake_backend(server: FakeServer, **kwargs) -> OpenAIVLM:
    settings = dict(
        name="fake",
        base_urls=[server.base_url],
        model="m",
        generation=GREEDY,
        backoff_s=0.05,
        max_retries=3,
        timeout_s=5.0,
        progress=False,
    )
    return OpenAIVLM(**{**settings, **kwargs})


def test_503_is_retried_with_backoff_and_400_fails_at_once(fake):
    prompts = [Prompt("flaky one", (png(COLOURS[0]),)), Prompt("bad one"), Prompt("fine one")]
    flaky, bad, fine = fake_backend(fake).generate(prompts)

    assert (flaky.error, flaky.text, flaky.finish_reason) == (None, "echo flaky one [1 images]", "stop")
    assert fake.seen["flaky one"] == 3  # 503, 503, 200
    assert flaky.latency_s >= 0.05 / 2 + 0.1 / 2  # two backoffs, each at least half its step
    assert fake.seen["bad one"] == 1  # no retry for a 4xx
    assert bad.finish_reason == "error" and bad.text == ""
    assert bad.error.startswith("HTTP 400 after 1 attempt: ") and "frobnicate" in bad.error
    assert fine.error is None and fine.text == "echo fine one [0 images]"


def test_persistent_5xx_gives_up_after_max_retries(fake):
    [down] = fake_backend(fake, max_retries=2).generate([Prompt("down always")])
    assert fake.seen["down always"] == 3
    assert down.finish_reason == "error"
    assert down.error.startswith("HTTP 503 after 3 attempts: ") and "overloaded" in down.error


def test_timeouts_become_an_error_record_after_max_retries():
    server = FakeServer(slow_s=1.0)
    try:
        results = fake_backend(server, timeout_s=0.2, max_retries=1).generate([Prompt("slow one"), Prompt("quick")])
    finally:
        server.close()
    assert server.seen["slow one"] == 2
    assert results[0].finish_reason == "error" and results[0].error == "timeout (0.2 s) after 2 attempts"
    assert results[1].error is None


def test_refused_connection_is_retried_then_kept_as_error():
    port = free_port()  # nothing listens there
    backend = OpenAIVLM(
        "nobody", base_urls=[f"http://127.0.0.1:{port}/v1"], model="m", max_retries=1, backoff_s=0.01, progress=False
    )
    [result] = backend.generate([Prompt("hello")])
    assert result.finish_reason == "error"
    assert result.error.startswith("ClientConnectorError after 2 attempts")


def test_retry_after_is_honoured_and_capped():
    server = FakeServer(retry_after="0.4")
    try:
        [honoured] = fake_backend(server, backoff_s=0.01).generate([Prompt("limited a")])
        server.retry_after = "3600"  # an hour: the cap (max_backoff_s) wins
        [capped] = fake_backend(server, backoff_s=0.01, max_backoff_s=0.2).generate([Prompt("limited b")])
    finally:
        server.close()
    assert honoured.error is None and honoured.latency_s >= 0.4
    assert capped.error is None and 0.2 <= capped.latency_s < 2.0


def test_api_key_is_sent_but_never_shown(fake):
    backend = fake_backend(fake, api_key="sk-test-123456")
    assert "sk-test-123456" not in repr(backend) and "api_key" not in repr(backend)
    backend.generate([Prompt("hello")])
    assert fake.requests[0]["authorization"] == "Bearer sk-test-123456"
    assert fake_backend(fake).generate([Prompt("anonymous")])[0].error is None
    assert fake.requests[1]["authorization"] is None


def test_request_carries_mapped_generation_fields_and_a_seed_per_record(fake):
    generation = {"max_new_tokens": 32, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    fake_backend(fake, generation=generation, seed=5, concurrency=1).generate([Prompt("a"), Prompt("b")])
    bodies = [r["body"] for r in fake.requests]
    assert {k: v for k, v in bodies[0].items() if k != "messages"} == {
        "model": "m",
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": offset_seed(5, 0),
    }
    assert bodies[1]["seed"] == offset_seed(5, 1) == 5 * 1_000_003 + 1
    fake_backend(fake, generation={"max_new_tokens": 4, "do_sample": False, "top_p": 0.9}).generate([Prompt("g")])
    assert fake.requests[2]["body"]["temperature"] == 0.0 and "top_p" not in fake.requests[2]["body"]


def test_generation_key_without_an_api_equivalent_fails_before_any_request():
    with pytest.raises(ValueError, match="'top_k'=50 has no chat-completions equivalent"):
        OpenAIVLM("x", base_urls=["http://localhost:8000/v1"], model="m", generation={"top_k": 50})
    with pytest.raises(ValueError, match="base_urls is empty"):
        OpenAIVLM("x", base_urls=[], model="m")


def test_requests_spread_over_several_base_urls_and_return_in_order():
    # Each answer takes 0.2 s on either server, so the least-busy rule must keep both loaded; with instant
    # answers one server may legitimately finish nearly everything before the other is asked.
    servers = [FakeServer(slow_s=0.2), FakeServer(slow_s=0.2)]
    try:
        prompts = [Prompt(f"slow{i}", (png(COLOURS[i % 6]),) * (1 + i % 2)) for i in range(12)]
        backend = OpenAIVLM("pool", base_urls=[s.base_url for s in servers], model="m", concurrency=4, progress=False)
        results = backend.generate(prompts)
    finally:
        for server in servers:
            server.close()
    assert [g.text for g in results] == [f"echo slow{i} [{1 + i % 2} images]" for i in range(12)]
    assert all(len(s.requests) >= 5 for s in servers)
    assert sum(len(s.requests) for s in servers) == 12


def test_generate_works_inside_a_running_event_loop(fake):
    backend = fake_backend(fake)

    async def notebook_cell() -> list[Generation]:
        return backend.generate([Prompt("from a notebook"), Prompt("second")])

    results = asyncio.run(notebook_cell())
    assert [g.text for g in results] == ["echo from a notebook [0 images]", "echo second [0 images]"]


# ---------------------------------------------------------------- the generate stage with a served responder


@pytest.mark.slow
def test_generate_stage_answers_with_served_and_local_responders(served, tiny, base_params, tmp_path):
    """An `openai` responder (key from credentials) and a `transformers` responder answer the same one- and
    two-image questions through the stage's shards; greedy on the same weights, their answers agree."""
    import copy
    import hashlib

    import pandas as pd

    from spavl_kedro.datasets.shards import ShardDataset
    from spavl_kedro.pipelines.generate.responses import collect_responses, plan_response_shards

    base_url, model = served
    _, directory = tiny
    pixels = [png(c) for c in COLOURS[:3]]
    images = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "png": pixels, "sha256": [hashlib.sha256(p).hexdigest() for p in pixels]}
    )
    questions = pd.DataFrame(
        {
            "question_id": [f"q{i}" for i in range(5)],
            "image_ids": [["a"], ["b"], ["a", "c"], ["c", "b"], ["b"]],
            "text": [f"What is shown here, number {i}?" for i in range(5)],
            "kept": True,
        }
    )
    gen = copy.deepcopy(base_params["generate"])
    gen.update(
        shard_size=2,
        generation=GREEDY,
        responders=[
            {"name": "served", "kind": "openai", "model": model, "base_urls": [base_url], "api_key": "local"},
            {"name": "local", "kind": "transformers", "model": str(directory)},
        ],
    )
    store = ShardDataset(path=str(tmp_path / "shards"), dataset="pandas.ParquetDataset", filename_suffix=".parquet")
    credentials = {"local": {"api_key": "sk-test"}}
    work, plan = plan_response_shards(questions, images, {}, credentials, store.load(), gen)
    store.save(work)
    responses = collect_responses(store.load(), plan, questions, gen)

    assert len(responses) == 10 and responses["error"].isna().all()
    by = responses.pivot(index="question_id", columns="responder", values="text")
    assert (by["served"] == by["local"]).all()

    with pytest.raises(ValueError, match="api_key 'local' is not in conf/local/credentials.yml"):
        plan_response_shards(questions, images, {}, {}, {}, gen)  # fails before any shard is answered
