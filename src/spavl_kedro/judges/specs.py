"""The settings of each kind of judge, as `judge.judges[]`, `judge.pairwise`, `evaluate.help_judge.pairwise` and
`evaluate.mis_judge` write them: checked when the configuration loads, read by factory.py, which builds
the judge. They sit with the judges rather than in config.py, which assembles the stage blocks from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from spavl_kedro.blocks import NAME_PATTERN, Strict, row_name
from spavl_kedro.models.specs import BackendSpec


@dataclass(frozen=True)
class JudgeKind:
    """What the configuration and the reports know about one `kind` of verdict judge; factory.py's
    `VERDICT_KINDS` holds how a spec of the kind becomes a judge."""

    asks_model: bool  # asks a guard model (`backend`, in a `format`, through a prompt); else reads answers by rule
    rule: str | None = None  # what a rule judge reads, as reports name its input format


# Every verdict judge kind, by the name `judge.judges[].kind` takes. A new kind is a row here, a builder in
# judge_factory.VERDICT_KINDS and the judge class it builds (`tests/test_extension_kinds.py` adds a toy one).
JUDGE_KINDS: dict[str, JudgeKind] = {
    "keyword": JudgeKind(asks_model=False, rule="none (refusal strings)"),
    "guard": JudgeKind(asks_model=True),
}


JudgeKindName = row_name(JUDGE_KINDS, "judge kind")


class VerdictJudgeSpec(Strict):
    name: str = Field(
        pattern=NAME_PATTERN, description="a unique name; it is the `judge` column and part of metric names"
    )
    kind: JudgeKindName = Field(
        description="a row of `judges/specs.py: JUDGE_KINDS`. `keyword`: refusal strings; `guard`: a guard model"
    )
    case_sensitive: bool = Field(
        True,
        description="`keyword`: `true` is GCG's exact substring test; `false` is "
        'VLGuard\'s lower-cased test, where "sorry" inside a sentence '
        "counts as a refusal",
    )
    compliance_markers: list[str] = Field(
        default_factory=list,
        description="`keyword`: openings of a complying answer. They only sort unsafe answers "
        "into compliance and no_refusal",
    )
    format: Literal["md_judge", "llama_guard"] | None = Field(
        None, description="`guard`, required there: the prompt and output format"
    )
    backend: BackendSpec | None = Field(
        None,
        description="`guard`, required there: the model, of kind `transformers` "
        "or `openai`, or `tiny`: a guard bootstrapped offline on the "
        "seed corpus to answer in MD-Judge's format (text only)",
    )
    prompt: str | None = Field(
        None,
        description="`guard`, `md_judge` only: the prompt template inline, with "
        "`{question}` and `{response}` filled in. Llama Guard takes none: its "
        "chat template is its format",
    )
    prompt_file: str | None = Field(
        None,
        description="`guard`, `md_judge` only: a file holding the prompt template (MD-Judge's is in its model "
        "card; copy it there), relative to the project root. Neither this nor `prompt`: the "
        "project's own wording, which reports label as a fallback. Reports and MLflow name the file "
        "and its SHA-256; preflight checks that it exists",
    )
    show_images: bool | None = Field(
        None,
        description="`guard`: attach the images. Null means yes for `llama_guard` "
        "and no for `md_judge`. A guard without images is asked about "
        "an evaluation item's `request` in words where the question "
        "leaves it to the image "
        "([evaluate.md](evaluate.md#what-a-judge-is-asked))",
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="`guard`: sampled re-asks after an unparsable answer; after that the "
        "verdict stays null (undecided)",
    )

    @model_validator(mode="after")
    def _kind_fields(self):
        asks_model = JUDGE_KINDS[self.kind].asks_model
        if asks_model and (self.format is None or self.backend is None):
            raise ValueError(
                f"judge '{self.name}': kind '{self.kind}' needs format (md_judge or llama_guard) and backend"
            )
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError(f"judge '{self.name}': give prompt or prompt_file, not both")
        if self.format == "llama_guard" and (self.prompt is not None or self.prompt_file is not None):
            raise ValueError(
                f"judge '{self.name}': Llama Guard's input format is its own chat template, applied "
                "to the conversation; drop prompt / prompt_file"
            )
        if not asks_model and (self.prompt is not None or self.prompt_file is not None):
            raise ValueError(f"judge '{self.name}': prompt and prompt_file are for judges that ask a model (guard)")
        if asks_model and self.backend.bootstrapped and (self.format != "md_judge" or self.show_images):
            raise ValueError(
                f"judge '{self.name}': a tiny guard learns MD-Judge's format on text only "
                "(format md_judge, show_images false)"
            )
        if not asks_model and (self.format or self.backend):
            raise ValueError(f"judge '{self.name}': format and backend are for judges that ask a model (guard)")
        return self

    @property
    def asks_model(self) -> bool:
        """Whether the judge asks a guard model (`JUDGE_KINDS`) rather than reading answers by rule."""
        return JUDGE_KINDS[self.kind].asks_model

    @property
    def reads_question(self) -> bool:
        """Whether the verdict depends on the question at all: a rule judge reads the response only."""
        return self.asks_model

    @property
    def sees_images(self) -> bool:
        """Whether the guard is shown the items' images: `show_images`, else Llama Guard yes, MD-Judge no. A
        guard that reads the question without the images is asked about an item's `request` in words."""
        if not self.asks_model:
            return False
        return self.format == "llama_guard" if self.show_images is None else self.show_images


class PairwiseJudgeSpec(Strict):
    name: str = Field(
        description="the scorer's name: the `judge` of the preferences it decides (`judge.pairwise`), or "
        "the scorer in metric names such as `win_rate.gpt-4o-help` "
        "(`evaluate.help_judge.pairwise`)"
    )
    backend: BackendSpec = Field(description="the chat model that compares the two answers, asked in both orders")
    prompt: str | None = Field(
        None,
        description="replaces the built-in prompt; `{question}`, `{response_a}` and "
        "`{response_b}` are filled in (`{image_note}` optional), and the "
        "answer must end with `[[A]]`, `[[B]]` or `[[TIE]]`",
    )
    max_retries: int = Field(2, ge=0, description="re-asks after an unparsable comparison")


class MisJudgeSpec(Strict):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="the scorer in metric names (`rsr.gpt-4o-mis`); must differ "
        "from the verdict judges, the help judge and `rules`",
    )
    backend: BackendSpec = Field(
        description="the VLM that judges, shown both images, of kind `transformers` or "
        "`openai`; greedy with 128 new tokens, as gpt_eval.py, unless its "
        "`generation` says otherwise"
    )
    prompt: str | None = Field(
        None,
        description="replaces the built-in prompt; `{question}` and `{response}` are "
        "filled in, and the answer must still be the JSON object "
        '`{"label_perception": "Perception Level1" / "Perception Level2" / '
        '"Perception Level3", "label_str": "Safe" / "Unsafe"}`',
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="re-asks (sampled, fresh seed) of an answer that is not exactly that "
        "object; after them the answer is undecided and counts as ASR",
    )
    structured_output: bool = Field(
        False,
        description="openai backends only: send the answer's JSON schema as "
        "`response_format` (OpenAI structured outputs, as gpt_eval.py "
        "does; vLLM accepts it too)",
    )

    @model_validator(mode="after")
    def _backend_kind(self):
        if self.backend.bootstrapped:
            raise ValueError(f"mis_judge '{self.name}': the backend is transformers or openai, not tiny")
        if self.structured_output and not self.backend.served:
            raise ValueError(
                f"mis_judge '{self.name}': structured_output needs backend kind openai "
                f"(got {self.backend.kind}); set structured_output: false"
            )
        return self
