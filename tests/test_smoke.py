"""`make smoke` at its smallest size on the CPU: a tiny model of every family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL, InternVL) through generation, a guard-format judge, DPO, SFT on two-image prompts, the reward model, GRPO, RLOO
and evaluation, one JSON line per stage and family."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

STAGES = ["build", "generate", "judge", "dpo", "sft", "reward", "grpo", "rloo", "evaluate"]
FAMILIES = ["llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "internvl"]


@pytest.mark.slow
def test_smoke_runs_every_stage_and_prints_one_json_line_each(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "spavl_kedro.smoke", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    assert [(r["family"], r["stage"]) for r in records] == [(f, stage) for f in FAMILIES for stage in STAGES]
    for record in records:
        assert record["device"] == "cpu"
        assert record["seconds"] > 0 and record["items_per_s"] > 0
        assert record["peak_rss_mb"] > 100 and record["peak_gpu_mb"] is None
    builds = {r["family"]: r for r in records if r["stage"] == "build"}
    assert builds["llava-1.5"]["image_tokens"] == 576  # 336 px / 14-px patches, LLaVA-1.5's count
    # Qwen2-VL: one token per 28 x 28 px of the resized image; InternVL: 4 per 56-px tile (the fixtures' sizes)
    assert builds["qwen2-vl"]["image_tokens"] == builds["internvl"]["image_tokens"] == 4
    for family in FAMILIES:
        check_stages(family, {r["stage"]: r for r in records if r["family"] == family})


def check_stages(family: str, by_stage: dict[str, dict]) -> None:
    assert by_stage["generate"]["items"] == 16 and by_stage["generate"]["tokens_per_s"] > 0
    assert by_stage["evaluate"]["tokens_per_s"] > 0
    assert by_stage["judge"]["items"] == 16
    # Pairwise losses start at log 2 (DPO: policy == reference; reward model: zero head); two steps moved them.
    for stage in ("dpo", "reward"):
        assert by_stage[stage]["loss_first"] == pytest.approx(math.log(2), abs=1e-4)
        assert by_stage[stage]["loss_last"] != by_stage[stage]["loss_first"]
    assert by_stage["sft"]["loss_first"] > by_stage["sft"]["loss_last"]
    for stage in ("grpo", "rloo"):
        assert math.isfinite(by_stage[stage]["reward_first"]) and math.isfinite(by_stage[stage]["reward_last"])
