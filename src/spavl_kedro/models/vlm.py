"""Model access for vision-language models: prompts in, texts out.

`TransformersVLM` runs any image-text-to-text model held in memory (a tiny LLaVA built offline, or a
model directory / hub id loaded with `load_vlm`) with batched generation. `OpenAIVLM` sends the same
prompts to one or more OpenAI-compatible `/v1/chat/completions` servers (vLLM, SGLang, TGI,
`transformers serve`, hosted APIs), many requests in flight at once. Callers never see tensors or sockets,
and neither backend raises for a failed record: it comes back with its error.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import email.utils
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiohttp
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from spavl_kedro.imaging import decode_image, png_bytes  # noqa: F401  (re-exported for callers)
from spavl_kedro.models.costs import UsageMeter
from spavl_kedro.models.families import family_of
from spavl_kedro.models.specs import InputFormat
from spavl_kedro.models.tiny import VLM, assistant_message, user_message
from spavl_kedro.models.videoless import enable_videoless_processors
from spavl_kedro.seeding import offset_seed


@dataclass(frozen=True)
class Prompt:
    """One user turn: zero or more images (PNG bytes) followed by a question, and optionally the assistant's
    `reply` to it, which makes the prompt a conversation for a classifier that judges that reply (Llama
    Guard): its own chat template turns the conversation into its task."""

    text: str
    images: tuple[bytes, ...] = ()
    reply: str | None = None

    def messages(self) -> list[dict]:
        """The conversation in the structured chat format that chat templates read."""
        turns = user_message(self.text, len(self.images))
        return turns if self.reply is None else turns + assistant_message(self.reply)


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence), "length" (max_new_tokens reached) or "error"
    latency_s: float
    error: str | None = None
    # with a backend's `score_words`: each word's probability at the answer's first non-blank token (the mass
    # of the tokens that start that word and no other of the words); None when not asked for
    word_probs: dict[str, float] | None = None


class VLMBackend(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]: ...


def load_vlm(path_or_id: str, trust_remote_code: bool = False, **kwargs: Any) -> VLM:
    """Load a model directory or hub id: safetensors weights only (a pickle checkpoint can run code when
    loaded), and the model repository's own Python only when its spec's trust_remote_code field is on."""
    for key in ("use_safetensors", "trust_remote_code"):
        if key in kwargs:
            raise ValueError(
                f"load_kwargs must not set {key}: weights are always safetensors, and remote code is "
                "the spec's own trust_remote_code field"
            )
    enable_videoless_processors()  # Qwen2-VL's and InternVL's processors where torchvision is absent
    try:
        processor = AutoProcessor.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise OSError(f"cannot load model '{path_or_id}' (safetensors weights only): {exc}") from exc
    model.eval()
    return VLM(model=model, processor=processor)


# The image processor fields a padding processor keeps from the checkpoint's own.
_IMAGE_FIELDS = (
    "size",
    "crop_size",
    "image_mean",
    "image_std",
    "do_resize",
    "do_center_crop",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


def pad_images_to_square(processor: Any) -> Any:
    """A copy of `processor` (sharing its tokenizer) whose image processor first pads each image to a square in the
    image processor's mean colour, then resizes and normalises as before: LLaVA's `--image_aspect_ratio pad`
    (`expand2square` in llava/mm_utils.py, github.com/haotian-liu/LLaVA), which LLaVA-1.5 was trained with.
    The checkpoint's own CLIP processor would centre-crop a non-square image instead. Saved with the model,
    the padding travels to every trainer, launched rank and evaluation that loads it."""
    from transformers import LlavaImageProcessorPil

    current = processor.image_processor.to_dict()
    padded = copy.copy(processor)
    padded.image_processor = LlavaImageProcessorPil(
        **{key: current[key] for key in _IMAGE_FIELDS if key in current}, do_pad=True
    )
    return padded


def with_system_sentence(processor: Any, sentence: str) -> Any:
    """A copy of `processor` (sharing its tokenizer) whose chat template begins every conversation that has no
    system turn with `sentence` and a space, as LLaVA's `conv_vicuna_v1` does (llava/conversation.py,
    SeparatorStyle.TWO: "<system> USER: <image>\\n{question} ASSISTANT:"). The template is the model's own,
    prefixed; saved with the model, the sentence reaches generation, every trainer and evaluation."""
    template = processor.chat_template
    if not template:
        raise ValueError("a system sentence needs the model's chat template, and this processor has none")
    prefixed = copy.copy(processor)
    literal = json.dumps(sentence + " ")  # a double-quoted string literal, which Jinja reads as Python would
    prefixed.chat_template = (
        "{%- if not messages or messages[0]['role'] != 'system' %}{{ " + literal + " }}{%- endif %}" + template
    )
    return prefixed


def as_configured(vlm: VLM, fmt: InputFormat) -> VLM:
    """`vlm` with its processor made to prompt and feed images as `fmt` says: the chat template file, then the
    image padding, then the system sentence. The model is shared; `vlm` itself is unchanged when nothing is set."""
    processor = vlm.processor
    if fmt.chat_template:
        processor = copy.copy(processor)
        processor.chat_template = Path(fmt.chat_template).read_text()
    if fmt.image_preprocessing == "pad":
        family = family_of(vlm.model)
        if not family.pads_to_square:
            raise ValueError(
                f"image_preprocessing 'pad' is LLaVA's expand2square; the '{family.name}' family's "
                "processor sizes images its own way (models/families.py: pads_to_square)"
            )
        processor = pad_images_to_square(processor)
    if fmt.system_sentence is not None:
        processor = with_system_sentence(processor, fmt.system_sentence)
    return vlm if processor is vlm.processor else VLM(vlm.model, processor)


def answering_kwargs(load_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`from_pretrained` kwargs for a model that answers (a responder, a judge, a policy under evaluation):
    the configured ones win; unset, a CUDA machine gets `device_map: auto` (the visible GPUs, spread over
    them when one is not enough) in the checkpoint's own dtype, and the CPU float32 (half precision there is
    slow, and some CPU kernels lack it). Training loads stay on the host: the trainer places its copy."""
    kwargs = dict(load_kwargs or {})
    if torch.cuda.is_available():
        kwargs.setdefault("device_map", "auto")
        kwargs.setdefault("dtype", "auto")
    else:
        kwargs.setdefault("dtype", torch.float32)
    return kwargs


def place_for_answering(vlm: VLM, load_kwargs: Mapping[str, Any] | None = None) -> VLM:
    """A model already in memory (a policy from the catalog) placed by `answering_kwargs`' rule: cast to its
    `dtype`, then moved to its `device_map` ("auto": the one GPU, or spread over several by accelerate; a
    device name; or a module -> device mapping). Moves `vlm.model` in place and returns `vlm`."""
    kwargs = answering_kwargs(load_kwargs)
    unknown = set(kwargs) - {"dtype", "device_map"}
    if unknown:
        raise ValueError(f"placing a loaded model takes dtype and device_map only, got {sorted(unknown)}")
    dtype, device_map = kwargs.get("dtype"), kwargs.get("device_map")
    if dtype not in (None, "auto"):
        vlm.model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device_map == "auto" and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = getattr(vlm.model, "_no_split_modules", None)
        dispatch_model(vlm.model, infer_auto_device_map(vlm.model, no_split_module_classes=no_split))
    elif isinstance(device_map, dict):
        from accelerate import dispatch_model

        dispatch_model(vlm.model, device_map)
    elif device_map is not None:
        vlm.model.to("cuda" if device_map == "auto" else device_map)
    return vlm


def load_processor(path: str):
    enable_videoless_processors()
    return AutoProcessor.from_pretrained(path)


@dataclass
class TransformersVLM:
    """Batched local generation. `generation` holds `generate()` kwargs (max_new_tokens, do_sample, ...)."""

    name: str
    vlm: VLM
    batch_size: int = 16
    generation: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True
    score_words: tuple[str, ...] = ()  # e.g. ("unsafe", "safe") for a guard: Generation.word_probs

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        results: list[Generation] = []
        batches = range(0, len(prompts), self.batch_size)
        for n, start in enumerate(
            tqdm(batches, desc=f"generate[{self.name}]", unit="batch", disable=not self.progress or len(batches) < 2)
        ):
            batch = prompts[start : start + self.batch_size]
            # Seed per batch so a record's sample does not depend on what ran before it in the process.
            torch.manual_seed(offset_seed(self.seed, n))
            began = time.perf_counter()
            try:
                texts, reasons, probs = self._generate_batch(batch)
            except Exception as exc:  # keep the records, with the error, rather than lose the batch
                elapsed = (time.perf_counter() - began) / len(batch)
                results += [Generation("", "error", elapsed, f"{type(exc).__name__}: {exc}") for _ in batch]
                continue
            elapsed = (time.perf_counter() - began) / len(batch)
            results += [Generation(t, r, elapsed, word_probs=p) for t, r, p in zip(texts, reasons, probs)]
        return results

    def _word_tokens(self) -> dict[str, list[int]]:
        """Per score word, the vocabulary ids whose text (stripped, lower-cased) starts that word and no other:
        "s", "sa", "safe" for "safe"; "un", "unsafe" for "unsafe"."""
        if getattr(self, "_tokens_of", None) is None:
            tokenizer = self.vlm.processor.tokenizer
            pieces = {i: tokenizer.decode([i]).strip().lower() for i in range(len(tokenizer))}
            self._tokens_of = {
                w: [
                    i
                    for i, p in pieces.items()
                    if p and w.startswith(p) and not any(o.startswith(p) for o in self.score_words if o != w)
                ]
                for w in self.score_words
            }
        return self._tokens_of

    def _first_word_probs(
        self, new_tokens: torch.Tensor, scores: Sequence[torch.Tensor]
    ) -> list[dict[str, float] | None]:
        tokenizer = self.vlm.processor.tokenizer
        ids = self._word_tokens()
        out: list[dict[str, float] | None] = []
        for row in range(new_tokens.shape[0]):
            # the first step whose token is not blank ("\n\n" before Llama Guard's verdict)
            step = next(
                (
                    k
                    for k in range(min(len(scores), new_tokens.shape[1]))
                    if tokenizer.decode([int(new_tokens[row, k])]).strip()
                ),
                None,
            )
            if step is None:
                out.append(None)
                continue
            probs = torch.softmax(scores[step][row].float(), dim=-1)
            out.append({w: float(probs[ids[w]].sum()) if ids[w] else 0.0 for w in self.score_words})
        return out

    def _generate_batch(self, batch: Sequence[Prompt]) -> tuple[list[str], list[str], list[dict[str, float] | None]]:
        processor = self.vlm.processor
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        texts = [processor.apply_chat_template(p.messages(), add_generation_prompt=True) for p in batch]
        images = [decode_image(img) for p in batch for img in p.images]
        # to the device of the model's first layer (with a device_map spreading it, accelerate moves the rest)
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self.vlm.model.device)
        kwargs = {"use_cache": True, "pad_token_id": tokenizer.pad_token_id, **self.generation}
        if self.score_words:
            kwargs |= {"output_scores": True, "return_dict_in_generate": True}
        with torch.inference_mode():
            output = self.vlm.model.generate(**inputs, **kwargs)
        sequences = output.sequences if self.score_words else output
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        eos = tokenizer.eos_token_id
        reasons = ["stop" if (row == eos).any() else "length" for row in new_tokens]
        decoded = processor.batch_decode(new_tokens, skip_special_tokens=True)
        probs = self._first_word_probs(new_tokens, output.scores) if self.score_words else [None] * len(batch)
        return [d.strip() for d in decoded], reasons, probs


# transformers `generate()` kwargs -> chat-completions request fields. The same `generation` block then
# drives a local model and a served one. Keys in _NO_OPS are dropped when they hold the value that means
# "off" in transformers; any other unknown key raises, since dropping it would silently change what is
# sampled. Server-specific extensions (vLLM's top_k, min_tokens, ...) go in `OpenAIVLM.extra_body`.
_RENAMED = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop_strings": "stop"}
_NO_OPS = {"top_k": (0, None), "num_beams": (1,), "use_cache": (True, False)}


def chat_request_fields(generation: dict[str, Any]) -> dict[str, Any]:
    """Map `generate()` kwargs to request fields; raise naming the key that has no equivalent.

    >>> chat_request_fields({"max_new_tokens": 32, "do_sample": True, "temperature": 1.0, "top_k": 0})
    {'max_tokens': 32, 'temperature': 1.0}
    >>> chat_request_fields({"max_new_tokens": 8, "do_sample": False, "top_p": 0.9})
    {'max_tokens': 8, 'temperature': 0.0}
    """
    fields: dict[str, Any] = {}
    for key, value in generation.items():
        if key in _RENAMED:
            fields[_RENAMED[key]] = value
        elif key in ("do_sample", "seed"):
            continue  # do_sample is handled below; seed becomes a per-record seed (OpenAIVLM.seed)
        elif key in _NO_OPS and value in _NO_OPS[key]:
            continue
        else:
            raise ValueError(
                f"generation key '{key}'={value!r} has no chat-completions equivalent; drop it, or "
                f"pass the server's own field through extra_body (e.g. vLLM accepts top_k)"
            )
    if generation.get("do_sample") is False:
        # Greedy: temperature 0 is how the API says it (transformers serve, vLLM and OpenAI all read it so);
        # top_p means nothing without sampling.
        fields["temperature"] = 0.0
        fields.pop("top_p", None)
    elif generation.get("do_sample") is True:
        # transformers' default temperature is 1.0; say it, or a server's own default applies instead.
        fields.setdefault("temperature", 1.0)
    return fields


def chat_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The OpenAI messages for `prompt`: a user turn with its images as base64 data URLs, then the question —
    the same order as `tiny.user_message`, so a served model sees the prompt `TransformersVLM` would build —
    and the assistant's reply when the prompt carries one (the server's chat template renders both turns)."""
    parts: list[dict[str, Any]] = []
    for data in prompt.images:
        mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"  # Prompt images are PNG; JPEG passes too
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": prompt.text})
    messages = [{"role": "user", "content": parts}]
    if prompt.reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": prompt.reply}]})
    return messages


# Retried: rate limits, server errors and request timeouts (408). Any other 4xx is the request's own fault
# (bad model name, unknown field, image too large) and would fail again: it fails at once.
def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class _Failure(NamedTuple):
    what: str  # "HTTP 503", "timeout (120 s)", "ClientConnectorError", ...
    detail: str  # response body excerpt or exception text
    retry: bool
    retry_after: str | None = None  # the Retry-After header, when the server sent one


# Jitter has its own generator so retries never move the global `random` state that seeded code relies on.
_jitter = random.Random()


@dataclass
class OpenAIVLM:
    """Generation through OpenAI-compatible `/v1/chat/completions` servers, many requests in flight at once.

    Each prompt is one request. Transient failures (429, 5xx, timeouts, refused connections) are retried
    with exponential backoff; a record that still fails comes back with `finish_reason="error"` and its
    `error`, never as an exception. Results are in input order. Works from sync code and from inside a
    running event loop (Jupyter). With a `meter`, every answered attempt is counted with the tokens the
    server reports (`models/costs.py` says which attempts count).

    >>> backend = OpenAIVLM(
    ...     "llava-7b",
    ...     base_urls=["http://gpu-0:8000/v1/"],
    ...     model="llava-hf/llava-1.5-7b-hf",
    ...     api_key="sk-secret",
    ...     generation={"max_new_tokens": 64, "do_sample": False},
    ... )
    >>> backend.base_urls, "sk-secret" in repr(backend)
    (['http://gpu-0:8000/v1'], False)
    """

    name: str  # becomes the `responder` column
    base_urls: list[str]  # one or more OpenAI-style roots ending in /v1; requests go to <url>/chat/completions
    model: str  # the `model` field of each request (`transformers serve`: the path or hub id it serves)
    api_key: str | None = field(default=None, repr=False)  # sent as "Authorization: Bearer"; never shown
    generation: dict[str, Any] = field(default_factory=dict)  # generate() kwargs, see chat_request_fields
    concurrency: int = 8  # requests in flight at once, over all base_urls together
    timeout_s: float = 120.0  # per attempt, connection to last byte
    max_retries: int = 4  # extra attempts after the first on 429 / 5xx / timeout / connection error
    backoff_s: float = 1.0  # first retry waits about this long, doubling each time (with jitter)
    max_backoff_s: float = 30.0  # cap on any single wait, a server's Retry-After included
    seed: int | None = 0  # record i sends offset_seed(seed, i) (generation["seed"] overrides); None sends none
    extra_body: dict[str, Any] = field(default_factory=dict)  # extra request fields a server understands
    progress: bool = True  # tqdm bar with rate and ETA
    # Counts each call's tokens; shared by the copies dataclasses.replace makes (per-shard seeds, judge retries).
    meter: UsageMeter | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"OpenAIVLM '{self.name}'"
        if isinstance(self.base_urls, str):
            self.base_urls = [self.base_urls]
        self.base_urls = [url.rstrip("/") for url in self.base_urls]
        if not self.base_urls:
            raise ValueError(f"{where}: base_urls is empty; give one or more URLs like http://localhost:8000/v1")
        for url in self.base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{where}: base_url {url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"{where}: need concurrency >= 1, max_retries >= 0 and timeout_s > 0")
        try:  # a bad key fails here, before any request is sent
            self._fields = chat_request_fields(self.generation)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if self.generation.get("seed") is not None:
            self.seed = int(self.generation["seed"])

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: a Kedro node or a script, no loop running
            return asyncio.run(self.agenerate(prompts))
        # A loop already runs in this thread (Jupyter, an async app): asyncio.run refuses, and waiting on
        # that loop from inside it would deadlock, so the requests run on a fresh loop in a worker thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(prompts)).result()

    async def agenerate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """`generate` for callers that are already async."""
        results: list[Generation | None] = [None] * len(prompts)
        slots = asyncio.Semaphore(self.concurrency)
        in_flight = [0] * len(self.base_urls)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.concurrency),
        )
        bar = tqdm(
            total=len(prompts), desc=f"generate[{self.name}]", unit="req", disable=not self.progress or len(prompts) < 2
        )

        async def run(i: int) -> None:
            # The slot is held through backoff sleeps too: a 429 asks for less load, not for the next request.
            async with slots:
                results[i] = await self._complete(session, i, prompts[i], in_flight)
            bar.update()

        async with session:
            try:
                await asyncio.gather(*(run(i) for i in range(len(prompts))))
            finally:
                bar.close()
        return results  # type: ignore[return-value]  # every slot is filled: _complete never raises

    async def _complete(
        self, session: aiohttp.ClientSession, index: int, prompt: Prompt, in_flight: list[int]
    ) -> Generation:
        """One record: attempts until a success, a non-retryable failure, or max_retries used up."""
        began = time.perf_counter()
        try:
            body = {"model": self.model, "messages": chat_messages(prompt), **self._fields, **self.extra_body}
            if self.seed is not None:
                body["seed"] = offset_seed(self.seed, index)  # per record, as TransformersVLM seeds per batch
            for attempt in range(1 + self.max_retries):
                server = self._pick_server(index + attempt, in_flight)
                in_flight[server] += 1
                try:
                    outcome = await self._attempt(session, self.base_urls[server], body)
                finally:
                    in_flight[server] -= 1
                if isinstance(outcome, Generation):
                    # Wall time of the record, retries and backoff included: what the caller waited.
                    outcome.latency_s = time.perf_counter() - began
                    return outcome
                if not outcome.retry or attempt == self.max_retries:
                    break
                await asyncio.sleep(self._backoff(attempt, outcome.retry_after))
            tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
            error = f"{outcome.what} after {tries}" + (f": {outcome.detail}" if outcome.detail else "")
        except Exception as exc:  # anything unforeseen: keep the record with its error, as TransformersVLM does
            error = f"{type(exc).__name__}: {exc}"
        return Generation("", "error", time.perf_counter() - began, error)

    async def _attempt(
        self, session: aiohttp.ClientSession, base_url: str, body: dict[str, Any]
    ) -> Generation | _Failure:
        """One HTTP request."""
        try:
            async with session.post(f"{base_url}/chat/completions", json=body) as response:
                status, text = response.status, await response.text()
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:  # aiohttp's own timeout errors subclass it too
            self._count(None)  # sent and maybe answered (and billed) after we stopped waiting: tokens unknown
            return _Failure(f"timeout ({self.timeout_s:g} s)", "", retry=True)
        except aiohttp.ClientError as exc:  # refused connection, reset, server gone mid-answer
            return _Failure(type(exc).__name__, str(exc), retry=True)
        excerpt = " ".join(text.split())[:300]
        if status != 200:
            return _Failure(f"HTTP {status}", excerpt, retry=_retryable(status), retry_after=retry_after)
        try:
            answer = json.loads(text)
        except ValueError:  # cut off on the way (a proxy, a dropped connection): asking again usually works
            self._count(None)  # answered, so billed, but its usage is unreadable
            return _Failure("truncated or invalid JSON", excerpt, retry=True)
        self._count(reported_tokens(answer))
        try:
            choice = answer["choices"][0]
            content = choice["message"].get("content") or ""
        except (
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
        ):  # valid JSON of another shape: asking again won't help
            return _Failure("unreadable response", excerpt, retry=False)
        # "stop" / "length" as TransformersVLM reports them; other API values (e.g. "content_filter") are kept.
        return Generation(content.strip(), choice.get("finish_reason") or "stop", 0.0)

    def _count(self, tokens: tuple[int, int] | None) -> None:
        if self.meter is not None:
            self.meter.record(self.name, self.model, tokens)

    def _pick_server(self, start: int, in_flight: list[int]) -> int:
        # Least busy first, so a fast server takes more of the load than a slow one (responders on mixed
        # hardware); ties go round-robin from the record index, and a retry starts one server further on,
        # so it goes elsewhere than the server that just failed whenever the load allows.
        order = [(start + k) % len(self.base_urls) for k in range(len(self.base_urls))]
        return min(order, key=lambda server: in_flight[server])

    def _backoff(self, retry: int, retry_after: str | None) -> float:
        wait = _retry_after_seconds(retry_after)
        if wait is None:
            # Exponential with "equal jitter": half of each step fixed, half random, so requests that failed
            # together (a server restart) come back spread out instead of in lock-step.
            step = self.backoff_s * 2**retry
            wait = step / 2 + _jitter.uniform(0, step / 2)
        # Capped, Retry-After included, so one confused server cannot park a worker for an hour.
        return min(wait, self.max_backoff_s)


def reported_tokens(answer: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a chat-completions answer's `usage`, or None when the server did
    not report both as whole numbers (some servers leave usage out; then the tokens are unknown, not zero).

    >>> reported_tokens({"usage": {"prompt_tokens": 812, "completion_tokens": 64, "total_tokens": 876}})
    (812, 64)
    >>> reported_tokens({"choices": []}), reported_tokens({"usage": {"prompt_tokens": 812}})
    (None, None)
    """
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    counts = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return counts  # type: ignore[return-value]
    return None


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
