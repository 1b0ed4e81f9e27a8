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
    # MD-Judge's prompt template is copied from its model card by hand: named, checked, never shipped
    assert status[("judge.judges[1].prompt_file", "data/01_raw/judge_templates/md_judge_v0.1.txt")] == "missing"
    assert "g-123" not in report and "g-123" not in checks.to_csv()
    assert "SPAVL_KEY_OPENAI" in report and "asks for 8 GPU process(es); 0 GPU(s) visible" in report
    with pytest.raises(RuntimeError, match=r"preflight: \d+ of \d+ checks failed"):
        preflight_verdict(checks)


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def llava_7b_config(tmp_path_factory):
    """config.json of a LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px, Vicuna-7B), without weights: all the estimate reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    directory = tmp_path_factory.mktemp("llava-7b-config")
    LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
                vision_feature_layer=-2, dtype="float16").save_pretrained(directory)
    return str(directory)


def test_memory_estimate_sizes_llava_7b_from_its_config(llava_7b_config):
    from spavl_kedro.backends.methods import settings_for
    from spavl_kedro.pipelines.preflight import memory

    paper = _paper_parameters()["align"]
    recipes = {m: settings_for(m, {"output_dir": "x", "checkpoint_dir": "x", **paper[m]}) for m in ("dpo", "reward")}
    recipes["sft"] = settings_for("sft", {"output_dir": "x", "checkpoint_dir": "x", "lora": False})
    shape = memory.model_shape(llava_7b_config, recipes)
    assert 7.0e9 < shape.total < 7.1e9 and shape.image_tokens == 576 and shape.checkpoint_bytes == 2
    assert 0.6e9 < shape.trainable_lora["dpo"] < 0.7e9  # r 256 on every linear layer, plus the projector
    assert shape.trainable_full["sft"] < shape.total - 0.3e9  # the vision tower (~0.3B) stays frozen

    gib = 2**30
    dpo = memory.estimate("dpo", recipes["dpo"], shape, processes=8, zero_stage=0)
    assert 30 * gib < dpo.gpu_bytes < 60 * gib  # conf/paper's DPO LoRA fits an 80 GB GPU under DDP
    assert dpo.parts["weights"] == shape.total * 4 and dpo.parts["reference"] == 0  # fp32 copy; LoRA: no reference
    full = settings_for("dpo", {"output_dir": "x", "checkpoint_dir": "x", **paper["dpo"], "lora": False})
    zero2 = memory.estimate("dpo", full, shape, processes=8, zero_stage=2)
    zero3 = memory.estimate("dpo", full, shape, processes=8, zero_stage=3)
    assert zero2.parts["reference"] == zero2.parts["weights"] and zero3.parts["weights"] == zero2.parts["weights"] // 8
    assert memory.estimate("dpo", full, shape).parts["optimiser"] == 8 * zero2.parts["optimiser"]
    # the reward model's loop is DDP whatever the launch: a full 7B fine-tune is ~110 GiB per GPU
    reward = memory.estimate("reward", recipes["reward"], shape, processes=8, zero_stage=3)
    assert reward.gpu_bytes > 100 * gib and reward.parts["optimiser"] == 2 * shape.total * 4
    assert reward.host_bytes == 8 * shape.total * (2 + 4)  # every rank: the float16 checkpoint and its fp32 copy


def test_preflight_names_the_method_that_does_not_fit_with_its_numbers(llava_7b_config, monkeypatch):
    import torch

    params = _paper_parameters()
    params["align"]["policy"]["model"] = llava_7b_config
    params["align"]["also"] = ["reward"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "an 80 GB GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * 2**30}))
    checks, report = run_preflight(params, credentials={})
    gpu = {r.where: r for r in checks.itertuples() if r.check == "memory" and r.target == "GPU"}
    assert set(gpu) == {"align.dpo", "align.reward"}
    assert gpu["align.dpo"].status == "ok" and "on 8 process(es), ZeRO-0" in gpu["align.dpo"].detail
    assert gpu["align.reward"].status == "missing" and "has 80.0 GiB" in gpu["align.reward"].detail
    assert "try lora: true" in gpu["align.reward"].detail and "optimiser 52.6 GiB" in gpu["align.reward"].detail
    assert "align.reward" in report
