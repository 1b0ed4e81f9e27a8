"""The vLLM launch plan for a profile's responders (`python -m spavl_kedro.serve_plan`): every responder is
served or an API, no GPU is over-committed, and the script is what the configuration's base_urls name."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections import Counter
from urllib.parse import urlsplit

import pytest
from serving import build_tiny

from spavl_kedro.config import GenerateConfig, load_parameters
from spavl_kedro.models.specs import BackendSpec
from spavl_kedro.serve_plan import Facts, model_facts, plan_servers, script

# Parameter counts of conf/paper's open models, as docs/compute_plan.md's generation table lists them
PAPER_SIZES = {
    "llava-1.5-7b": 7.06,
    "llava-1.5-13b": 13.35,
    "llava-1.6-mistral-7b": 7.57,
    "llava-1.6-vicuna-7b": 7.06,
    "llava-onevision-7b": 8.03,
    "qwen2-vl-7b": 8.29,
    "qwen2.5-vl-7b": 8.29,
    "internvl3-8b": 7.94,
    "gemma-3-12b": 12.2,
    "pixtral-12b": 12.4,
    "smolvlm": 2.25,
}


def not_cached(model: str) -> Facts:
    return Facts()  # as on a machine without the weights: sizes from names, contexts unread


@pytest.fixture(scope="module")
def paper() -> GenerateConfig:
    return GenerateConfig.model_validate(load_parameters("paper")["generate"])


@pytest.mark.parametrize("sizes", [{}, PAPER_SIZES], ids=["sizes-from-names", "sizes-known"])
def test_paper_responders_each_get_a_server_or_are_an_api_within_eight_gpus(paper, sizes):
    plan = plan_servers(paper.responders, paper.generation, sizes=sizes, facts=not_cached)
    served = {server.responder for server in plan.servers}
    assert served | set(plan.elsewhere) == {spec.name for spec in paper.responders}
    assert plan.elsewhere == {"gemini-flash": "an API: https://generativelanguage.googleapis.com/v1beta/openai"}
    assert not plan.replace  # conf/paper already points every open model at its server here

    per_gpu = Counter(gpu for server in plan.servers for gpu in server.gpus)
    assert set(per_gpu) <= set(range(8)) and max(per_gpu.values()) <= 2
    for server in plan.servers:
        assert len(server.gpus) == server.tensor_parallel == 1  # 7-13B in bf16 fit half of an 80 GB GPU
        if server.shared_with:  # only models whose weights take at most a quarter of the GPU share it
            assert server.params_b * 2 <= 20 and per_gpu[server.gpus[0]] == 2
    big = {s.responder: s for s in plan.servers if s.params_b and s.params_b >= 12}
    assert set(big) == {"llava-1.5-13b", "gemma-3-12b", "pixtral-12b"} and not any(s.shared_with for s in big.values())
    # max_model_len: two images of 3,700 tokens + 280 for the question + conf/paper's 512 new tokens
    assert {server.max_model_len for server in plan.servers} == {8192}

    configured = {spec.name: urlsplit(spec.base_urls[0]).port for spec in paper.responders if spec.name in served}
    assert {server.responder: server.port for server in plan.servers} == configured
    text = script(plan, env="paper")
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # it parses as bash
    commands = [line for line in text.splitlines() if "vllm serve" in line]
    assert len(commands) == len(plan.servers) == 11
    for server in plan.servers:
        (line,) = [c for c in commands if f"--port {server.port} " in c]
        args = shlex.split(line[line.index("vllm serve") :].split(")")[0])
        assert args[:3] == ["vllm", "serve", server.model]
        assert f"CUDA_VISIBLE_DEVICES={server.gpus[0]} exec" in line
        assert args[args.index("--tensor-parallel-size") + 1] == "1"
        assert args[args.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
        assert ("--gpu-memory-utilization" in args) == bool(server.shared_with)


def test_known_sizes_pair_the_smallest_models_and_keep_gpus_even(paper):
    plan = plan_servers(paper.responders, paper.generation, sizes=PAPER_SIZES, facts=not_cached)
    pairs = {frozenset((s.responder, s.shared_with)) for s in plan.servers if s.shared_with}
    # 3 GPUs alone for the 12-13B models; 8 models of 2-8B on the other 5, largest first to the least loaded
    assert pairs == {
        frozenset({"llava-1.6-mistral-7b", "llava-1.5-7b"}),
        frozenset({"internvl3-8b", "llava-1.6-vicuna-7b"}),
        frozenset({"llava-onevision-7b", "smolvlm"}),
    }


def test_smaller_gpus_need_tensor_parallel_and_too_few_gpus_fail_naming_the_count(paper):
    plan = plan_servers(
        paper.responders, paper.generation, gpus=16, gpu_memory_gb=40, sizes=PAPER_SIZES, facts=not_cached
    )
    tp = {s.responder: s.tensor_parallel for s in plan.servers}
    assert tp["llava-1.5-13b"] == tp["pixtral-12b"] == 2 and tp["llava-1.5-7b"] == 1  # 27 GB > 20 GB; 14 GB fits
    assert sum(len(s.gpus) for s in plan.servers) == 14 and not any(s.shared_with for s in plan.servers)
    with pytest.raises(ValueError, match="need at least 14 GPUs of 40 GB; this node has 8"):
        plan_servers(paper.responders, paper.generation, gpus=8, gpu_memory_gb=40, sizes=PAPER_SIZES, facts=not_cached)


def test_in_process_responders_get_a_port_and_the_spec_that_points_at_it():
    responders = [
        BackendSpec(name="local-7b", kind="transformers", model="org/local-7b-hf"),
        BackendSpec(name="tiny", kind="tiny", refusal_rate=0.3),
        BackendSpec(name="served", kind="openai", model="org/x-7b", base_urls=["http://localhost:8003/v1"]),
        BackendSpec(name="remote", kind="openai", model="org/y-7b", base_urls=["http://gpu-9:8000/v1"]),
    ]
    plan = plan_servers(responders, {"max_new_tokens": 64}, facts=not_cached)
    assert [(s.responder, s.port, s.max_model_len) for s in plan.servers] == [
        ("local-7b", 8004, 7744),
        ("served", 8003, 7744),
    ]
    assert plan.elsewhere == {
        "tiny": "tiny: built in the Kedro process",
        "remote": "served elsewhere: http://gpu-9:8000/v1",
    }
    assert plan.replace["local-7b"]["base_urls"] == ["http://127.0.0.1:8004/v1"]
    assert "#   - {name: local-7b, kind: openai, model: org/local-7b-hf" in script(plan, env="x")
    with pytest.raises(ValueError, match="both name port 8003 for different models"):
        plan_servers(
            responders
            + [BackendSpec(name="clash", kind="openai", model="org/z", base_urls=["http://127.0.0.1:8003/v1"])],
            {},
            facts=not_cached,
        )


def test_facts_come_from_the_checkpoint_files(tmp_path):
    vlm = build_tiny(tmp_path)
    facts = model_facts(str(tmp_path))
    assert facts.params_b * 1e9 == pytest.approx(sum(p.numel() for p in vlm.model.parameters()))
    assert facts.context == vlm.model.config.text_config.max_position_embeddings and not facts.remote_code
    plan = plan_servers([BackendSpec(name="t", kind="transformers", model=str(tmp_path))], {})
    assert plan.servers[0].max_model_len == min(7680 + 512, facts.context)
    assert re.search(r"t: 0\.\d+B parameters \(safetensors headers\)", script(plan, env="x"))
