"""The paper dry run's plan: what it changes in conf/paper, and that it changes nothing else.

The run itself (`make paper-dryrun`, ~10 min on 2 cores) is CI's second step (.ci/run), not a test here."""

from __future__ import annotations

import copy
from urllib.parse import urlsplit

from spavl_kedro.config import load_parameters, validate_parameters
from spavl_kedro.paper_dryrun import CPU_LAUNCH, Fixtures, not_exercised, plan, runtime_params, served_backends


class Endpoint:
    def base_url(self, role: str) -> str:
        return f"http://127.0.0.1:9/{role}/v1"


def _urls(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _urls(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _urls(item, f"{path}[{i}]")
    elif isinstance(value, str) and "://" in value:
        yield path, value


def _flat(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flat(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        for i, item in enumerate(value):
            yield from _flat(item, f"{path}[{i}]")
    else:
        yield path, value


def test_the_dry_run_changes_only_what_it_lists_and_sends_nothing_off_the_machine():
    paper = load_parameters("paper")
    before = copy.deepcopy(paper)
    bases = {"internvl2_5_8b": ("/fixtures/internvl", "internvl")}
    overrides = plan(paper, Fixtures(policy="/fixtures/llava", bases=bases), Endpoint())
    params = runtime_params(overrides, paper)
    assert paper == before  # conf/paper's parameters are read, never edited

    # every OpenAI-compatible backend of the profile (12 responders, writer, screen, teacher, 2 guards,
    # GPT-4o as pairwise, MIS and HelpEval judge) goes to the loopback endpoint, in its parser's role
    assert len(served_backends(paper)) == 20
    assert {role for _, _, role in served_backends(paper)} == {
        "responder",
        "writer",
        "screen",
        "teacher",
        "md_judge",
        "llama_guard",
        "pairwise",
        "mis_judge",
    }
    assert all(urlsplit(url).hostname == "127.0.0.1" for _, url in _urls(params))

    # nothing differs from conf/paper but the keys the dry run prints
    merged = {**paper, **params}
    changed = {key for key, value in _flat(merged) if dict(_flat(paper)).get(key) != value}
    listed = {o.key for o in overrides}
    assert changed and all(
        any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in listed) for key in changed
    ), sorted(changed)
    assert merged["align"]["dpo"] == paper["align"]["dpo"] and merged["judge"]["primary"] == paper["judge"]["primary"]
    assert merged["align"]["launch"]["per_method"] == {"grpo": CPU_LAUNCH, "rloo": CPU_LAUNCH}

    printed = not_exercised(overrides)
    assert "align.policy.model: llava-hf/llava-1.5-7b-hf -> /fixtures/llava" in printed
    # MIS's own model: SFT trains from InternVL, whose stand-in is a fixture of the InternVL family
    assert "align.bases.internvl2_5_8b.model: OpenGVLab/InternVL2_5-8B-MPO-hf -> /fixtures/internvl" in printed
    assert merged["align"]["base_of"] == {"sft": "internvl2_5_8b"}
    assert "align.launch.accelerate_config: conf/paper/accelerate/deepspeed_zero2.yaml -> " + CPU_LAUNCH in printed
    assert "judge.pairwise.backend.base_urls: ['https://api.openai.com/v1'] -> " in printed
    validate_parameters(merged)  # the dry run's parameters pass the same checks as a real run's
