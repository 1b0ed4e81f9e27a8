from types import SimpleNamespace

import pytest

from spavl_kedro.config import load_parameters, validate_parameters


def test_base_parameters_are_valid(params):
    validated = validate_parameters(params)
    assert len(validated["generate"].responders) >= 4


def test_bad_values_are_named_by_key(params):
    params["generate"]["responders"][0]["refusal_rate"] = 1.5
    params["align"]["dpo"]["lora_target_modules"] = ["lm_head"]
    params["split"]["validation_fractoin"] = 0.2
    with pytest.raises(ValueError) as err:
        validate_parameters(params)
    message = str(err.value)
    assert "generate.responders.0.refusal_rate" in message
    assert "lm_head" in message
    assert "split.validation_fractoin" in message


def test_cross_block_references_are_checked(params):
    params["evaluate"]["judges"] = ["keyword", "md-judge"]
    params["evaluate"]["reference_responder"] = "gpt-4v"
    with pytest.raises(ValueError) as err:
        validate_parameters(params)
    message = str(err.value)
    assert "evaluate.judges: ['md-judge'] are not judges of the judge stage" in message
    assert "evaluate.reference_responder: 'gpt-4v' is not one of generate.responders" in message


def test_the_paper_launch_setting_does_not_block_other_methods():
    params = paper_parameters()
    params["align"]["method"] = "reward"  # launched like every method
    launch = validate_parameters(params)["align"].launch
    assert launch.accelerate_config == "conf/paper/accelerate/deepspeed_zero2.yaml"
    assert launch.config_for("grpo") == "conf/paper/accelerate/deepspeed_zero3.yaml"


def test_a_missing_accelerate_config_is_named(params):
    params["align"]["launch"] = {"accelerate_config": "conf/paper/accelerate/fsdp.yaml"}
    with pytest.raises(
        ValueError,
        match="align.launch.accelerate_config: Value error, no accelerate config at 'conf/paper/accelerate/fsdp.yaml'",
    ):
        validate_parameters(params)


def test_kind_needs_its_fields(params):
    params["generate"]["responders"][1] = {"name": "remote", "kind": "transformers"}
    params["generate"]["responders"][2]["name"] = "tiny/careful"  # would become a folder and a metric path
    params["generate"]["questions"]["writer"] = "model"
    params["generate"]["images"]["assign"] = "clip"
    with pytest.raises(ValueError) as err:
        validate_parameters(params)
    message = str(err.value)
    assert "generate.responders.1: Value error, 'remote' (kind transformers) needs model" in message
    assert "generate.responders.2.name: String should match pattern" in message
    assert "generate.questions: Value error, writer 'model' needs model_writer" in message
    assert "generate.images.assign" in message and "source 'laion' only" in message


def paper_parameters() -> dict:
    return load_parameters("paper")


def test_paper_profile_is_valid_and_at_spa_vl_scale():
    validated = validate_parameters(paper_parameters())
    generate = validated["generate"]
    assert len(generate.responders) == 12
    # eleven open models behind vLLM servers on the node (`python -m spavl_kedro.serve_plan`), Gemini by API
    assert {r.kind for r in generate.responders} == {"openai"}
    assert sum(r.base_urls[0].startswith("http://127.0.0.1:") for r in generate.responders) == 11
    assert generate.questions.writer == "model" and generate.questions.screen.judge == "model"
    assert generate.mis.teacher.kind == "model"
    assert generate.images.source == "laion" and generate.images.assign == "clip"
    align = validated["align"]
    assert align.policy.model == "llava-hf/llava-1.5-7b-hf"
    dpo = align.recipe("dpo")
    assert (dpo["beta"], dpo["lora_r"], dpo["lora_alpha"], dpo["warmup_steps"]) == (0.1, 256, 512, 10)
    assert align.recipe("reward")["learning_rate"] == 3e-5 and align.recipe("grpo")["beta"] == 0.1
    judge = validated["judge"]
    assert {j.format for j in judge.judges if j.kind == "guard"} == {"md_judge", "llama_guard"}
    assert judge.primary == "md-judge" and judge.pairwise.backend.api_key == "openai"
    evaluate = validated["evaluate"]
    assert evaluate.samples == 0 and evaluate.reference_responder == "gemini-flash"
    assert evaluate.help_judge.pairwise.backend.model == "gpt-4o" and evaluate.typography.figstep_size == 760
    assert validated["align"].launch.accelerate_config == "conf/paper/accelerate/deepspeed_zero2.yaml"
    # the paper profile overrides keys inside blocks; everything else still comes from conf/base
    assert len(generate.questions.wording.families()) >= 36 and validated["tiny"].model.vocab_size > 0


def test_paper_profile_errors_name_the_key():
    params = paper_parameters()
    params["generate"]["responders"][5]["base_urls"] = []
    params["generate"]["questions"]["screen"]["backend"]["concurrency"] = 0
    params["judge"]["primary"] = "gpt-4v"
    with pytest.raises(ValueError) as err:
        validate_parameters(params)
    message = str(err.value)
    assert "generate.responders.5: Value error, 'qwen2-vl-7b' (kind openai) needs base_urls" in message
    assert "generate.questions.screen.backend.concurrency" in message
    assert "judge: Value error, primary 'gpt-4v' is not one of the judges" in message


def test_seed_corpus_scene_questions_are_checked(base_params):
    import copy

    from spavl_kedro.config import SeedCorpusConfig

    corpus = copy.deepcopy(base_params["generate"]["seed_corpus"])
    with pytest.raises(ValueError, match="questioned_scenes .* exceeds scenes"):
        SeedCorpusConfig.model_validate({**corpus, "scenes": 10, "questioned_scenes": 20})
    with pytest.raises(ValueError, match=r"no \['shape'\] questions"):
        SeedCorpusConfig.model_validate(
            {
                **corpus,
                "capability_templates": {k: v for k, v in corpus["capability_templates"].items() if k != "shape"},
            }
        )


def test_per_set_answer_caps_name_known_sets(base_params):
    from spavl_kedro.config import EvaluateConfig

    cfg = EvaluateConfig.model_validate(
        {**base_params["evaluate"], "max_new_tokens": 32, "max_new_tokens_per_set": {"mis_test": 1024}}
    )
    assert cfg.new_tokens("mis_test") == 1024 and cfg.new_tokens("test_harm") == 32
    with pytest.raises(ValueError, match=r"unknown evaluation sets \['mis_tset'\]"):
        EvaluateConfig.model_validate({**base_params["evaluate"], "max_new_tokens_per_set": {"mis_tset": 64}})
    with pytest.raises(ValueError, match="at least 1"):
        EvaluateConfig.model_validate({**base_params["evaluate"], "max_new_tokens_per_set": {"mis_test": 0}})


def test_config_imports_without_the_training_stack():
    """Parameters are checked (hooks, notebooks, test_docs) without loading torch, transformers or TRL."""
    import subprocess
    import sys

    code = (
        "import sys, spavl_kedro.config; heavy = {'torch', 'transformers', 'trl', 'peft'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nodes_receive_the_blocks_the_hook_checked(params, monkeypatch):
    """The run hook checks the blocks once and hands each node its block as that checked object; `typed`
    passes it through without checking it again, and still checks a plain dict (a node called from Python)."""
    from spavl_kedro.config import AlignConfig, JudgeConfig, typed
    from spavl_kedro.hooks import ProjectHooks

    class Catalog:
        def load(self, name):
            assert name == "parameters"
            return params

    hooks = ProjectHooks()
    hooks.before_pipeline_run(run_params={}, pipeline=None, catalog=Catalog())
    node = SimpleNamespace(name="train_dpo", func=lambda **kwargs: None)
    given = hooks.before_node_run(
        node=node, inputs={"params:align": params["align"], "params:judge": params["judge"], "train": object()}
    )
    assert set(given) == {"params:align", "params:judge"}
    assert isinstance(given["params:align"], AlignConfig) and isinstance(given["params:judge"], JudgeConfig)
    assert hooks.before_node_run(node=node, inputs={"train": object()}) is None

    def checked_again(*args, **kwargs):
        raise AssertionError("a checked block was checked again")

    monkeypatch.setattr(AlignConfig, "model_validate", checked_again)
    assert typed(AlignConfig, given["params:align"]) is given["params:align"]
    monkeypatch.undo()
    assert typed(AlignConfig, params["align"]).method == params["align"]["method"]
    with pytest.raises(Exception, match="betta"):
        typed(AlignConfig, {**params["align"], "dpo": {"betta": 0.1}})


def test_recipe_settings_are_built_once_with_the_run_folders(params):
    """A recipe is checked with its block; the run's settings are that object with the run's folders."""
    params["align"]["sft"] = {**params["align"].get("sft", {}), "checkpoint_dir": "elsewhere"}
    align = validate_parameters(params)["align"]
    dpo = align.settings("dpo", output_dir="scratch", artifact="dpo-small")
    assert (dpo.output_dir, dpo.checkpoint_dir) == ("scratch", "data/06_models/checkpoints/dpo-small")
    assert dpo.beta == params["align"]["dpo"]["beta"]
    assert align.settings("sft", output_dir="scratch").checkpoint_dir == "elsewhere"
    assert align.settings("rloo", output_dir="scratch").algorithm == "rloo"
