"""One way to name a model in configuration, and one function that turns the name into a backend.

Responders, the model question writer, the question screen and the chain-of-thought teacher are all
`BackendSpec`s: a tiny LLaVA built offline, a local `transformers` model (directory or hub id), or an
OpenAI-compatible endpoint (vLLM, SGLang, TGI, `transformers serve`, a hosted API). Whatever the kind, the
caller gets a `VLMBackend`: prompts in, generations out.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spavl_kedro.backends.tiny import VLM, Behaviour
from spavl_kedro.backends.vlm import OpenAIVLM, TransformersVLM, VLMBackend, answering_kwargs, load_vlm


NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"

# BackendSpec fields that decide where and how fast a request goes, not what it answers: resumable stages
# leave them out of their shard fingerprints, so a rerun against other servers still resumes.
TRANSPORT_FIELDS = frozenset({"concurrency", "timeout_s", "max_retries", "backoff_s", "base_urls", "api_key",
                              "batch_size"})


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The name is also a shard folder and part of MLflow metric names: letters, digits, '_', '.', '-' only.
    name: str = Field(pattern=NAME_PATTERN, description="unique name; the `responder` (or `writer`, `teacher`) column")
    kind: Literal["tiny", "transformers", "openai"] = Field(
        description="tiny: built offline; transformers: local directory or hub id; openai: chat-completions endpoint")
    refusal_rate: float | None = Field(None, ge=0, le=1, description="tiny responder: share of harmful requests it "
                                                                      "is taught to refuse")
    over_refusal_rate: float = Field(0.0, ge=0, le=1, description="tiny responder: share of harmless requests it "
                                                                   "is taught to refuse")
    vague_rate: float = Field(0.0, ge=0, le=1, description="tiny responder: share of answered harmless requests it "
                                                            "answers vaguely (names nothing in the image)")
    model: str | None = Field(None, description="transformers: directory or hub id; openai: the served model name")
    load_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="transformers only: from_pretrained kwargs (dtype, device_map); "
                                                    "unset, an answering model goes to the GPUs (device_map "
                                                    "auto) when there are any, else to the CPU in float32")
    trust_remote_code: bool = Field(False, description="transformers only: run the model repository's own Python "
                                                       "(off unless a model needs it and you trust it)")
    base_urls: list[str] = Field(default_factory=list,
                                 description="openai only: one or more .../v1 URLs; requests are spread over them")
    api_key: str | None = Field(None, description="openai only: NAME of a key in conf/local/credentials.yml, never the key")
    concurrency: int = Field(8, ge=1, description="openai only: requests in flight at once (over all base_urls)")
    timeout_s: float = Field(120.0, gt=0, description="openai only: per-request timeout")
    max_retries: int = Field(4, ge=0, description="openai only: retries on 429 / 5xx / timeout / cut-off JSON")
    backoff_s: float = Field(1.0, gt=0, description="openai only: first retry wait, doubling each time (with jitter; "
                                                    "a server's Retry-After wins)")
    batch_size: int | None = Field(None, ge=1, description="tiny/transformers: prompts per generate() call")
    generation: dict[str, Any] = Field(default_factory=dict, description="generation kwargs for this model")

    @model_validator(mode="after")
    def _kind_fields(self):
        where = f"'{self.name}' (kind {self.kind})"
        if self.kind in ("transformers", "openai") and not self.model:
            raise ValueError(f"{where} needs model ({'a directory or hub id' if self.kind == 'transformers' else 'the served model name'})")
        if self.kind == "openai" and not self.base_urls:
            raise ValueError(f"{where} needs base_urls (e.g. [http://localhost:8000/v1])")
        if self.kind != "openai" and (self.base_urls or self.api_key):
            raise ValueError(f"{where}: base_urls and api_key are for kind 'openai' only")
        if self.kind != "transformers" and self.trust_remote_code:
            raise ValueError(f"{where}: trust_remote_code is for kind 'transformers' only")
        if {"trust_remote_code", "use_safetensors"} & set(self.load_kwargs):
            raise ValueError(f"{where}: load_kwargs must not set trust_remote_code or use_safetensors (weights are "
                             "always safetensors; remote code is the spec's trust_remote_code field)")
        if self.kind != "tiny" and (self.refusal_rate is not None or self.over_refusal_rate or self.vague_rate):
            raise ValueError(f"{where}: refusal_rate, over_refusal_rate and vague_rate are for kind 'tiny' only")
        return self

    def behaviour(self) -> Behaviour:
        """What a tiny responder is bootstrapped to do."""
        if self.refusal_rate is None:
            raise ValueError(f"'{self.name}' (kind tiny) needs refusal_rate to be bootstrapped as a responder")
        return Behaviour(refusal_rate=self.refusal_rate, over_refusal_rate=self.over_refusal_rate,
                         vague_rate=self.vague_rate)


def build_backend(spec: BackendSpec, *, tiny_models: Mapping[str, Callable[[], VLM] | VLM] | None = None,
                  credentials: Mapping[str, Any] | None = None, generation: Mapping[str, Any] | None = None,
                  batch_size: int = 16, seed: int = 0, progress: bool = True) -> VLMBackend:
    """The backend `spec` names. `generation` holds shared defaults that `spec.generation` overrides.

    Tiny models come from `tiny_models` (the catalog gives lazy loaders, memory gives models); an API key
    comes from `credentials` by the name in `spec.api_key`.
    """
    kwargs = {**(generation or {}), **spec.generation}
    if spec.kind == "openai":
        key = api_key(spec, credentials)
        return OpenAIVLM(name=spec.name, model=spec.model, base_urls=list(spec.base_urls), api_key=key,
                         generation=kwargs, concurrency=spec.concurrency, timeout_s=spec.timeout_s,
                         max_retries=spec.max_retries, backoff_s=spec.backoff_s, seed=seed, progress=progress)
    if spec.kind == "tiny":
        vlm = _tiny(spec, tiny_models)
    else:
        vlm = load_vlm(spec.model, trust_remote_code=spec.trust_remote_code, **answering_kwargs(spec.load_kwargs))
    return TransformersVLM(spec.name, vlm, spec.batch_size or batch_size, kwargs, seed=seed, progress=progress)


def _tiny(spec: BackendSpec, tiny_models: Mapping[str, Any] | None) -> VLM:
    if not tiny_models or spec.name not in tiny_models:
        raise ValueError(f"'{spec.name}': no bootstrapped tiny model under that name")
    entry = tiny_models[spec.name]
    return entry() if callable(entry) else entry


def weights_of(spec: BackendSpec | None, tiny_models: Mapping[str, Any] | None) -> str | None:
    """For shard fingerprints: the weights fingerprint of a tiny model, whose weights change with every
    re-bootstrap under the same name; None for the other kinds (their spec names their weights)."""
    return _tiny(spec, tiny_models).fingerprint() if spec is not None and spec.kind == "tiny" else None


def api_key(spec: BackendSpec, credentials: Mapping[str, Any] | None) -> str | None:
    """The key `spec.api_key` names; raises before any request when credentials.yml lacks it."""
    if spec.api_key is None:
        return None
    normalised = re.sub(r"[^A-Za-z0-9]", "_", spec.api_key).lower()  # as SPAVL_KEY_<NAME> arrives
    if credentials and spec.api_key not in credentials and normalised in credentials:
        return _secret(credentials[normalised])
    if not credentials or spec.api_key not in credentials:
        raise ValueError(f"'{spec.name}': api_key '{spec.api_key}' is not in conf/local/credentials.yml nor "
                         f"SPAVL_KEY_{normalised.upper()} "
                         f"(the catalog entry api_credentials exposes: {sorted(credentials or {})})")
    return _secret(credentials[spec.api_key])


def _secret(entry: Any) -> str:
    """A credentials entry is either the key itself or a mapping with `api_key` (Kedro credentials style)."""
    if isinstance(entry, Mapping):
        if "api_key" not in entry:
            raise ValueError(f"credentials entry has no 'api_key' field (it has {sorted(entry)})")
        return str(entry["api_key"])
    return str(entry)
