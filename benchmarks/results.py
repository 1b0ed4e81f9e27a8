"""docs/results.md from the runs of `miniature_seeds.py --report`: per claim, the seed mean and spread, the paired
difference aligned − base with a bootstrap interval over seeds and items, chance where there is one, and on how
many seeds the claimed direction holds.

A claim compares one aligned policy with the base policy on the same items of one run (paired), so the
interval reflects both sources of chance the miniature has: which seed built the world and its models, and
which items were drawn. Two-level percentile bootstrap: seeds with replacement, then each drawn seed's items
with replacement; the statistic is the mean over the drawn seeds of their mean paired difference.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from spavl_kedro.scenes import KINDS, chance

RESAMPLES = 4000
# What the default run is made from besides the code: its configuration and its raw text. When either changes,
# docs/results.md is stale (tests/test_docs.py). A code change that moves the default's tables needs a new
# report too; comparing the tables before and after the change shows whether it does.
# What the default's figures are computed from: its parameters, the accelerate configs and the raw seed texts.
# The catalog says where data lives, not what it holds, so a new output dataset does not make the page stale.
INPUTS = (("conf/base", "parameters*.yml"), ("conf/base", "accelerate/*.y*ml"), ("data/01_raw", "*.yml"))
FINGERPRINT = re.compile(r"inputs sha256 `([0-9a-f]{16})`")
LEVEL = 0.95
GUARD = "tiny-guard"


@dataclass(frozen=True)
class Claim:
    label: str
    eval_set: str
    metric: str
    scorer: str
    model: str  # the aligned policy compared with `base`
    better: str  # "lower" or "higher": the direction the papers report
    decoding: str = "greedy"
    variant: str | None = None  # None: the set's default variant
    wording: str | None = None  # "seen" / "unseen": only test items of that wording


CLAIMS = [
    *(
        Claim(
            f"HarmEval unsafe rate, {w} wording ({d})", "test_harm", "unsafe_rate", GUARD, "dpo", "lower", d, wording=w
        )
        for w in ("unseen", "seen")
        for d in ("greedy", "sampled")
    ),
    Claim("HarmEval unsafe rate, all (greedy)", "test_harm", "unsafe_rate", GUARD, "dpo", "lower"),
    *(
        Claim(
            f"HelpEval win rate vs reference, {w} wording",
            "test_help",
            "win_rate",
            "helpfulness_rule",
            "dpo",
            "higher",
            wording=w,
        )
        for w in ("unseen", "seen")
    ),
    Claim("over-refusal on benign probes (sampled)", "benign", "refusal_rate", "rules", "dpo", "lower", "sampled"),
    Claim("capability accuracy", "capability", "accuracy", "rules", "dpo", "higher"),
    Claim("capability accuracy", "capability", "accuracy", "rules", "sft", "higher"),
    Claim("MIS ASR (greedy)", "mis_test", "asr", GUARD, "sft", "lower"),
    Claim("MIS ASR (sampled)", "mis_test", "asr", GUARD, "sft", "lower", "sampled"),
    Claim("MIS RSR (greedy)", "mis_test", "rsr", GUARD, "sft", "higher"),
    *(
        Claim(f"{name} ASR", eval_set, "asr", GUARD, model, "lower", variant=variant)
        for name, eval_set, variant in (
            ("MM-SafetyBench text-only", "mm_safetybench", "text_only"),
            ("MM-SafetyBench typo", "mm_safetybench", "typo"),
            ("FigStep", "figstep", "figstep"),
            ("AdvBench no image", "advbench", "no_image"),
        )
        for model in ("dpo", "sft")
    ),
]


def _per_item(scores: pd.DataFrame, items: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """item x model: the item's value (sampled answers averaged), for the claim's rows."""
    hit = scores[
        (scores["eval_set"] == claim.eval_set)
        & (scores["metric"] == claim.metric)
        & (scores["scorer"] == claim.scorer)
        & (scores["decoding"] == claim.decoding)
        & (scores["variant"] == (claim.variant or "default"))
        & scores["model"].isin(["base", claim.model])
    ]
    if claim.wording is not None:
        keep = items.loc[(items["eval_set"] == claim.eval_set) & (items["wording"] == claim.wording), "item_id"]
        hit = hit[hit["item_id"].isin(set(keep))]
    return hit.groupby(["item_id", "model"])["value"].mean().unstack("model")


def _bootstrap(diffs: list[np.ndarray], seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    per_seed = np.stack([d[rng.integers(0, len(d), size=(RESAMPLES, len(d)))].mean(axis=1) for d in diffs])
    drawn = rng.integers(0, len(diffs), size=(RESAMPLES, len(diffs)))
    stats = per_seed[drawn, np.arange(RESAMPLES)[:, None]].mean(axis=1)
    tail = (1 - LEVEL) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def _floor(tables: dict, claim: Claim) -> dict[str, float]:
    """Per model, the claim's figure on the image-blanked copies of its items (greedy), averaged over seeds."""
    blanked = Claim(
        claim.label,
        claim.eval_set,
        claim.metric,
        claim.scorer,
        claim.model,
        claim.better,
        "greedy",
        "image_blanked",
        claim.wording,
    )
    means: dict[str, list[float]] = {}
    for scores, items in tables.values():
        wide = _per_item(scores, items, blanked)
        for model in wide.columns:
            means.setdefault(model, []).append(float(wide[model].mean()))
    return {model: float(np.mean(v)) for model, v in means.items()}


def summarise(runs: dict[int, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The claims table and the judges' accuracy table over the runs (seed -> project copy)."""
    tables = {
        seed: (
            pd.read_parquet(root / "data/08_reporting/eval_scores.parquet"),
            pd.read_parquet(
                root / "data/05_model_input/eval_items.parquet", columns=["item_id", "eval_set", "variant", "wording"]
            ),
        )
        for seed, root in runs.items()
    }
    rows = []
    for claim in CLAIMS:
        base, aligned, diffs = [], [], []
        for scores, items in tables.values():
            wide = _per_item(scores, items, claim)
            if {"base", claim.model} - set(wide.columns):
                continue
            wide = wide.dropna()
            if wide.empty:
                continue
            base.append(wide["base"].mean())
            aligned.append(wide[claim.model].mean())
            diffs.append((wide[claim.model] - wide["base"]).to_numpy())
        if not diffs:
            continue
        floor = _floor(tables, claim)
        low, high = _bootstrap(diffs)
        sign = -1 if claim.better == "lower" else 1
        holds = sum(sign * d.mean() > 0 for d in diffs)
        guess = float(np.mean([chance(k) for k in KINDS])) if claim.eval_set == "capability" else None
        rows.append(
            {
                "claim": claim.label,
                "aligned": claim.model,
                "better": claim.better,
                "seeds": len(diffs),
                "items": int(np.mean([len(d) for d in diffs])),
                "base_mean": float(np.mean(base)),
                "base_min": float(np.min(base)),
                "base_max": float(np.max(base)),
                "aligned_mean": float(np.mean(aligned)),
                "aligned_min": float(np.min(aligned)),
                "aligned_max": float(np.max(aligned)),
                "difference": float(np.mean([d.mean() for d in diffs])),
                "ci_low": low,
                "ci_high": high,
                "holds": int(holds),
                "chance": guess,
                "floor_base": floor.get("base"),
                "floor_aligned": floor.get(claim.model),
            }
        )
    judges = []
    for seed, root in runs.items():
        responders = pd.read_parquet(root / "data/08_reporting/judge_accuracy.parquet").assign(answers="responders")
        policies = pd.read_parquet(root / "data/08_reporting/eval_judge_accuracy.parquet")
        policies = policies.assign(answers="policy " + policies["model"])
        judges.append(
            pd.concat([responders, policies], ignore_index=True).assign(seed=seed)[
                ["seed", "answers", "judge", "accuracy", "fpr", "fnr", "auroc"]
            ]
        )
    return pd.DataFrame(rows), pd.concat(judges, ignore_index=True)


def _verdict(row) -> str:
    if row.ci_low > 0 or row.ci_high < 0:
        went = "lower" if row.ci_high < 0 else "higher"
        return f"**{went}** ({'as claimed' if went == row.better else 'against the claim'})"
    return "not resolved (interval holds 0)"


def inputs_fingerprint(project: Path) -> str:
    """sha256 (16 hex digits) over the default run's inputs (INPUTS): each file's path and parsed content, in
    order. Comments and layout are left out: a reworded comment does not make the figures stale."""
    digest = hashlib.sha256()
    for folder, pattern in INPUTS:
        for path in sorted((project / folder).glob(pattern)):
            content = json.dumps(yaml.safe_load(path.read_text()), sort_keys=True, default=str)
            digest.update(path.relative_to(project).as_posix().encode() + b"\0" + content.encode())
    return digest.hexdigest()[:16]


def recorded_fingerprint(page: str) -> str | None:
    """The inputs fingerprint a results page was generated from (None: the page records none)."""
    found = FINGERPRINT.search(page)
    return found.group(1) if found else None


def write_results(
    runs: dict[int, Path],
    out: Path,
    dev_seeds: tuple[int, ...],
    seconds: dict[int, float],
    machine: dict,
    fingerprint: str,
) -> str:
    claims, judges = summarise(runs)
    f = lambda v: f"{v:.3f}"  # noqa: E731
    seeds = sorted(runs)
    lines = [
        "# Results of the embedded default over fresh seeds",
        "",
        "Generated by `.venv/bin/python benchmarks/miniature_seeds.py --report` "
        f"({dt.date.today().isoformat()}); do not edit by hand.",
        "",
        "## Protocol",
        "",
        f"- Recipes (DPO's learning rate, SFT's recipe, the wording grammar, the guard's examples) were chosen on "
        f"the development seeds {list(dev_seeds)} and validation items only. The seeds below, {seeds}, were run "
        "once each with the recipes as committed; nothing was tuned on them, and every claim is printed as it "
        "came out.",
        "- One run per seed: `kedro run` of all six pipelines in its own project copy, every seed of the run "
        "(generate, tiny bootstraps, judge, split, align, evaluate) set to the run's seed. The held-out wording "
        "families, the images, the models and the test items all change with the seed.",
        "- A claim compares an aligned policy with the base policy on the same items of the same run. "
        f"`difference` is aligned − base, averaged over seeds; its {LEVEL:.0%} interval is a two-level "
        f"percentile bootstrap ({RESAMPLES} resamples: seeds with replacement, then items within each seed). A "
        "claim is a finding only where that interval excludes 0. `holds` counts the seeds whose own mean "
        "difference points the way the papers report.",
        "- `image blanked`: the same items asked with every image white (`evaluate.blank_image_ablation`): what "
        "a policy scores without looking. `chance`: a uniform guess among a capability question's answers.",
        "- `seen` / `unseen` wording: test questions in wording families the training data, the seed corpus and "
        "the guards did or did not see (docs/generate.md). Judge: the tiny guard (`tiny-guard`), trained on the "
        "seed corpus; helpfulness by the content rule; capability and refusal by rules.",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, torch {machine.get('torch')} "
        f"(kernels {machine.get('cpu_capability')}). Wall time per run: "
        + (", ".join(f"seed {s} {t} s" for s, t in sorted(seconds.items())) or "not measured (--reuse)")
        + ".",
        f"- Inputs: {', '.join(f'`{folder}/{pattern}`' for folder, pattern in INPUTS)}, inputs sha256 "
        f"`{fingerprint}`. When they change, this page is stale (a test says so): run the command above again.",
        "",
        "## Claims",
        "",
        "| claim | items/seed | base: mean [min, max] | aligned: mean [min, max] | aligned − base [interval] | "
        "holds | image blanked: base / aligned | chance | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in claims.itertuples(index=False):
        chance_cell = f(r.chance) if r.chance is not None and r.chance == r.chance else "–"
        floor_cell = (
            f"{f(r.floor_base)} / {f(r.floor_aligned)}"
            if r.floor_base is not None and r.floor_base == r.floor_base
            else "–"
        )
        lines.append(
            f"| {r.claim} ({r.aligned.upper()}) | {r.items} | {f(r.base_mean)} [{f(r.base_min)}, "
            f"{f(r.base_max)}] | {f(r.aligned_mean)} [{f(r.aligned_min)}, {f(r.aligned_max)}] | "
            f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.holds} of {r.seeds} | "
            f"{floor_cell} | {chance_cell} | {_verdict(r)} |"
        )
    lines += [
        "",
        "## Judges against the construction labels",
        "",
        "On the responders' answers (judge stage) and on each policy's answers to the harm sets (evaluate "
        "stage); mean over seeds, accuracy also [min, max]. `tiny-guard-pairs` built the preference pairs, "
        "`tiny-guard` scored the evaluation; the rule is the trivial baseline (a harm marker in the request "
        "and a compliance opening in the answer).",
        "",
        "| answers | judge | accuracy [min, max] | FPR | FNR | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    mean = lambda v: f(pd.to_numeric(v, errors="coerce").mean())  # noqa: E731
    for (answers, judge), group in judges.groupby(["answers", "judge"], sort=True):
        acc = pd.to_numeric(group["accuracy"], errors="coerce")
        lines.append(
            f"| {answers} | {judge} | {f(acc.mean())} [{f(acc.min())}, {f(acc.max())}] | "
            f"{mean(group['fpr'])} | {mean(group['fnr'])} | {mean(group['auroc'])} |"
        )
    findings = claims[(claims["ci_low"] > 0) | (claims["ci_high"] < 0)]
    lines += ["", "## Findings (interval excludes 0)", ""]
    lines += [
        f"- {r.claim}: {r.aligned.upper()} − base {r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
        f"holds on {r.holds} of {r.seeds} seeds."
        for r in findings.itertuples(index=False)
    ] or ["- none"]
    page = "\n".join(lines) + "\n"
    out.write_text(page, encoding="utf-8")
    return page
