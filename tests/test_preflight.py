"""Preflight lists what a profile lacks on this machine, and passes what is really there."""

from __future__ import annotations

import copy

import pytest
from serving import free_port, served, tiny  # noqa: F401  (pytest fixtures, used by name)
from test_config import _paper_parameters

from spavl_kedro.pipelines.preflight import nodes
from spavl_kedro.pipelines.preflight.nodes import preflight_verdict, run_preflight


@pytest.fixture(autouse=True)
def _quick_endpoints(monkeypatch):
    monkeypatch.setattr(nodes, "ENDPOINT_TIMEOUT_S", 2.0)  # no network here: fail fast


def test_paper_profile_lists_exactly_what_this_machine_lacks(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPAVL_KEY_OPENAI", raising=False)
    params = _paper_parameters()
    checks, report = run_preflight(params, credentials={"gemini": {"api_key": "g-123"}})
    status = {(r.where, r.target): r.status for r in checks.itertuples()}
    # the five local 7B-13B responders, SmolVLM and the policy: not on disk, not cached, offline
    local = [r for r in params["generate"]["responders"] if r["kind"] == "transformers"]
    for i, spec in enumerate(params["generate"]["responders"]):
        if spec["kind"] == "transformers":
            assert status[(f"generate.responders[{i}].model", spec["model"])] == "missing"
    assert len(local) == 6 and status[("align.policy.model", "llava-hf/llava-1.5-7b-hf")] == "missing"
    # keys: gemini given (never shown), openai not; every endpoint unreachable without network
    assert status[("generate.responders[11].api_key", "gemini")] == "ok"
    assert status[("judge.pairwise.backend.api_key", "openai")] == "missing"
    endpoints = checks[checks["check"] == "endpoint"]
    # 18 base_urls in the profile: 17 for responders, judges and the teacher, and the GPT-4o MIS judge
    assert len(endpoints) == 18 and set(endpoints["status"]) == {"unreachable"}
    assert status[("align.launch.accelerate_config", "conf/paper/accelerate/ddp.yaml")] == "missing"
    assert "g-123" not in report and "g-123" not in checks.to_csv()
    assert "SPAVL_KEY_OPENAI" in report and "asks for 8 GPU process(es); 0 GPU(s) visible" in report
    with pytest.raises(RuntimeError, match=r"preflight: \d+ of \d+ checks failed"):
        preflight_verdict(checks)


def test_what_is_there_passes(served, tiny, monkeypatch, params):  # noqa: F811
    base_url, model_dir = served
    monkeypatch.setenv("SPAVL_KEY_LOCAL", "unused-by-the-server")
    cfg = copy.deepcopy(params)
    cfg["generate"]["responders"][0] = {"name": "local-dir", "kind": "transformers", "model": model_dir}
    cfg["generate"]["responders"][2] = {"name": "served", "kind": "openai", "model": model_dir,
                                        "base_urls": [base_url], "api_key": "local"}
    checks, report = run_preflight(cfg, credentials={"local": "unused-by-the-server"})
    assert set(checks["status"]) == {"ok", "warning"}, report  # warning: no GPU here
    assert set(checks["check"]) == {"model", "endpoint", "credential", "accelerator"}
    preflight_verdict(checks)  # nothing missing: no error

    endpoint = checks[checks["check"] == "endpoint"].iloc[0]
    assert endpoint.target == base_url and endpoint.detail.startswith("answers")
