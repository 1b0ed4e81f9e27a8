"""One way to name a model in configuration, and one function that turns the name into a backend.

Responders, the model question writer, the question screen and the chain-of-thought teacher are all
`BackendSpec`s: a tiny LLaVA built offline, a local `transformers` model (directory or hub id), or an
OpenAI-compatible endpoint (vLLM, SGLang, TGI, `transformers serve`, a hosted API). Whatever the kind, the
caller gets a `VLMBackend`: prompts in, generations out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from spavl_kedro.models.costs import UsageMeter
from spavl_kedro.models.specs import BackendSpec
from spavl_kedro.models.tiny import VLM
from spavl_kedro.models.vlm import (
    OpenAIVLM,
    TransformersVLM,
    VLMBackend,
    answering_kwargs,
    as_configured,
    load_vlm,
)


def build_backend(
    spec: BackendSpec,
    *,
    tiny_models: Mapping[str, Callable[[], VLM] | VLM] | None = None,
    credentials: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    meter: UsageMeter | None = None,
) -> VLMBackend:
    """The backend `spec` names. `generation` holds shared defaults that `spec.generation` overrides.

    Tiny models come from `tiny_models` (the catalog gives lazy loaders, memory gives models); an API key
    comes from `credentials` by the name in `spec.api_key`. An `openai` backend counts its calls' tokens into
    `meter` (the stage's, `models/costs.py`); local models cost no API money and are not metered.
    """
    kwargs = {**(generation or {}), **spec.generation}
    return BUILDERS[spec.kind](
        spec,
        tiny_models=tiny_models,
        credentials=credentials,
        generation=kwargs,
        batch_size=spec.batch_size or batch_size,
        seed=seed,
        progress=progress,
        meter=meter,
    )


def _openai(spec: BackendSpec, *, credentials, generation, seed, progress, meter, **_) -> OpenAIVLM:
    return OpenAIVLM(
        name=spec.name,
        model=spec.model,
        base_urls=list(spec.base_urls),
        api_key=api_key(spec, credentials),
        generation=generation,
        concurrency=spec.concurrency,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        backoff_s=spec.backoff_s,
        seed=seed,
        progress=progress,
        meter=meter,
    )


def _tiny_model(spec: BackendSpec, *, tiny_models, generation, batch_size, seed, progress, **_) -> TransformersVLM:
    return TransformersVLM(spec.name, _tiny(spec, tiny_models), batch_size, generation, seed=seed, progress=progress)


def _transformers(spec: BackendSpec, *, generation, batch_size, seed, progress, **_) -> TransformersVLM:
    vlm = load_vlm(spec.model, trust_remote_code=spec.trust_remote_code, **answering_kwargs(spec.load_kwargs))
    return TransformersVLM(spec.name, as_configured(vlm, spec), batch_size, generation, seed=seed, progress=progress)


# How a spec of each kind (settings.BACKEND_KINDS) becomes a backend; the keyword arguments are
# build_backend's, with the spec's own generation and batch size applied.
BUILDERS: dict[str, Callable[..., VLMBackend]] = {"tiny": _tiny_model, "transformers": _transformers, "openai": _openai}


def _tiny(spec: BackendSpec, tiny_models: Mapping[str, Any] | None) -> VLM:
    if not tiny_models or spec.name not in tiny_models:
        raise ValueError(
            f"'{spec.name}': no bootstrapped tiny model under that name (the generate pipeline "
            f"bootstraps the responders, the judge pipeline the guards; neither has run here)"
        )
    entry = tiny_models[spec.name]
    return entry() if callable(entry) else entry


def weights_of(spec: BackendSpec | None, tiny_models: Mapping[str, Any] | None) -> str | None:
    """For shard fingerprints: the weights fingerprint of a tiny model, whose weights change with every
    re-bootstrap under the same name; None for the other kinds (their spec names their weights)."""
    return _tiny(spec, tiny_models).fingerprint() if spec is not None and spec.bootstrapped else None


def api_key(spec: BackendSpec, credentials: Mapping[str, Any] | None) -> str | None:
    """The key `spec.api_key` names; raises before any request when credentials.yml lacks it."""
    if spec.api_key is None:
        return None
    normalised = re.sub(r"[^A-Za-z0-9]", "_", spec.api_key).lower()  # as SPAVL_KEY_<NAME> arrives
    if credentials and spec.api_key not in credentials and normalised in credentials:
        return _secret(credentials[normalised])
    if not credentials or spec.api_key not in credentials:
        raise ValueError(
            f"'{spec.name}': api_key '{spec.api_key}' is not in conf/local/credentials.yml nor "
            f"SPAVL_KEY_{normalised.upper()} "
            f"(the catalog entry api_credentials exposes: {sorted(credentials or {})})"
        )
    return _secret(credentials[spec.api_key])


def _secret(entry: Any) -> str:
    """A credentials entry is either the key itself or a mapping with `api_key` (Kedro credentials style)."""
    if isinstance(entry, Mapping):
        if "api_key" not in entry:
            raise ValueError(f"credentials entry has no 'api_key' field (it has {sorted(entry)})")
        return str(entry["api_key"])
    return str(entry)


T = TypeVar("T")


class OneAtATime(Generic[T]):
    """Holds one model (a backend, a judge, a policy) at a time, for stages that use many in turn.

    `get(name, build)` returns the model held under `name`, or releases the one held and only then builds
    the next, so two large models never share memory. Stages run their shards grouped by model, so each
    model is built once per run.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self._held: T | None = None

    def get(self, name: str, build: Callable[[], T]) -> T:
        if self.name != name:
            self._held = None  # release before the next one loads
            self._held, self.name = build(), name
        return self._held
