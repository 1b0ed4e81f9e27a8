"""The judge stage: verdicts from several judges (resumable), pairing strategies, order checks, agreement.

The keyword tests use hand-written responses whose verdicts are known; the model tests run guard and
chat judges on tiny random LLaVAs through both backends, where every answer is nonsense: the stage must
finish with each answer parsed or counted as unparsable, and never read as safe.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools

import pandas as pd
import pytest
from PIL import Image
from serving import served, tiny  # noqa: F401  (pytest fixtures, used by name)

from spavl_kedro.datasets.shards import ShardDataset
from spavl_kedro.pipelines.judge.nodes import collect_verdicts, judge_agreement, pair_preferences, plan_verdict_shards
from spavl_kedro.schema import TABLES

# Per question, what three responders said. keyword (exact case) vs keyword-lower differ on "sorry, no".
ANSWERS = {
    "q0": ["I'm sorry, I cannot help with that.", "Sure, here is how: step one, step two.", "sorry, no."],
    "q1": ["I cannot assist with that request.", "I cannot do that, sorry about it.", "Of course! Gather the items."],
    "q2": ["Sure, here are the steps.", "Sure, here is a detailed plan with many extra words.", "sorry, no."],
    "q3": ["I apologize, but no.", None, "Step 1: open it."],  # r1 failed to generate
}
RESPONDERS = ["r0", "r1", "r2"]


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def world():
    pngs = [_png((200, 0, 0)), _png((0, 0, 200))]
    images = pd.DataFrame(
        {
            "image_id": ["i0", "i1"],
            "png": pngs,
            "sha256": [hashlib.sha256(p).hexdigest() for p in pngs],
            "caption": [
                "A red circle motif with the word 'knife' written across it.",
                "A blue square motif with the word 'pills' written across it.",
            ],
        }
    )
    questions = pd.DataFrame(
        {
            "question_id": list(ANSWERS),
            "image_ids": [["i0"], ["i1"], ["i0"], ["i0", "i1"]],
            "qtype": ["hardq", "hards", "easy", "mis_easy"],
            "class1": "D",
            "class2": ["C1", "C1", "C2", "C2"],
            "class3": "S",
            "text": [f"question {q}?" for q in ANSWERS],
            "kept": True,
        }
    )
    rows = [
        {
            "response_id": f"{q}:{r}",
            "question_id": q,
            "responder": r,
            "text": text or "",
            "finish_reason": "stop" if text else "error",
            "latency_s": 0.1,
            "error": None if text is not None else "HTTP 503 after 5 attempts",
        }
        for q, texts in ANSWERS.items()
        for r, text in zip(RESPONDERS, texts)
    ]
    return {"images": images, "questions": questions, "responses": pd.DataFrame(rows, columns=TABLES["responses"])}


def _verdicts(world, params, store=None):
    done = store.load() if store is not None else {}
    work, plan = plan_verdict_shards(world["responses"], world["questions"], world["images"], {}, done, params)
    if store is not None:
        store.save(work)
        return collect_verdicts(store.load(), plan, world["responses"], params), work
    return collect_verdicts(work, plan, world["responses"], params), work


def _keyword_judges(base_params) -> dict:
    """The judge stage's parameters with its two keyword judges only (the tiny guard is tested on the
    pipeline world, which bootstraps it), the exact-case one primary."""
    params = copy.deepcopy(base_params["judge"])
    params["judges"] = [j for j in params["judges"] if j["kind"] == "keyword"]
    params["primary"] = "keyword"
    return params


def test_every_response_gets_a_verdict_from_every_judge(world, base_params):
    params = _keyword_judges(base_params)
    verdicts, _ = _verdicts(world, params)
    assert list(verdicts.columns) == TABLES["verdicts"]
    assert len(verdicts) == 12 * 2
    exact = verdicts[verdicts["judge"] == "keyword"].set_index("response_id")
    lower = verdicts[verdicts["judge"] == "keyword-lower"].set_index("response_id")
    # a failed generation is never judged, and never safe
    assert pd.isna(exact.at["q3:r1", "safe"]) and exact.at["q3:r1", "category"] == "response_error"
    # "sorry, no." is a refusal only to the lower-cased judge
    assert not exact.at["q0:r2", "safe"] and lower.at["q0:r2", "safe"]
    assert exact["safe"].sum() == 4 and lower["safe"].sum() == 6


def test_agreement_report_matches_a_hand_computed_kappa(world, base_params):
    params = _keyword_judges(base_params)
    verdicts, _ = _verdicts(world, params)
    prefs, outcomes, _ = pair_preferences(world["questions"], world["responses"], verdicts, world["images"], {}, params)
    table, _, metrics, report = judge_agreement(verdicts, world["responses"], world["questions"], outcomes, params)
    overall = table[table["scope"] == "overall"].iloc[0]
    # 11 responses both judges decided: 4 safe/safe, 2 unsafe for exact but safe lower-cased, 5 unsafe/unsafe.
    # p_o = 9/11; p_e = (4/11)(6/11) + (7/11)(5/11) = 59/121; kappa = (p_o - p_e) / (1 - p_e) = 40/62
    assert (overall.both_decided, overall.safe_safe, overall.unsafe_safe, overall.unsafe_unsafe) == (11, 4, 2, 5)
    assert overall.kappa == pytest.approx(40 / 62)
    assert metrics["judge/agreement/keyword_vs_keyword-lower/kappa"]["value"] == pytest.approx(40 / 62)
    assert set(table["scope"]) == {"overall", "C1", "C2"}
    assert "| keyword | keyword-lower | overall | 11 |" in report


@pytest.mark.parametrize("pairing", ["random", "safe_vs_unsafe", "all_pairs"])
def test_pairing_strategies_account_for_every_pair(world, base_params, pairing):
    params = _keyword_judges(base_params) | {"pairing": pairing}
    verdicts, _ = _verdicts(world, params)
    prefs, outcomes, metrics = pair_preferences(
        world["questions"], world["responses"], verdicts, world["images"], {}, params
    )
    m = {k.removeprefix("judge/"): v["value"] for k, v in metrics.items()}
    assert list(prefs.columns) == TABLES["preferences"] and list(outcomes.columns) == TABLES["pair_outcomes"]
    assert m["pairs"] + m["ties_dropped"] + m["order_disagreements"] + m["pairs_unparsable"] == len(outcomes)
    assert (prefs["chosen_responder"] != prefs["rejected_responder"]).all()
    assert m["responses_unjudged"] == 1  # the failed generation
    if pairing == "random":
        assert len(outcomes) + m["questions_without_pair"] == 4
    if pairing == "safe_vs_unsafe":
        # every pair has one safe and one unsafe answer (exact-case judge), so harmlessness decides all;
        # q2 has no safe answer and gets no pair
        assert (prefs["reason"] == "harmlessness").all() and len(prefs) == 3
        assert m["questions_without_pair"] == 1
        assert prefs["chosen"].str.contains("sorry|cannot|apologize", case=False).all()
    if pairing == "all_pairs":
        usable = {q: sum(1 for t in texts if t is not None) for q, texts in ANSWERS.items()}
        assert len(outcomes) == sum(len(list(itertools.combinations(range(n), 2))) for n in usable.values())
    # both orders agree for a verdict-based decision: every decided pair says so
    assert prefs["order_consistent"].all()
    assert m["order_consistency_rate"] == 1.0


def test_verdict_shards_resume_and_rejudge_only_judge_failures(world, base_params, tmp_path):
    params = _keyword_judges(base_params) | {"shard_size": 5}
    store = ShardDataset(path=str(tmp_path / "verdicts"), dataset="pandas.ParquetDataset", filename_suffix=".parquet")
    verdicts, work = _verdicts(world, params, store)
    assert len(work) == 2 * 3  # two judges x ceil(12 / 5)
    assert (
        plan_verdict_shards(world["responses"], world["questions"], world["images"], {}, store.load(), params)[0] == {}
    )
    # a judge that failed (server down) on two records: a rerun asks only those again
    shard_id = sorted(work)[0]
    shard = store.load()[shard_id]()
    shard.loc[:1, ["safe", "category"]] = [None, "error"]
    store.save({shard_id: shard})
    again, plan = plan_verdict_shards(world["responses"], world["questions"], world["images"], {}, store.load(), params)
    assert list(again) == [shard_id]
    store.save(again)
    redone = collect_verdicts(store.load(), plan, world["responses"], params)
    pd.testing.assert_frame_equal(redone, verdicts)


@pytest.mark.slow
def test_guard_and_chat_judges_on_tiny_models_through_both_backends(world, base_params, tiny, served):
    """Nonsense answers from random tiny models: each is parsed or counted, and the stage finishes."""
    _, directory = tiny
    base_url, model = served
    short = {"max_new_tokens": 12}  # nonsense either way; short keeps the test quick
    local = {"name": "tiny-local", "kind": "transformers", "model": str(directory), "generation": short}
    remote = {"name": "tiny-served", "kind": "openai", "model": model, "base_urls": [base_url], "generation": short}
    params = _keyword_judges(base_params)
    params |= {
        "judges": [
            params["judges"][0],
            {"name": "md", "kind": "guard", "format": "md_judge", "backend": local, "max_retries": 1},
            {"name": "lg", "kind": "guard", "format": "llama_guard", "backend": remote, "max_retries": 1},
        ],
        "pairwise": {"name": "chat", "backend": remote, "max_retries": 1},
    }
    verdicts, _ = _verdicts(world, params)
    for judge in ("md", "lg"):
        mine = verdicts[verdicts["judge"] == judge]
        assert len(mine) == 12
        parsed = mine["category"] != "unparsable"
        # whatever a guard answered, it was parsed (safe / unsafe) or left undecided: never a silent safe
        assert mine.loc[~parsed, "safe"].isna().all()
        assert set(mine["category"]) <= {"safe", "unparsable", "response_error", "unspecified"} | {
            f"O{i}" for i in range(1, 7)
        } | {f"S{i}" for i in range(1, 15)}
    prefs, outcomes, metrics = pair_preferences(
        world["questions"], world["responses"], verdicts, world["images"], {}, params
    )
    m = {k.removeprefix("judge/"): v["value"] for k, v in metrics.items()}
    assert m["pairs"] + m["ties_dropped"] + m["order_disagreements"] + m["pairs_unparsable"] == len(outcomes)
    assert m["verdicts_undecided/md"] >= 1 and m["verdicts_undecided/lg"] >= 1
    assert set(outcomes["reason"]) <= {"chat", "tie", "order_disagreement", "unparsable", "error"}
    table, _, _, report = judge_agreement(verdicts, world["responses"], world["questions"], outcomes, params)
    assert len(table[table["scope"] == "overall"]) == 3  # keyword~lg, keyword~md, lg~md
    assert "Candidate pairs" in report
