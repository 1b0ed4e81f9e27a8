"""Judges from their configuration: the one place a judge spec becomes a judge on a backend.

The judge stage (verdicts, pairs), the align stage (online RL rewarded by the primary judge) and the
evaluate stage (verdicts, help and MIS judges) build their judges here, with the same generation settings,
so a judge is asked the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from spavl_kedro.judges.core import ChatJudge, GuardJudge, KeywordJudge
from spavl_kedro.judges.guard import guard_prompt
from spavl_kedro.judges.mis import MIS_JUDGE_GENERATION, MisJudge
from spavl_kedro.judges.specs import MisJudgeSpec, PairwiseJudgeSpec, VerdictJudgeSpec
from spavl_kedro.models.costs import UsageMeter
from spavl_kedro.models.factory import build_backend


class JudgeRun(Protocol):
    """What a judge's backend takes from its stage's settings (`config.JudgeConfig` has both)."""

    batch_size: int  # prompts per generate() call of a local judge model
    seed: int  # seeds sampled re-asks


# A guard model answers in a word or two; the room for a category code and stray text is enough.
GUARD_GENERATION = {"max_new_tokens": 24, "do_sample": False}
# A chat judge explains before its verdict token.
CHAT_GENERATION = {"max_new_tokens": 512, "do_sample": False}


def refusal_rule(compliance_markers: Sequence[str] = ()) -> KeywordJudge:
    """Whether a response refuses (GCG's strings, lower-cased as VLGuard does) and, given markers, whether it
    opens a compliance: the rules scorer's reading of an answer's form."""
    return KeywordJudge(case_sensitive=False, compliance_markers=compliance_markers)


# Whether a response refuses, for the helpfulness tie-break.
REFUSAL = refusal_rule()


def build_verdict_judge(
    spec: VerdictJudgeSpec,
    credentials: Mapping[str, Any],
    cfg: JudgeRun,
    tiny_models: Mapping[str, Any] | None = None,
    meter: UsageMeter | None = None,
):
    """The judge `spec` names, built by its kind's row of `VERDICT_KINDS`; a tiny guard comes from
    `tiny_models` (the `judge_models` catalog entry). A judge behind an API counts its calls into `meter`."""
    return VERDICT_KINDS[spec.kind](spec, credentials, cfg, tiny_models, meter)


def _keyword_judge(spec: VerdictJudgeSpec, credentials, cfg: JudgeRun, tiny_models, meter) -> KeywordJudge:
    judge = KeywordJudge(compliance_markers=spec.compliance_markers, case_sensitive=spec.case_sensitive)
    judge.name = spec.name
    return judge


def _guard_judge(spec: VerdictJudgeSpec, credentials, cfg: JudgeRun, tiny_models, meter) -> GuardJudge:
    backend = build_backend(
        spec.backend,
        tiny_models=tiny_models,
        credentials=credentials,
        generation=GUARD_GENERATION,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=False,
        meter=meter,
    )
    prompt, origin = guard_prompt(spec)
    return GuardJudge(
        spec.name,
        backend,
        spec.format,
        max_retries=spec.max_retries,
        show_images=spec.sees_images,
        prompt=prompt,
        prompt_origin=origin,
    )


# Verdict-judge kinds (`judge.judges[].kind`): kind -> builder(spec, credentials, judge config, tiny models, meter).
# A new kind is a builder here and its row in specs.JUDGE_KINDS.
VERDICT_KINDS: dict[str, Callable[..., Any]] = {"keyword": _keyword_judge, "guard": _guard_judge}


def build_pairwise_judge(
    spec: PairwiseJudgeSpec,
    credentials: Mapping[str, Any],
    cfg: JudgeRun,
    progress: bool = True,
    meter: UsageMeter | None = None,
) -> ChatJudge:
    """A chat judge that compares two answers in both orders (pairs in the judge stage, HelpEval)."""
    backend = build_backend(
        spec.backend,
        credentials=credentials,
        generation=CHAT_GENERATION,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
        meter=meter,
    )
    return ChatJudge(spec.name, backend, prompt=spec.prompt, max_retries=spec.max_retries)


def build_mis_judge(
    spec: MisJudgeSpec, credentials: Mapping[str, Any], cfg: JudgeRun, meter: UsageMeter | None = None
) -> MisJudge:
    """MIS's own judge: both images, a safety label and a perception level."""
    backend = build_backend(
        spec.backend,
        credentials=credentials,
        generation=MIS_JUDGE_GENERATION,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=False,
        meter=meter,
    )
    return MisJudge(
        spec.name, backend, prompt=spec.prompt, max_retries=spec.max_retries, structured_output=spec.structured_output
    )
