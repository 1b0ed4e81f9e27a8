"""`make smoke` at its smallest size on the CPU: the LLaVA-1.5-shaped model through generation, a guard-format
judge, DPO, SFT on two-image prompts, the reward model, GRPO, RLOO and evaluation, one JSON line per stage."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

STAGES = ["build", "generate", "judge", "dpo", "sft", "reward", "grpo", "rloo", "evaluate"]


@pytest.mark.slow
def test_smoke_runs_every_stage_and_prints_one_json_line_each(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spavl_kedro.smoke", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    assert [r["stage"] for r in records] == STAGES
    for record in records:
        assert record["device"] == "cpu"
        assert record["seconds"] > 0 and record["items_per_s"] > 0
        assert record["peak_rss_mb"] > 100 and record["peak_gpu_mb"] is None
    by_stage = {r["stage"]: r for r in records}
    assert by_stage["build"]["image_tokens"] == 576  # 336 px / 14-px patches, LLaVA-1.5's count
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

