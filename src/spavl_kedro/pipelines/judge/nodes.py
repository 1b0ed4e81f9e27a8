"""judge: a safety verdict per response, then one labelled pair per question.

Preferences follow SPA-VL: harmlessness first, helpfulness as the tie-break. A response whose generation
failed, or whose verdict is undecided, never enters a pair as the safe side: it is counted instead.
"""

from __future__ import annotations

import random
from typing import Any

import pandas as pd

from spavl_kedro.backends.judges import KeywordJudge
from spavl_kedro.config import JudgeConfig
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.schema import TABLES, validate


def make_judge(params: dict[str, Any]) -> KeywordJudge:
    cfg = JudgeConfig.model_validate(params)
    return KeywordJudge(compliance_markers=cfg.keyword.compliance_markers,
                        case_sensitive=cfg.keyword.case_sensitive)


def judge_responses(responses: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """One verdict per response. Failed generations get safe = null and category 'error'."""
    judge = make_judge(params)
    rows = []
    for r in responses.itertuples(index=False):
        if r.error is not None and not pd.isna(r.error):
            rows.append({"response_id": r.response_id, "judge": judge.name, "safe": None, "category": "error",
                         "score": None, "raw": r.error})
            continue
        v = judge.verdict(r.text)
        rows.append({"response_id": r.response_id, "judge": judge.name, "safe": v.safe, "category": v.category,
                     "score": v.score, "raw": v.raw})
    verdicts = pd.DataFrame(rows).astype({"safe": "boolean", "score": "Float64"})
    return validate(verdicts, "verdicts")


def pair_preferences(questions: pd.DataFrame, responses: pd.DataFrame, verdicts: pd.DataFrame,
                     params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """For each question, two responses of different responders, labelled by the judge.

    Returns the preferences and counts for MLflow: pairs made, exact ties dropped, questions skipped for
    lack of two usable responses, responses excluded because their generation or verdict failed.
    """
    cfg = JudgeConfig.model_validate(params)
    judge = make_judge(params)
    scored = responses.merge(verdicts[["response_id", "safe"]], on="response_id", how="left")
    usable = scored[scored["safe"].notna()]
    by_question = {qid: g for qid, g in usable.groupby("question_id", sort=True)}
    rows, ties, skipped = [], 0, 0
    for q in questions[questions["kept"]].itertuples(index=False):
        group = by_question.get(q.question_id)
        if group is None or group["responder"].nunique() < 2:
            skipped += 1
            continue
        rng = random.Random(f"{cfg.seed}:{q.question_id}")
        first_responder, second_responder = rng.sample(sorted(group["responder"].unique()), 2)
        first = group[group["responder"] == first_responder].iloc[0]
        second = group[group["responder"] == second_responder].iloc[0]
        outcome = judge.compare(first.text, second.text)
        if outcome.preferred is None:
            ties += 1
            continue
        chosen, rejected = (first, second) if outcome.preferred == 0 else (second, first)
        rows.append({"question_id": q.question_id, "question": q.text, "image_ids": list(q.image_ids),
                     "chosen": chosen.text, "rejected": rejected.text,
                     "class1": q.class1, "class2": q.class2, "class3": q.class3, "qtype": q.qtype,
                     "chosen_responder": chosen.responder, "rejected_responder": rejected.responder,
                     "judge": judge.name, "reason": outcome.reason, "order_consistent": outcome.order_consistent})
    prefs = validate(pd.DataFrame(rows, columns=TABLES["preferences"]), "preferences")
    n_safe = int((usable["safe"] == True).sum())  # noqa: E712 (nullable boolean)
    metrics = {
        "pairs": float(len(prefs)),
        "ties_dropped": float(ties),
        "questions_without_pair": float(skipped),
        "responses_unjudged": float(len(scored) - len(usable)),
        "pairs_by_harmlessness": float((prefs["reason"] == "harmlessness").sum()),
        "pairs_by_helpfulness": float((prefs["reason"] == "helpfulness").sum()),
        "pairs_order_consistent": float((prefs["order_consistent"] == True).sum()),  # noqa: E712
        "response_safe_rate": n_safe / max(len(usable), 1),
    }
    for name, g in usable.groupby("responder"):
        metrics[f"safe_rate/{name}"] = float((g["safe"] == True).mean())  # noqa: E712
    return prefs, for_mlflow({f"judge/{name}": value for name, value in metrics.items()})
