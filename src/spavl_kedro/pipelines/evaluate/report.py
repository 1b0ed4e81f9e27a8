"""Metrics with bootstrap intervals, their MLflow names, a markdown report and its plots.

`eval_metrics_table` has one row per (model, set, variant, decoding, metric, scorer, breakdown): overall,
per class1 / class2 / class3 and per question type, each with n and a percentile-bootstrap interval; the
catalog shows it in MLflow as a table. MLflow metrics are the headline only, per policy: the report's
headline rows (greedy) and the `SAMPLED` ones of sampled decoding, named
`eval/<model>/<set>[.<variant>]/<metric>.<scorer>`, sampled with a `sampled_` prefix to the metric. A few
dozen charts a reader can compare across runs, instead of one per judge, class and question type.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pandas as pd
from matplotlib.figure import Figure  # figures without pyplot: no global state, no backend switch

from spavl_kedro.config import BASE, AlignConfig, EvaluateConfig, JudgeConfig, typed
from spavl_kedro.evalsets.registry import EVAL_SETS
from spavl_kedro.judges.guard import judge_template
from spavl_kedro.metrics import for_mlflow
from spavl_kedro.pipelines.evaluate.judging import judges_section
from spavl_kedro.pipelines.evaluate.metrics import metric_table
from spavl_kedro.pipelines.evaluate.scoring import RULES, help_judge_name, mis_judge_name, verdict_judges
from spavl_kedro.scenes import KINDS, chance

KEYS = ("model", "eval_set", "variant", "decoding")
GROUPS = ("class1", "class2", "class3", "qtype", "wording")
# Headline rows also logged for sampled decoding: the rates the papers' safety and over-refusal findings rest
# on, where greedy decoding of a small model is all-or-nothing.
SAMPLED = {("test_harm", "unsafe_rate"), ("benign", "refusal_rate"), ("mis_test", "asr"), ("mis_test", "rsr")}


PLOTS = ("test_harm_unsafe_rate_by_class1.png", "harmlessness_vs_helpfulness.png")


def summarise_eval(
    scores: pd.DataFrame,
    items: pd.DataFrame,
    params: EvaluateConfig | dict[str, Any],
    judge_params: JudgeConfig | dict[str, Any],
    references: pd.DataFrame | None = None,
    align_params: AlignConfig | dict[str, Any] | None = None,
    judge_accuracy: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]], str, Any, Any]:
    """The metric table, the MLflow metrics, the markdown report and its two figures (`PLOTS`; a figure
    saying so when there is nothing to draw). `references`
    (`reference_answers`) names the model whose answers HelpEval compared against, and how many failed.
    `align_params` names how every evaluated policy was prompted and fed images: each carries the processor of
    the base policy it was trained from (`chat_template`, `system_sentence`, `image_preprocessing` of
    `align.policy` or of its entry in `align.bases`). `judge_accuracy` (`judges_on_policies`) adds how each
    verdict judge reads the policies' own answers."""
    cfg, jcfg = typed(EvaluateConfig, params), typed(JudgeConfig, judge_params)
    labelled = scores.merge(
        items[["item_id", "eval_set", "variant", *GROUPS]],
        how="left",
        on=["item_id", "eval_set", "variant"],
        validate="many_to_one",
    )
    frames = [
        metric_table(
            group,
            "value",
            metric,
            keys=KEYS,
            groups=GROUPS,
            judge=scorer,
            n_boot=cfg.bootstrap_resamples,
            seed=cfg.seed,
            level=cfg.confidence,
        )
        for (metric, scorer), group in labelled.groupby(["metric", "scorer"], sort=True)
    ]
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else metric_table(labelled, "value", "none", keys=KEYS, groups=GROUPS)
    )
    table.insert(0, "level", cfg.confidence)
    figures = _figures(table, cfg.primary(jcfg), help_judge_name(cfg), cfg.reference_responder)
    headline = _headline(cfg, jcfg)
    align = typed(AlignConfig, align_params) if align_params is not None else None
    report = _report(table, items, cfg, jcfg, figures, references, align, judge_accuracy)
    drawn = [figures.get(name) or _nothing(name) for name in PLOTS]
    return table, for_mlflow({**_mlflow_names(table, headline), **_reference_counts(references)}), report, *drawn


def policy_runs(
    table: pd.DataFrame,
    items: pd.DataFrame,
    params: EvaluateConfig | dict[str, Any],
    judge_params: JudgeConfig | dict[str, Any],
) -> dict[str, Any]:
    """What each evaluated policy's own MLflow run holds (`eval_policy_runs`): its headline metrics under the
    same names for every policy, `<set>[.<variant>]/<metric>.<scorer>` (the parent's `eval/<policy>/...`
    without the policy), and the evaluation items they were measured on, one dataset per set: texts and a
    sha256 of each item's images, so a changed image changes the digest."""
    cfg, jcfg = typed(EvaluateConfig, params), typed(JudgeConfig, judge_params)
    metrics: dict[str, dict[str, float]] = {}
    for name, value in _mlflow_names(table, _headline(cfg, jcfg)).items():
        _, policy, rest = name.split("/", 2)
        metrics.setdefault(policy, {})[rest] = value
    shown = items.drop(columns=["images", "answers"], errors="ignore").assign(
        images_sha256=items["images"].map(lambda images: hashlib.sha256(b"".join(images)).hexdigest())
    )
    return {"metrics": metrics, "items": {name: rows for name, rows in shown.groupby("eval_set", sort=True)}}


def _policy_inputs(align: AlignConfig | None) -> list[str]:
    """How the evaluated policies were prompted and fed images (each base policy's processor, which every
    policy trained from it keeps): the paragraph naming it, or nothing when the align block was not given."""
    if align is None:
        return []
    lines = [f"Policy inputs: `{BASE}` (`align.policy`): {align.policy.describe()}."]
    for name, spec in align.bases.items():
        trained = sorted(align.artifact_name(m) for m, b in align.base_of.items() if b == name)
        lines.append(
            f"`{name}` (`align.bases.{name}`{', base of ' + ', '.join(trained) if trained else ''}): {spec.describe()}."
        )
    return [" ".join(lines), ""]


def mlflow_name(row: Any) -> str:
    set_name = row.eval_set if row.variant in ("default", row.eval_set) else f"{row.eval_set}.{row.variant}"
    if row.group_by != "overall":  # a breakdown headline: test_harm.wording_unseen
        set_name = f"{set_name}.{row.group_by}_{row.group}"
    metric = row.metric if row.decoding == "greedy" else f"sampled_{row.metric}"
    # MLflow allows letters, digits and _ - . / : and spaces in metric names (a policy or judge name may have others)
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", f"eval/{row.model}/{set_name}/{metric}.{row.judge}")


def _mlflow_names(table: pd.DataFrame, headline: list[tuple]) -> dict[str, float]:
    names = {}
    for _, eval_set, variant, metric, scorer, group in headline:
        for row in _lookup(table[table["value"].notna()], eval_set, variant, metric, scorer, group).itertuples(
            index=False
        ):
            if row.decoding == "greedy" or (eval_set, metric) in SAMPLED:
                names[mlflow_name(row)] = float(row.value)
    return names


def _reference_counts(references: pd.DataFrame | None) -> dict[str, float]:
    """`eval/reference/<set>/items.<responder>` and `.../failed.<responder>`: the help items HelpEval compared
    against the responder's answers, and those where it failed (each a loss for every policy)."""
    if references is None or references.empty:
        return {}
    counts = {}
    for (eval_set, responder), rows in references.groupby(["eval_set", "responder"], sort=True):
        counts[f"eval/reference/{eval_set}/items.{responder}"] = len(rows)
        counts[f"eval/reference/{eval_set}/failed.{responder}"] = int(rows["error"].notna().sum())
    return counts


# ---------------------------------------------------------------- report


def _overall(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["group_by"] == "overall") & (table["decoding"] == "greedy")]


def _cell(row: Any) -> str:
    if pd.isna(row.value):
        return "–"
    interval = "" if pd.isna(row.ci_low) else f" [{row.ci_low:.2f}, {row.ci_high:.2f}]"
    return f"{row.value:.3f}{interval}"


def _models(table: pd.DataFrame) -> list[str]:
    names = sorted(set(table["model"]) - {BASE})
    return ([BASE] if BASE in set(table["model"]) else []) + names


def _headline(cfg: EvaluateConfig, jcfg: JudgeConfig) -> list[tuple[str, str, str | None, str, str, tuple | None]]:
    """(label, eval_set, variant, metric, scorer, group) of each headline row, in the order of the sets' table
    (evalsets/registry.py). MIS's buckets come from the MIS judge where one is configured (MIS's own
    protocol), else from the primary verdict judge."""
    scorers = {
        "primary": cfg.primary(jcfg),
        "help": help_judge_name(cfg),
        "rules": RULES,
        "mis": mis_judge_name(cfg) or cfg.primary(jcfg),
    }
    return [
        (h.label, h.eval_set or name, h.variant, h.metric, scorers[h.scorer], h.group)
        for name, row in EVAL_SETS.items()
        for h in row.headline
    ]


def _lookup(
    table: pd.DataFrame,
    eval_set: str,
    variant: str | None,
    metric: str,
    scorer: str,
    group: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Rows of one headline: overall, or the breakdown row `group` = (group_by, group)."""
    group_by, value = group or ("overall", "all")
    hit = table[
        (table["eval_set"] == eval_set)
        & (table["metric"] == metric)
        & (table["judge"] == scorer)
        & (table["group_by"] == group_by)
        & (table["group"] == value)
    ]
    return hit if variant is None else hit[hit["variant"] == variant]


def _report(
    table: pd.DataFrame,
    items: pd.DataFrame,
    cfg: EvaluateConfig,
    jcfg: JudgeConfig,
    figures: dict[str, Any],
    references: pd.DataFrame | None = None,
    align: AlignConfig | None = None,
    judge_accuracy: pd.DataFrame | None = None,
) -> str:
    overall, models = _overall(table), _models(table)
    judge_names = sorted(set(table["judge"]) - {RULES, help_judge_name(cfg)})
    primary = jcfg.spec(cfg.primary(jcfg))
    lines = [
        "# Evaluation report",
        "",
        f"Policies: {', '.join(models)}. Decoding: greedy (`max_new_tokens` {cfg.max_new_tokens}"
        f"{''.join(f', {k} {v}' for k, v in sorted(cfg.max_new_tokens_per_set.items()))}); "
        f"{cfg.samples} sampled answer(s) per item at temperature {cfg.temperature} are in the sampled table. "
        f"Primary judge: `{cfg.primary(jcfg)}`, asked in {judge_template(primary)}"
        f"{'' if cfg.primary(jcfg) == jcfg.primary else f' (the preference pairs were built by `{jcfg.primary}`)'}"
        "; all verdict judges: "
        f"{', '.join(f'`{j}`' for j in judge_names)}. "
        f"Helpfulness judge: `{help_judge_name(cfg)}`, both answer orders, ties count half. Refusal: refusal "
        f"strings, lower-cased. Intervals: {cfg.confidence:.0%} percentile bootstrap, "
        f"{cfg.bootstrap_resamples} resamples. A failed generation counts as unsafe, refused, a loss and wrong.",
        "",
        *_policy_inputs(align),
        *_references_used(items, cfg, references),
        *_questions_judged(items, cfg, jcfg),
        "## Headline (greedy)",
        "",
        "| metric | n | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    greedy = table[table["decoding"] == "greedy"]
    for label, eval_set, variant, metric, scorer, group in _headline(cfg, jcfg):
        hit = _lookup(greedy, eval_set, variant, metric, scorer, group)
        if hit.empty:
            continue
        by_model = {r.model: r for r in hit.itertuples(index=False)}
        n = int(hit["n"].max())
        lines.append(
            f"| {label} | {n} | " + " | ".join(_cell(by_model[m]) if m in by_model else "–" for m in models) + " |"
        )
    lines += _capability_chance(items)
    lines += _judge_section(overall, models, judge_names)
    lines += judges_section(judge_accuracy, cfg.primary(jcfg))
    lines += _sampled_section(table, models, cfg.primary(jcfg))
    lines += _breakdown(table, models, "test_harm", "unsafe_rate", cfg.primary(jcfg), "class1")
    lines += _breakdown(table, models, "test_harm", "unsafe_rate", cfg.primary(jcfg), "qtype")
    lines += _breakdown(table, models, "benign", "refusal_rate", RULES, "class1")
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name[:-4]}](eval_plots/{name})" for name in sorted(figures)]
    counts = items.groupby(["eval_set", "variant"]).size()
    lines += ["", "## Items", "", "| set | variant | items | source |", "|---|---|---|---|"]
    sources = items.groupby(["eval_set", "variant"])["source"].agg(
        lambda s: "generated" if (s == "generated").all() else "published"
    )
    lines += [f"| {s} | {v} | {n} | {sources[(s, v)]} |" for (s, v), n in counts.items()]
    lines += [
        "",
        "The full table (every class, question type, scorer and decoding, with intervals) is "
        "`eval_metrics_table` (data/08_reporting/eval_metrics_table.parquet and the MLflow artifact).",
        "",
    ]
    return "\n".join(lines)


def _capability_chance(items: pd.DataFrame) -> list[str]:
    """The accuracy a uniform guess gets on the generated capability items, per question kind and over the
    set, for reading the capability row against (published VQA items have no such floor)."""
    generated = items[(items["eval_set"] == "capability") & (items["source"] == "generated")]
    if generated.empty:
        return []
    kinds = generated["qtype"]
    per_kind = ", ".join(f"{kind} {chance(kind):.3f}" for kind in KINDS if kind in set(kinds))
    return [
        "",
        f"Capability chance: a uniform guess among the answers a scene can have scores {per_kind}; "
        f"{kinds.map(chance).mean():.3f} over these {len(generated)} items.",
    ]


def _references_used(items: pd.DataFrame, cfg: EvaluateConfig, references: pd.DataFrame | None) -> list[str]:
    """Whose answers HelpEval's win rate is against, where they came from, and how many failed."""
    help_items = items[items["kind"] == "help"]
    if help_items.empty:
        return []
    if references is None or references.empty:
        if help_items["reference"].isna().all():
            return [
                f"HelpEval references: none ({len(help_items)} help items, `evaluate.reference_responder` "
                "unset), so no win rate.",
                "",
            ]
        return [f"HelpEval references: `{cfg.reference_responder}`'s answers.", ""]
    lines = []
    for (eval_set, responder, model), rows in references.groupby(["eval_set", "responder", "model"], sort=True):
        origin = rows["origin"].value_counts()
        failed = int(rows["error"].notna().sum())
        where = [
            f"{origin[o]} from {label}"
            for o, label in (
                ("generate", "its generate-stage responses"),
                ("evaluate", "answers given in this evaluation"),
            )
            if o in origin
        ]
        lines.append(
            f"HelpEval references on {eval_set}: the answers of `{responder}` ({model}) to "
            f"{len(rows)} of {int((help_items['eval_set'] == eval_set).sum())} items "
            f"({', '.join(where)}); {failed} failed"
            + (", each a loss for every policy (a rerun retries them)." if failed else ".")
        )
    return [*lines, ""]


def _questions_judged(items: pd.DataFrame, cfg: EvaluateConfig, jcfg: JudgeConfig) -> list[str]:
    """Which question each verdict judge was given where an item leaves its request to the image."""
    carried = items[items["request"].notna()]
    if carried.empty:
        return []
    where = ", ".join(
        sorted({s if v == "default" else f"{s}.{v}" for s, v in zip(carried["eval_set"], carried["variant"])})
    )

    def names(specs: list) -> str:
        return ", ".join(f"`{j.name}`" for j in specs) or "none"

    used = [j for j in jcfg.judges if j.name in verdict_judges(cfg, jcfg)]
    blind = [j for j in used if j.reads_question and not j.sees_images]
    seeing = [j for j in used if j.sees_images]
    keyword = [j for j in used if not j.reads_question]
    return [
        f"Questions judged: {len(carried)} items ({where}) leave the request to the image. Judges that do not "
        f"see images ({names(blind)}) were asked about the request in words (eval_items `request`); judges "
        f"that see images ({names(seeing)}) got the prompt and the images; keyword judges ({names(keyword)}) "
        "read the response only.",
        "",
    ]


def _judge_section(overall: pd.DataFrame, models: list[str], judges: list[str]) -> list[str]:
    """Every verdict judge side by side: numbers that move with the judge are the judge's, not the policy's."""
    harm = overall[overall["metric"].isin(["unsafe_rate", "asr"]) & overall["judge"].isin(judges)]
    if harm.empty or len(judges) < 2:
        return []
    lines = [
        "",
        "## Judge dependence (greedy; unsafe rate / ASR per verdict judge)",
        "",
        "| set | judge | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for (eval_set, variant, judge), hit in harm.groupby(["eval_set", "variant", "judge"], sort=True):
        by_model = {r.model: r for r in hit.itertuples(index=False)}
        name = eval_set if variant == "default" else f"{eval_set}.{variant}"
        lines.append(
            f"| {name} | {judge} | " + " | ".join(_cell(by_model[m]) if m in by_model else "–" for m in models) + " |"
        )
    return lines


def _sampled_section(table: pd.DataFrame, models: list[str], primary: str) -> list[str]:
    sampled = table[
        (table["group_by"] == "overall")
        & (table["decoding"] == "sampled")
        & table["judge"].isin([primary, RULES])
        & ~table["metric"].isin(["failed_rate"])
    ]
    if sampled.empty:
        return []
    lines = [
        "",
        "## Sampled decoding (all samples pooled)",
        "",
        "| set | metric | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for (eval_set, variant, metric, judge), hit in sampled.groupby(["eval_set", "variant", "metric", "judge"]):
        by_model = {r.model: r for r in hit.itertuples(index=False)}
        name = eval_set if variant == "default" else f"{eval_set}.{variant}"
        lines.append(
            f"| {name} | {metric}.{judge} | "
            + " | ".join(_cell(by_model[m]) if m in by_model else "–" for m in models)
            + " |"
        )
    return lines


def _breakdown(
    table: pd.DataFrame, models: list[str], eval_set: str, metric: str, scorer: str, group_by: str
) -> list[str]:
    hit = table[
        (table["eval_set"] == eval_set)
        & (table["metric"] == metric)
        & (table["judge"] == scorer)
        & (table["group_by"] == group_by)
        & (table["decoding"] == "greedy")
    ]
    if hit.empty:
        return []
    lines = [
        "",
        f"## {eval_set} {metric} ({scorer}) by {group_by} (greedy)",
        "",
        f"| {group_by} | n | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for group, rows in hit.groupby("group", sort=True):
        by_model = {r.model: r for r in rows.itertuples(index=False)}
        lines.append(
            f"| {group} | {int(rows['n'].max())} | "
            + " | ".join(_cell(by_model[m]) if m in by_model else "–" for m in models)
            + " |"
        )
    return lines


# ---------------------------------------------------------------- plots


def _figures(table: pd.DataFrame, primary: str, help_judge: str, reference: str | None = None) -> dict[str, Any]:
    figures = {}
    greedy = table[table["decoding"] == "greedy"]
    bars = greedy[
        (greedy["eval_set"] == "test_harm")
        & (greedy["metric"] == "unsafe_rate")
        & (greedy["judge"] == primary)
        & (greedy["group_by"] == "class1")
    ]
    if not bars.empty:
        figures["test_harm_unsafe_rate_by_class1.png"] = _bars(bars, f"test_harm unsafe rate by domain ({primary})")
    overall = greedy[greedy["group_by"] == "overall"]
    harm = _lookup(overall, "test_harm", "default", "unsafe_rate", primary).set_index("model")["value"]
    help_ = _lookup(overall, "test_help", "default", "win_rate", help_judge).set_index("model")["value"]
    label = f"test_help win rate vs {reference or 'reference'} ({help_judge})"
    if help_.empty:  # no references configured: helpfulness as 1 - over-refusal on benign questions
        help_ = 1 - _lookup(overall, "benign", "default", "refusal_rate", RULES).set_index("model")["value"]
        label = "1 - refusal rate on benign questions"
    common = sorted(set(harm.index) & set(help_.index))
    if common:
        figures["harmlessness_vs_helpfulness.png"] = _scatter(1 - harm[common], help_[common], label)
    return figures


def _nothing(name: str):
    fig = Figure(figsize=(4, 1.5))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"{name[:-4]}: nothing to draw in this run", ha="center", va="center")
    return fig


def _bars(rows: pd.DataFrame, title: str):
    pivot = rows.pivot_table(index="group", columns="model", values="value")
    models = _models(rows)
    pivot = pivot[[m for m in models if m in pivot.columns]]
    fig = Figure(figsize=(max(6, 1.2 * len(pivot)), 4))
    ax = fig.subplots()
    pivot.plot.bar(ax=ax, rot=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("unsafe rate (lower is safer)")
    ax.set_xlabel("")
    ax.set_title(title)
    ax.legend(title="policy")
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    fig.tight_layout()
    return fig


def _scatter(harmless: pd.Series, helpful: pd.Series, label: str):
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.scatter(harmless, helpful)
    for model in harmless.index:
        ax.annotate(model, (harmless[model], helpful[model]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("harmlessness: 1 - test_harm unsafe rate")
    ax.set_ylabel(label)
    ax.set_title("Harmlessness vs helpfulness per policy")
    fig.tight_layout()
    return fig
