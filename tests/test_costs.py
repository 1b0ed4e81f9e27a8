"""API cost accounting: the tokens a server reports are counted per stage and model, priced, logged to the
run's MLflow parent run, and held to a budget that stops a sharded stage between shards; a rerun resumes from
the shards and the spend on disk.

The server is an OpenAI-compatible endpoint on 127.0.0.1 (tests/serving.py's `ChatEndpoint`) that reports
fixed usage per model, so every expected number below is a sum of those.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import mlflow
import pandas as pd
import pytest
from aiohttp import web
from conftest import copy_project
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image
from serving import ChatEndpoint

from spavl_kedro.config import JudgeConfig, VerdictJudgeSpec
from spavl_kedro.judges.core import JudgeItem
from spavl_kedro.judges.factory import build_verdict_judge
from spavl_kedro.models.costs import BudgetExceeded, ModelPrice, SpendLedger, StageSpend, cost_metrics
from spavl_kedro.models.vlm import OpenAIVLM, Prompt
from spavl_kedro.schema import TABLES

# (prompt_tokens, completion_tokens) the server reports for every answer of a model
USAGE = {"m-a": (1000, 50), "m-b": (400, 20)}
PRICE_A = {"model": "m-a", "input_usd_per_1m": 2.5, "output_usd_per_1m": 10.0}  # m-b stays unpriced
SHARD_USD = (2 * 1000 * 2.5 + 2 * 50 * 10.0) / 1e6  # two questions of m-a: $0.006


class UsageServer(ChatEndpoint):
    """Answers every chat completion with the model's `USAGE`, except: a question containing "no-usage" gets an
    answer without `usage`, "overloaded" a 503 the first time, "mumble" an answer no guard can parse (others
    read "safe"). Counts each answered (model, question)."""

    def __init__(self) -> None:
        self.answered: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[str] = Counter()
        super().__init__()

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        question = body["messages"][0]["content"][-1]["text"]
        if "overloaded" in question and not self.refused[question]:
            self.refused[question] += 1
            return web.json_response({"error": "overloaded"}, status=503)
        self.answered[body["model"], question] += 1
        text = "hmm" if "mumble" in question else "safe"
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        if "no-usage" not in question:
            prompt, completion = USAGE[body["model"]]
            answer["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return web.json_response(answer)


@pytest.fixture
def server():
    endpoint = UsageServer()
    yield endpoint
    endpoint.close()


def test_an_api_backend_counts_reported_tokens_and_marks_calls_without_usage(server):
    ledger = SpendLedger()
    backend = OpenAIVLM(
        "writer",
        base_urls=[server.base_url],
        model="m-a",
        generation={"max_new_tokens": 8},
        backoff_s=0.01,
        progress=False,
        meter=ledger.meter("generate"),
    )
    backend.generate([Prompt("plain"), Prompt("overloaded, then fine"), Prompt("no-usage here")])

    # the 503 is not a call anyone pays for; the answer without usage is counted, its tokens left unknown
    assert ledger.rows() == [
        {
            "stage": "generate",
            "name": "writer",
            "model": "m-a",
            "calls": 3,
            "calls_without_usage": 1,
            "input_tokens": 2000,
            "output_tokens": 100,
        }
    ]
    metrics = cost_metrics(ledger, [ModelPrice(**PRICE_A)])
    assert metrics == {
        "cost/generate/writer/input_tokens": 2000.0,
        "cost/generate/writer/output_tokens": 100.0,
        "cost/generate/writer/usd": pytest.approx(0.006, abs=1e-12),
        "cost/generate/writer/calls_without_usage": 1.0,
        "cost/generate/usd": pytest.approx(0.006, abs=1e-12),
    }


def test_a_judges_retries_are_counted_under_its_stage(server, params):
    ledger = SpendLedger()
    cfg = JudgeConfig.model_validate(params["judge"])
    spec = {
        "name": "api-guard",
        "kind": "guard",
        "format": "md_judge",
        "max_retries": 2,
        "backend": {"name": "api-guard", "kind": "openai", "model": "m-b", "base_urls": [server.base_url]},
    }
    judge = build_verdict_judge(VerdictJudgeSpec.model_validate(spec), {}, cfg, meter=ledger.meter("judge"))
    verdicts = judge.verdicts([JudgeItem("q", "a fine answer"), JudgeItem("q", "mumble")])
    assert [v.safe for v in verdicts] == [True, None]
    # one call for the readable answer; the unreadable one is asked again twice (sampled copies of the
    # backend share its meter)
    assert ledger.rows() == [
        {
            "stage": "judge",
            "name": "api-guard",
            "model": "m-b",
            "calls": 4,
            "calls_without_usage": 0,
            "input_tokens": 1600,
            "output_tokens": 80,
        }
    ]


def test_a_stage_over_its_budget_stops_before_its_next_batch_of_calls():
    ledger = SpendLedger(
        [
            {
                "stage": "judge",
                "name": "j",
                "model": "m-a",
                "calls": 2,
                "calls_without_usage": 0,
                "input_tokens": 2000,
                "output_tokens": 100,
            }
        ]
    )
    spend = StageSpend(ledger, "judge", [ModelPrice(**PRICE_A)], budget_usd=0.006)
    with pytest.raises(
        BudgetExceeded,
        match=r"judge: API spend \$0\.0060 has reached its budget "
        r"costs\.budget_usd\.judge = \$0\.0060",
    ):
        spend.guard({"j/00000": lambda: None})
    assert spend.guard({}) == {}  # nothing left to do: nothing to stop
    # another stage's budget, or no budget, does not see judge's spend
    StageSpend(ledger, "evaluate", [ModelPrice(**PRICE_A)], budget_usd=0.006).check()
    StageSpend(ledger, "judge", [ModelPrice(**PRICE_A)]).check()


# ---------------------------------------------------------------- a sharded stage in a Kedro run


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40 * n, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_world(root, n_questions: int) -> list[str]:
    """images and questions in the project copy, as the generate stage's earlier nodes would write them."""
    pngs = [_png(i) for i in range(2)]
    images = pd.DataFrame(
        [
            {
                "image_id": f"img{i}",
                "class1": "D",
                "class2": "C",
                "class3": "S",
                "source": "test",
                "sha256": hashlib.sha256(png).hexdigest(),
                "width": 16,
                "height": 16,
                "caption": "",
                "png": png,
            }
            for i, png in enumerate(pngs)
        ],
        columns=TABLES["images"],
    )
    texts = [f"What is in picture {k}?" for k in range(n_questions)]
    questions = pd.DataFrame(
        [
            {
                "question_id": f"q{k}",
                "image_ids": [f"img{k % 2}"],
                "qtype": "easy",
                "class1": "D",
                "class2": "C",
                "class3": "S",
                "text": text,
                "writer": "template",
                "harmful": False,
                "screen_raw": "",
                "kept": True,
                "drop_reason": None,
            }
            for k, text in enumerate(texts)
        ],
        columns=TABLES["questions"],
    )
    (root / "data/03_primary").mkdir(parents=True)
    images.to_parquet(root / "data/03_primary/images.parquet")
    questions.to_parquet(root / "data/03_primary/questions.parquet")
    # no tiny responder here: an empty collection (one placeholder folder, never loaded)
    (root / "data/06_models/responders/unused").mkdir(parents=True)
    return texts


def _run(root, server: UsageServer, budget: float) -> None:
    """`kedro run --pipeline generate --nodes plan_response_shards,collect_responses` with two API responders
    on one server: m-a priced, m-b not; shards of two questions, answered in id order (one server, one lane)."""
    responders = [
        {"name": name, "kind": "openai", "model": model, "base_urls": [server.base_url], "max_retries": 0}
        for name, model in (("api-a", "m-a"), ("api-b", "m-b"))
    ]
    params = {
        "generate": {"responders": responders, "shard_size": 2},
        "evaluate": {"reference_responder": None},  # the default's reference is a tiny responder
        "preflight": {"gate": False},  # the fake server has no /models to check
        "costs": {"prices": [PRICE_A], "budget_usd": {"generate": budget}},
    }
    with KedroSession.create(project_path=root, runtime_params=params) as session:
        session.run(pipeline_names=["generate"], node_names=["plan_response_shards", "collect_responses"])


def _parent_runs(root) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("spavl_kedro")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _costs(run) -> dict[str, float]:
    return {name: value for name, value in run.data.metrics.items() if name.startswith("cost/")}


@pytest.mark.slow  # three Kedro runs with MLflow (~20 s); make test runs it, make test-fast does not
def test_a_budget_stops_a_sharded_stage_keeps_its_shards_and_a_rerun_resumes(server, tmp_path, monkeypatch):
    root = copy_project(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # restored after the test
    texts = _write_world(root, 6)
    bootstrap_project(root)
    shards = root / "data/07_model_output/response_shards"
    ledger = root / "data/07_model_output/api_spend.json"

    # 1. A budget of 1.5 shards of m-a: the first two shards run (the budget is checked before each), the
    #    third does not start. The run fails naming the stage, the spend and the budget.
    with pytest.raises(
        Exception,
        match=r"generate: API spend \$0\.0120 has reached its budget "
        r"costs\.budget_usd\.generate = \$0\.0090",
    ):
        _run(root, server, budget=1.5 * SHARD_USD)
    assert sorted(p.relative_to(shards).as_posix() for p in shards.rglob("*.parquet")) == [
        "api-a/00000.parquet",
        "api-a/00001.parquet",
    ]
    assert sum(server.answered.values()) == 4
    assert json.loads(ledger.read_text()) == [
        {
            "stage": "generate",
            "name": "api-a",
            "model": "m-a",
            "calls": 4,
            "calls_without_usage": 0,
            "input_tokens": 4000,
            "output_tokens": 200,
        }
    ]
    stopped = _parent_runs(root)[-1]
    assert stopped.info.status == "FAILED"
    assert _costs(stopped) == {
        "cost/generate/api-a/input_tokens": 4000.0,
        "cost/generate/api-a/output_tokens": 200.0,
        "cost/generate/api-a/usd": pytest.approx(0.012, abs=1e-12),
        "cost/generate/usd": pytest.approx(0.012, abs=1e-12),
    }

    # 2. The same budget again: the spend so far is on disk, so the stage stops before asking anything.
    with pytest.raises(BudgetExceeded, match=r"\$0\.0120 has reached its budget"):
        _run(root, server, budget=1.5 * SHARD_USD)
    assert sum(server.answered.values()) == 4

    # 3. A higher budget: the rerun answers only the four shards not on disk, and every question has been
    #    asked of each model exactly once over the three runs.
    _run(root, server, budget=1.0)
    assert server.answered == Counter({(model, text): 1 for model in USAGE for text in texts})
    responses = pd.read_parquet(root / "data/07_model_output/responses.parquet")
    assert len(responses) == 12 and responses["error"].isna().all()
    assert json.loads(ledger.read_text()) == [
        {
            "stage": "generate",
            "name": "api-a",
            "model": "m-a",
            "calls": 6,
            "calls_without_usage": 0,
            "input_tokens": 6000,
            "output_tokens": 300,
        },
        {
            "stage": "generate",
            "name": "api-b",
            "model": "m-b",
            "calls": 6,
            "calls_without_usage": 0,
            "input_tokens": 2400,
            "output_tokens": 120,
        },
    ]
    finished = _parent_runs(root)[-1]
    assert finished.info.status == "FINISHED"
    # what the stage's data cost over the three runs; m-b is counted in tokens only (it has no price)
    assert _costs(finished) == {
        "cost/generate/api-a/input_tokens": 6000.0,
        "cost/generate/api-a/output_tokens": 300.0,
        "cost/generate/api-a/usd": pytest.approx(0.018, abs=1e-12),
        "cost/generate/api-b/input_tokens": 2400.0,
        "cost/generate/api-b/output_tokens": 120.0,
        "cost/generate/usd": pytest.approx(0.018, abs=1e-12),
    }
