"""Preflight lists what a profile lacks on this machine, and passes what is really there."""

from __future__ import annotations

import copy

import pytest
from serving import free_port, served, tiny  # noqa: F401  (pytest fixtures, used by name)
from test_config import paper_parameters

from spavl_kedro.pipelines.preflight import nodes
from spavl_kedro.pipelines.preflight.nodes import preflight_verdict, run_preflight


@pytest.fixture(autouse=True)
def _quick_endpoints(monkeypatch):
    monkeypatch.setattr(nodes, "ENDPOINT_TIMEOUT_S", 2.0)  # no network here: fail fast


def test_paper_profile_lists_exactly_what_this_machine_lacks(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPAVL_KEY_OPENAI", raising=False)
    params = paper_parameters()
    params["preflight"]["check_endpoints"] = False  # the profile's endpoints are public API hosts: not called
    checks, report, _ = run_preflight(params, credentials={"gemini": {"api_key": "g-123"}})
    status = {(r.where, r.target): r.status for r in checks.itertuples()}
    # the open-weights responders are vLLM servers on this node (serve_plan starts them): endpoints here, each
    # listed; the policy is a local model: not on disk, not cached, offline
    served = [i for i, r in enumerate(params["generate"]["responders"]) if "127.0.0.1" in str(r.get("base_urls"))]
    assert len(served) == 11 and all(
        status[(f"generate.responders[{i}].base_urls", params["generate"]["responders"][i]["base_urls"][0])]
        == "warning"
        for i in served
    )
    assert status[("align.policy.model", "llava-hf/llava-1.5-7b-hf")] == "missing"
    # keys: gemini given (never shown), openai not; every endpoint listed, none called (check_endpoints false)
    assert status[("generate.responders[11].api_key", "gemini")] == "ok"
    assert status[("judge.pairwise.backend.api_key", "openai")] == "missing"
    endpoints = checks[checks["check"] == "endpoint"]
    # 22 base_urls in the profile: 12 responders, the writer, its screen (2), the teacher, the guard judges (3),
    # GPT-4o as pairwise judge, as HelpEval judge and as MIS judge
    assert len(endpoints) == 22 and set(endpoints["status"]) == {"warning"}
    assert set(endpoints["detail"]) == {"not called: preflight.check_endpoints is false"}
    launch = params["align"]["launch"]["accelerate_config"]
    assert status[("align.launch", launch)] == "missing"
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
    cfg["generate"]["responders"][2] = {
        "name": "served",
        "kind": "openai",
        "model": model_dir,
        "base_urls": [base_url],
        "api_key": "local",
    }
    checks, report, _ = run_preflight(cfg, credentials={"local": "unused-by-the-server"})
    assert set(checks["status"]) == {"ok", "warning"}, report  # warning: no GPU here
    assert set(checks["check"]) == {"model", "endpoint", "credential", "accelerator"}
    preflight_verdict(checks)  # nothing missing: no error

    endpoint = checks[checks["check"] == "endpoint"].iloc[0]
    assert endpoint.target == base_url and endpoint.detail.startswith("answers")


@pytest.fixture(scope="module")
def llava_7b_config(tmp_path_factory):
    """config.json of a LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px, Vicuna-7B), without weights: all the estimate reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    directory = tmp_path_factory.mktemp("llava-7b-config")
    LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        dtype="float16",
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def internvl_8b_config(tmp_path_factory):
    """config.json of InternVL2.5-8B in transformers' format (InternViT-300M at 448 px, InternLM2.5-7B as Llama;
    its model card and transformers' convert_internvl_weights_to_hf.py), without weights."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    vision = InternVLVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=[448, 448],
        patch_size=[14, 14],
        use_qk_norm=False,
        norm_type="layer_norm",
        use_absolute_position_embeddings=True,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=92553,
        max_position_embeddings=32768,
    )
    directory = tmp_path_factory.mktemp("internvl-8b-config")
    InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=92546,
        downsample_ratio=0.5,
        tie_word_embeddings=False,  # InternLM2 keeps its own output head
        dtype="bfloat16",
    ).save_pretrained(directory)
    return str(directory)


# LLaVA-1.5-7B's parameters by hand, from the fixture's config (no code of the project's):
VICUNA_7B = (
    2 * 32064 * 4096  # token embeddings and the LM head (not tied)
    + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)  # attention, SwiGLU MLP, two RMSNorms
    + 4096
)  # the final norm
CLIP_L_336 = (
    3 * 14 * 14 * 1024
    + 1024
    + 577 * 1024  # patch conv (no bias), class token, 576 + 1 positions
    + 2 * 2 * 1024  # pre- and post-layernorm
    + 24 * (4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024))
)
PROJECTOR = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
LLAVA_7B = VICUNA_7B + CLIP_L_336 + PROJECTOR  # 7,063,427,072


def test_memory_estimate_sizes_llava_7b_from_its_config(llava_7b_config):
    from spavl_kedro.pipelines.preflight import memory
    from spavl_kedro.training.methods import settings_for

    paper = paper_parameters()["align"]
    recipes = {
        m: settings_for(m, {"output_dir": "x", "checkpoint_dir": "x", **paper[m]}) for m in ("dpo", "sft", "reward")
    }
    shape = memory.model_shape(llava_7b_config, recipes)
    assert shape.total == LLAVA_7B and shape.image_tokens == 576 and shape.checkpoint_bytes == 2
    assert shape.vocab == 32064 and shape.hidden == 4096 and shape.layers == 32
    assert 0.6e9 < shape.trainable_lora["dpo"] < 0.7e9  # r 256 on every linear layer, plus the projector
    assert shape.trainable_full["sft"] == LLAVA_7B - CLIP_L_336  # the vision tower stays frozen
    # the reward model as SPA-VL-RLHF trains it: tower frozen, and the LM head, which its score never reads
    assert shape.trainable_full["reward"] == LLAVA_7B - CLIP_L_336 - 32064 * 4096

    # conf/paper's SFT (full, fp32 weights, activation checkpointing, 2 images + 128 + 512 tokens) on 8 GPUs
    gib, sft, t = 2**30, recipes["sft"], LLAVA_7B - CLIP_L_336
    seq = 2 * 576 + 128 + 512
    zero2 = memory.estimate("sft", sft, shape, processes=8, zero_stage=2, images_per_prompt=2)
    assert zero2.parts == {
        "weights": LLAVA_7B * 4,
        "reference": 0,
        "gradients": t * 4 // 8,
        "ddp_buckets": 0,
        "optimiser": 2 * t * 4 // 8,
        "activations": seq * 4096 * 2 * 32 + seq * 4096 * 34,  # layer inputs + one layer
        "logits": 2 * seq * 32064 * 4,
        "reward_model": 0,
        "context": gib,
    }
    assert zero2.gpu_bytes == sum(zero2.parts.values()) and 37 * gib < zero2.gpu_bytes < 39 * gib
    # plain DDP: a whole fp32 gradient, its all-reduce bucket and AdamW's two moments on every GPU
    ddp = memory.estimate("sft", sft, shape, processes=8, zero_stage=0, images_per_prompt=2)
    assert ddp.parts["gradients"] == ddp.parts["ddp_buckets"] == t * 4 and ddp.parts["optimiser"] == 2 * t * 4
    assert ddp.gpu_bytes > 120 * gib
    assert ddp.host_bytes == 8 * LLAVA_7B * (2 + 4)  # every rank: the float16 checkpoint and its fp32 copy
    assert ddp.temp_bytes == LLAVA_7B * 2  # the policy written once for the ranks (no records known)

    dpo = memory.estimate("dpo", recipes["dpo"], shape, processes=8, zero_stage=0)
    assert dpo.parts["weights"] == LLAVA_7B * 4 and dpo.parts["reference"] == 0  # fp32 copy; LoRA: no reference
    full = settings_for("dpo", {"output_dir": "x", "checkpoint_dir": "x", **paper["dpo"], "lora": False})
    z2 = memory.estimate("dpo", full, shape, processes=8, zero_stage=2)
    z3 = memory.estimate("dpo", full, shape, processes=8, zero_stage=3)
    assert z2.parts["reference"] == z2.parts["weights"] and z3.parts["weights"] == z2.parts["weights"] // 8
    assert memory.estimate("dpo", full, shape).parts["optimiser"] == 8 * z2.parts["optimiser"]
    # online RL scores with a reward model of the policy's size on every rank, in bf16
    grpo = settings_for("grpo", {"output_dir": "x", "checkpoint_dir": "x", **paper["grpo"]})
    shape = memory.model_shape(llava_7b_config, {"grpo": grpo})
    assert memory.estimate("grpo", grpo, shape, 8, 3, reward_model=True).parts["reward_model"] == LLAVA_7B * 2


@pytest.fixture(scope="module")
def paper_models(llava_7b_config, internvl_8b_config):
    """conf/paper's base policies as config.json files: LLaVA-1.5-7B, and MIS's InternVL for SFT."""
    return llava_7b_config, internvl_8b_config


def _assume(params, paper_models, gpu_gib):
    params["align"]["policy"]["model"], params["align"]["bases"]["internvl2_5_8b"]["model"] = paper_models
    params["align"]["also"] = ["sft", "reward", "grpo", "rloo"]  # every method conf/paper has a recipe for
    params["preflight"].update(
        check_endpoints=False,
        assume={"gpus": 8, "gpu_memory_gib": gpu_gib, "host_ram_gib": 1000, "disk_gib": 4000, "temp_gib": 500},
    )
    return params


def test_paper_profile_fits_the_assumed_8_x_80_gb_node(paper_models):
    """conf/paper's recipes and launch configs, sized for 8 x 80 GB: every method fits, and the JSON says
    with what (per method: processes, ZeRO stage, each part of the estimate)."""
    params = _assume(paper_parameters(), paper_models, 80)
    checks, report, estimate = run_preflight(params, credentials={})
    methods = estimate["methods"]
    assert set(methods) == {"dpo", "sft", "reward", "grpo", "rloo"}
    assert all(m["fits"] for m in methods.values()), {k: (m["gpu_gib"], m["fits_by"]) for k, m in methods.items()}
    assert all(m["gpu_gib"] < 0.9 * 80 for m in methods.values())
    assert methods["sft"]["zero_stage"] == 2 and methods["grpo"]["zero_stage"] == 3
    # SFT is sized on the base it trains from (MIS's InternVL2.5-8B, ~8.1B parameters), the others on LLaVA-1.5-7B
    assert methods["sft"]["policy"] == paper_models[1] and 8.0e9 < methods["sft"]["parameters"] < 8.2e9
    assert {m["parameters"] for k, m in methods.items() if k != "sft"} == {LLAVA_7B}
    assert methods["grpo"]["parts_gib"]["reward_model"] > 13  # the reward model inside RL is counted
    assert estimate["hardware"] == {
        "gpus": 8,
        "gpu_memory_gib": 80.0,
        "host_ram_gib": 1000.0,
        "disk_gib": 4000.0,
        "temp_gib": 500.0,
        "assumed": True,
    }
    memory_rows = checks[checks["check"] == "memory"]
    assert set(memory_rows["status"]) == {"ok"} and "assumed hardware" in report


def test_preflight_names_the_method_that_does_not_fit_with_its_numbers(paper_models):
    params = _assume(paper_parameters(), paper_models, 44)  # DPO, SFT and RL fit in 90 %; the reward model not
    checks, report, estimate = run_preflight(params, credentials={})
    gpu = {r.where: r for r in checks.itertuples() if r.check == "memory" and r.target == "GPU"}
    assert set(gpu) == {"align.dpo", "align.sft", "align.reward", "align.grpo", "align.rloo"}
    assert gpu["align.grpo"].status == "ok" and "on 8 process(es), ZeRO-3" in gpu["align.grpo"].detail
    assert gpu["align.reward"].status == "missing" and "has 44.0 GiB" in gpu["align.reward"].detail
    assert "try lora: true" in gpu["align.reward"].detail and "optimiser " in gpu["align.reward"].detail
    assert estimate["methods"]["reward"]["fits"] is False and estimate["methods"]["grpo"]["fits"] is True
    with pytest.raises(RuntimeError, match="align.reward: GPU: missing"):
        preflight_verdict(checks)


def test_the_gate_stops_a_paper_run_before_its_first_node_and_only_for_real_models(paper_models, params):
    """The hook's gate: on a configuration with a real policy it checks the blocks the run's pipelines read
    and fails naming what is short; the embedded default (tiny models) and `preflight.gate: false` pass."""
    from spavl_kedro.pipelines.preflight.nodes import gate

    assert gate(params, {}, {"align", "generate", "judge", "evaluate"}) is None  # tiny models only
    paper = _assume(paper_parameters(), paper_models, 80)
    checks, report, estimate = gate(paper, {}, {"align", "tiny"})
    assert set(checks["where"].str.split(".").str[0]) == {"align"}  # nothing of generate, judge or evaluate
    assert estimate["methods"]["dpo"]["fits"] is True
    short = checks[checks["status"] == "missing"]
    assert list(short["where"]) == ["align.policy.model", "align.bases.internvl2_5_8b.model"]  # configs, no weights
    with pytest.raises(RuntimeError, match="no \\*.safetensors weights"):
        preflight_verdict(checks)
    no_gpus = {**paper, "preflight": {**paper["preflight"], "assume": {"gpus": 0, "gpu_memory_gib": 80}}}
    with pytest.raises(RuntimeError, match="align.launch: conf/paper/accelerate/deepspeed_zero2.yaml"):
        preflight_verdict(gate(no_gpus, {}, {"align"})[0])
    assert gate({**paper, "preflight": {**paper["preflight"], "gate": False}}, {}, {"align"}) is None


def test_the_run_hook_gates_before_the_first_node_and_writes_the_reports(paper_models):
    """`kedro run --env paper --pipeline align` on a machine without the weights: the hook stops the run
    before any node, with the checks, the report and the JSON estimate saved for the user."""
    from kedro.io import DataCatalog, MemoryDataset

    from spavl_kedro.hooks import ProjectHooks
    from spavl_kedro.pipeline_registry import register_pipelines

    params = _assume(paper_parameters(), paper_models, 80)
    catalog = DataCatalog()
    catalog["parameters"] = params
    catalog["api_credentials"] = {}
    for name in ("preflight_checks", "preflight_report", "preflight_estimate"):
        catalog[name] = MemoryDataset()
    with pytest.raises(RuntimeError, match="align.policy.model"):
        ProjectHooks().before_pipeline_run({}, register_pipelines()["align"], catalog)
    assert catalog.load("preflight_estimate")["methods"]["sft"]["fits"] is True
    assert "## Missing or unreachable" in catalog.load("preflight_report")
    # the preflight pipeline is its own check; gate: false lets the run start
    ProjectHooks().before_pipeline_run({}, register_pipelines()["preflight"], catalog)
    catalog["parameters"] = {**params, "preflight": {**params["preflight"], "gate": False}}
    ProjectHooks().before_pipeline_run({}, register_pipelines()["align"], catalog)


def test_an_endpoint_check_names_a_model_the_server_does_not_list():
    """GET /models on a loopback server: a configured model it lists passes (also as Gemini's "models/<name>"
    ids), one it does not list is named with what the server does serve."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "models/gemini-2.5-flash"}, {"id": "gpt-4o"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        assert nodes._endpoint_check("w", url, "gemini-2.5-flash", None).status == "ok"
        assert nodes._endpoint_check("w", url, "gpt-4o", None).status == "ok"
        retired = nodes._endpoint_check("w", url, "gemini-1.5-flash", None)
        assert retired.status == "missing" and "not 'gemini-1.5-flash'" in retired.detail
        assert "gemini-2.5-flash" in retired.detail
    finally:
        server.shutdown()
