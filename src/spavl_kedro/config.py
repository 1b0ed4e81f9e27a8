"""Typed configuration of every pipeline, checked before anything runs.

`parameters_<pipeline>.yml` stays plain YAML (so kedro-mlflow logs it as flat, comparable params); nodes
validate their block with these models, and `hooks.ValidateParamsHook` validates all blocks when the
context is created, so a typo fails the run before any model loads, with the key in the message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spavl_kedro.backends.tiny import BootstrapConfig, TinyModelConfig
from spavl_kedro.backends.training import DPOSettings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaxonomyConfig(Strict):
    domains: int = Field(6, description="expected number of domains (class1)")
    categories: int = Field(13, description="expected number of (domain, category) pairs")
    subcategories: int = Field(53, description="expected number of subcategories (class3)")


class ImagesConfig(Strict):
    per_subcategory: int = Field(3, ge=1, description="synthetic images rendered per subcategory")
    size: int = Field(96, ge=32, description="side of the rendered square image in pixels")


class QuestionTemplates(Strict):
    easy: list[str] = Field(min_length=1, description="plain, image-grounded questions")
    hardq: list[str] = Field(min_length=1, description="adversarial harmful questions")
    hards: list[str] = Field(min_length=1, description="harmful statements/instructions")


class SeedCorpusConfig(Strict):
    questions_per_image: int = Field(2, ge=1, description="seed prompts per image for bootstrapping")
    templates: list[str] = Field(min_length=1, description="seed question templates ({keyword}, {subcategory})")


class ResponderConfig(Strict):
    name: str = Field(description="unique responder name; becomes the `responder` column")
    kind: Literal["tiny", "transformers"] = Field(description="tiny: built offline; transformers: local dir or hub id")
    refusal_rate: float | None = Field(None, ge=0, le=1, description="tiny only: share of refusals it is taught")
    model: str | None = Field(None, description="transformers only: model directory or hub id")
    generation: dict[str, Any] = Field(default_factory=dict, description="generate() kwargs for this responder")

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "tiny" and self.refusal_rate is None:
            raise ValueError(f"responder '{self.name}': kind 'tiny' needs refusal_rate")
        if self.kind == "transformers" and not self.model:
            raise ValueError(f"responder '{self.name}': kind 'transformers' needs model (a directory or hub id)")
        return self


class GenerateConfig(Strict):
    seed: int = Field(0, description="seeds rendering, template choice and sampling")
    images: ImagesConfig = ImagesConfig()
    questions: QuestionTemplates
    seed_corpus: SeedCorpusConfig
    responders: list[ResponderConfig] = Field(min_length=2, description="the VLMs whose answers get paired")
    generation: dict[str, Any] = Field(default_factory=dict, description="generate() kwargs shared by responders")
    batch_size: int = Field(32, ge=1, description="prompts per generate() call")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.name for r in self.responders]
        if len(set(names)) != len(names):
            raise ValueError(f"responders: names must be unique, got {names}")
        return self


class TinyConfig(Strict):
    model: TinyModelConfig = TinyModelConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()


class KeywordJudgeConfig(Strict):
    case_sensitive: bool = Field(True, description="True: GCG exact substring test; False: lower-case both")
    compliance_markers: list[str] = Field(default_factory=list, description="openings of a complying answer")


class JudgeConfig(Strict):
    keyword: KeywordJudgeConfig = KeywordJudgeConfig()
    pairing: Literal["random"] = Field("random", description="how two responses per question are chosen")
    seed: int = Field(0, description="seeds the pairing")


class SplitConfig(Strict):
    seed: int = 0
    test_harm_per_subcategory: int = Field(1, ge=1, description="held-out harmful questions per subcategory")
    test_help_per_subcategory: int = Field(1, ge=1, description="held-out easy questions per subcategory")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of remaining pairs for validation")


class PolicyConfig(Strict):
    kind: Literal["tiny", "transformers"]
    refusal_rate: float | None = Field(None, ge=0, le=1, description="tiny only: how often the base refuses")
    model: str | None = Field(None, description="transformers only: model directory or hub id")
    seed: int = 7

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "tiny" and self.refusal_rate is None:
            raise ValueError("align.policy: kind 'tiny' needs refusal_rate")
        if self.kind == "transformers" and not self.model:
            raise ValueError("align.policy: kind 'transformers' needs model")
        return self


class AlignConfig(Strict):
    policy: PolicyConfig
    dpo: dict[str, Any] = Field(default_factory=dict, description="DPOSettings fields (see backends/training.py)")

    @model_validator(mode="after")
    def _dpo_fields(self):
        DPOSettings.model_validate({"output_dir": "unused", **self.dpo})
        return self


class EvaluateConfig(Strict):
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    samples: int = Field(4, ge=0, description="sampled answers per question besides the greedy one")
    temperature: float = Field(1.0, gt=0)
    seed: int = 0


SECTIONS: dict[str, type[BaseModel]] = {
    "taxonomy": TaxonomyConfig,
    "generate": GenerateConfig,
    "tiny": TinyConfig,
    "judge": JudgeConfig,
    "split": SplitConfig,
    "align": AlignConfig,
    "evaluate": EvaluateConfig,
}


def validate_parameters(params: dict[str, Any]) -> dict[str, BaseModel]:
    """Validate every known block of `params`; raise one error listing each bad key as block.path."""
    problems, result = [], {}
    for key, model in SECTIONS.items():
        if key not in params:
            problems.append(f"{key}: missing parameter block")
            continue
        try:
            result[key] = model.model_validate(params[key])
        except ValidationError as exc:
            for err in exc.errors():
                path = ".".join(str(p) for p in (key, *err["loc"]))
                problems.append(f"{path}: {err['msg']}")
    if problems:
        raise ValueError("invalid parameters:\n  " + "\n  ".join(problems))
    return result
