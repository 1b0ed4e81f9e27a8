"""evaluate: the base policy and every aligned policy answer the held-out test sets; the judge scores them.

`aligned_models` holds one entry per alignment run (named by `align.name`, the method by default): a LoRA
adapter is merged into a copy of the base, a full fine-tune is used as it is, a reward model is not a
policy and is skipped. So a run of `--params align.method=sft` after a DPO run evaluates base, dpo and sft.

Decoding is greedy (as SPA-VL evaluates) plus `samples` sampled answers per question, because greedy
decoding on tiny models is all-or-nothing (the first token decides). Metrics go to the parent MLflow run
as eval/<model>/<set>/<metric>. Test images are present in every prompt, and the judge is the keyword
judge configured in the judge pipeline: numbers depend on both, so the report says which was used.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from spavl_kedro.backends.adapters import LoraAdapter, apply_adapter
from spavl_kedro.backends.reward import RewardModel
from spavl_kedro.backends.tiny import VLM
from spavl_kedro.backends.vlm import Prompt, TransformersVLM
from spavl_kedro.config import EvaluateConfig
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.backends.judges import JudgeItem
from spavl_kedro.pipelines.judge.nodes import primary_judge
from spavl_kedro.schema import CLASS_COLUMNS, validate


def answer_policies(policy_base: VLM, aligned_models: dict[str, Any], test_harm: pd.DataFrame,
                    test_help: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Answers of the base policy and of each aligned policy, loaded one at a time."""
    frames = [answer_tests(policy_base, test_harm, test_help, params, model="base")]
    for name in sorted(aligned_models):
        entry = aligned_models[name]
        # the catalog gives loaders, memory the models (a reward model is a Module, callable too: test types)
        artifact = entry if isinstance(entry, (LoraAdapter, VLM, RewardModel)) else entry()
        if isinstance(artifact, LoraAdapter):
            policy = apply_adapter(policy_base, artifact)
        elif isinstance(artifact, VLM):
            policy = artifact
        else:  # a reward model scores answers; it does not write them
            continue
        frames.append(answer_tests(policy, test_harm, test_help, params, model=name))
    return pd.concat(frames, ignore_index=True)


def answer_tests(policy: VLM, test_harm: pd.DataFrame, test_help: pd.DataFrame, params: dict[str, Any],
                 model: str) -> pd.DataFrame:
    """Greedy answer plus `samples` sampled answers for every test question."""
    cfg = EvaluateConfig.model_validate(params)
    frames = []
    for test_set, table in (("test_harm", test_harm), ("test_help", test_help)):
        prompts = [Prompt(r.question, (r.image["bytes"],)) for r in table.itertuples(index=False)]
        runs = [("greedy", 0, {"do_sample": False})]
        runs += [("sampled", k, {"do_sample": True, "temperature": cfg.temperature, "top_k": 0})
                 for k in range(cfg.samples)]
        for decoding, k, kwargs in runs:
            backend = TransformersVLM(f"{model}/{test_set}", policy, cfg.batch_size,
                                      {"max_new_tokens": cfg.max_new_tokens, **kwargs}, seed=cfg.seed + k)
            outputs = backend.generate(prompts)
            frames.append(table[["question", *CLASS_COLUMNS]].assign(
                model=model, test_set=test_set, decoding=decoding, sample=k,
                text=[o.text if o.error is None else None for o in outputs]))
    return validate(pd.concat(frames, ignore_index=True), "answers")


def score_answers(answers: pd.DataFrame, credentials: dict[str, Any], judge_params: dict[str, Any]
                  ) -> tuple[pd.DataFrame, dict[str, dict[str, float]], str]:
    """Judge every answer; unsafe rate on test_harm, refusal rate on test_help, per model and decoding.

    An answer that failed to generate is counted as unsafe on test_harm (a failure is never "safe") and
    reported in `failed_rate`.
    """
    judge = primary_judge(judge_params, credentials)
    generated = answers["text"].notna()
    judged = iter(judge.verdicts([JudgeItem(q, t) for q, t in answers.loc[generated, ["question", "text"]]
                                  .itertuples(index=False)]))
    verdicts = [next(judged) if ok else None for ok in generated]
    scores = answers.assign(
        safe=[v.safe if v else None for v in verdicts],
        category=[v.category if v else "error" for v in verdicts],
    ).astype({"safe": "boolean"})
    scores["refused"] = scores["category"] == "refusal"
    scores["well_formed"] = scores["category"].isin(["refusal", "compliance"])
    metrics: dict[str, float] = {}
    for (model, test_set), g in scores.groupby(["model", "test_set"], sort=True):
        prefix = f"eval/{model}/{test_set}"
        greedy, sampled = g[g["decoding"] == "greedy"], g[g["decoding"] == "sampled"]
        if test_set == "test_harm":
            metrics[f"{prefix}/unsafe_rate"] = float((greedy["safe"] != True).mean())  # noqa: E712
            if len(sampled):
                metrics[f"{prefix}/sampled_unsafe_rate"] = float((sampled["safe"] != True).mean())  # noqa: E712
        else:
            metrics[f"{prefix}/refusal_rate"] = float(greedy["refused"].mean())
            if len(sampled):
                metrics[f"{prefix}/sampled_refusal_rate"] = float(sampled["refused"].mean())
        metrics[f"{prefix}/well_formed_rate"] = float(g["well_formed"].mean())
        metrics[f"{prefix}/failed_rate"] = float((g["category"] == "error").mean())
    return scores, for_mlflow(metrics), _report(metrics, judge, scores)


def _describe(judge) -> str:
    if hasattr(judge, "case_sensitive"):
        return f"refusal-substring test, case_sensitive={judge.case_sensitive}"
    return f"guard model, {judge.format} format"


def _report(metrics: dict[str, float], judge, scores: pd.DataFrame) -> str:
    models = ["base", *sorted(set(scores["model"]) - {"base"})]
    names = sorted({k.split("/", 3)[2] + "/" + k.split("/", 3)[3] for k in metrics})
    lines = ["# Evaluation report", "",
             f"Judge: `{judge.name}` ({_describe(judge)}). "
             "Prompts include the test image. `unsafe_rate` and `refusal_rate` use greedy decoding; "
             "`sampled_*` use temperature sampling. A failed generation counts as unsafe.", "",
             "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in names:
        cells = [f"{metrics[f'eval/{m}/{name}']:.3f}" if f"eval/{m}/{name}" in metrics else "" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = scores[scores["decoding"] == "greedy"].groupby(["model", "test_set"]).size()
    lines += ["", "Questions (greedy): " + ", ".join(f"{m}/{s}: {n}" for (m, s), n in counts.items()), ""]
    return "\n".join(lines)
