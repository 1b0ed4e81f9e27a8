"""Responders behind different servers answer at the same time (`Lanes` in pipelines/sharding.py), each
shard is written as it finishes, and the responses table is the one a sequential run writes."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import threading
import time

import pandas as pd
import pytest
from aiohttp import web
from kedro.io import DatasetError
from PIL import Image
from serving import ChatEndpoint

from spavl_kedro.datasets.shards import ShardDataset
from spavl_kedro.pipelines.generate.responses import collect_responses, plan_response_shards
from spavl_kedro.pipelines.sharding import Lanes

DELAY_S = 0.3  # per request, as a loaded server might take; the sums below are made of it


class SlowServer(ChatEndpoint):
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers each request after DELAY_S, echoing the model,
    the question and the request's seed, and notes when each request was being answered."""

    def __init__(self) -> None:
        self.busy: list[tuple[float, float]] = []
        super().__init__()

    async def _chat(self, request: web.Request) -> web.Response:
        began = time.perf_counter()
        body = await request.json()
        await asyncio.sleep(DELAY_S)
        question = body["messages"][0]["content"][-1]["text"]
        self.busy.append((began, time.perf_counter()))
        answer = {"role": "assistant", "content": f"{body['model']} on {question!r}, seed {body.get('seed')}"}
        return web.json_response({"choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def servers():
    pair = [SlowServer(), SlowServer()]
    yield pair
    for server in pair:
        server.close()


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40 * n, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _world(n_questions: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.DataFrame(
        [{"image_id": f"img{i}", "sha256": hashlib.sha256(_png(i)).hexdigest(), "png": _png(i)} for i in range(2)]
    )
    questions = pd.DataFrame(
        [
            {"question_id": f"q{k}", "image_ids": [f"img{k % 2}"], "text": f"What is in picture {k}?", "kept": True}
            for k in range(n_questions)
        ]
    )
    return questions, images


def _store(path) -> ShardDataset:
    return ShardDataset(path=str(path), dataset="pandas.ParquetDataset", filename_suffix=".parquet")


@pytest.mark.slow
def test_two_served_responders_answer_at_once_and_write_what_a_sequential_run_writes(servers, params, tmp_path):
    questions, images = _world(4)
    gen = copy.deepcopy(params["generate"])
    # one request in flight per responder: a shard of 2 questions takes 2 x DELAY_S, a responder 2 shards
    gen.update(
        shard_size=2,
        generation={"max_new_tokens": 8, "do_sample": False},
        responders=[
            {
                "name": f"served-{k}",
                "kind": "openai",
                "model": f"model-{k}",
                "base_urls": [server.base_url],
                "concurrency": 1,
            }
            for k, server in enumerate(servers)
        ],
    )
    one_responder_s = 4 * DELAY_S

    sequential = _store(tmp_path / "sequential")
    work, plan = plan_response_shards(questions, images, {}, {}, sequential.load(), gen)
    assert isinstance(work, Lanes) and len(set(work.lane_of.values())) == 2
    began = time.perf_counter()
    sequential.save(dict(work))  # a plain dict: one shard after another, in id order (as before lanes)
    sequential_s = time.perf_counter() - began

    concurrent = _store(tmp_path / "concurrent")
    work, plan_again = plan_response_shards(questions, images, {}, {}, concurrent.load(), gen)
    for server in servers:
        server.busy.clear()
    began = time.perf_counter()
    concurrent.save(work)
    concurrent_s = time.perf_counter() - began

    assert sequential_s >= 2 * one_responder_s
    assert concurrent_s < 0.75 * sequential_s, (concurrent_s, sequential_s)
    spans = [(server.busy[0][0], server.busy[-1][1]) for server in servers]  # first request began, last ended
    assert spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]  # the two servers were busy at the same time

    pd.testing.assert_frame_equal(plan_again, plan)
    tables = [
        collect_responses(store.load(), plan, questions, gen).drop(columns="latency_s")
        for store in (sequential, concurrent)
    ]
    pd.testing.assert_frame_equal(tables[1], tables[0])  # same rows, same order, same texts and seeds
    assert tables[0]["error"].isna().all() and len(tables[0]) == 8
    assert tables[0]["text"].iloc[0] == "model-0 on 'What is in picture 0?', seed 0"
    assert plan_response_shards(questions, images, {}, {}, concurrent.load(), gen)[0] == {}  # a rerun skips all


def test_a_shard_is_written_as_soon_as_it_finishes(tmp_path):
    store = _store(tmp_path)

    def slow() -> pd.DataFrame:
        # Written in id order, "a/0" would come first and this would wait for ever: the other lane's shard
        # must reach the disk while this one still runs.
        deadline = time.monotonic() + 10
        while not (tmp_path / "b" / "0.parquet").exists():
            assert time.monotonic() < deadline, "the finished shard b/0 was not written while a/0 ran"
            time.sleep(0.02)
        return pd.DataFrame({"x": [1]})

    store.save(Lanes({"a/0": slow, "b/0": lambda: pd.DataFrame({"x": [2]})}, {"a/0": "a", "b/0": "b"}))
    assert sorted(store.load()) == ["a/0", "b/0"]


def test_a_failing_shard_stops_the_lanes_and_keeps_finished_shards(tmp_path):
    store = _store(tmp_path)
    started, failed, called = threading.Event(), threading.Event(), []

    def boom() -> pd.DataFrame:
        started.wait(5)
        failed.set()
        raise RuntimeError("model failed to load")

    def running() -> pd.DataFrame:
        started.set()
        failed.wait(5)
        time.sleep(0.2)  # still running when the other lane fails: it finishes and is kept
        called.append("y/0")
        return pd.DataFrame({"x": [1]})

    def next_one() -> pd.DataFrame:
        called.append("y/1")
        return pd.DataFrame({"x": [2]})

    with pytest.raises(DatasetError, match="model failed to load"):  # Kedro wraps what a save raises
        store.save(Lanes({"x/0": boom, "y/0": running, "y/1": next_one}, {"x/0": "x", "y/0": "y", "y/1": "y"}))
    assert called == ["y/0"] and sorted(store.load()) == ["y/0"]
