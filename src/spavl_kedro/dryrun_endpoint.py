"""A loopback OpenAI-compatible server that stands in for every `kind: openai` backend of conf/paper.

It exists only for the paper dry run (`make paper-dryrun`): conf/paper's configuration run on the CPU with
every model endpoint pointed at this one server, so that each stage downstream gets data it can parse.
Each backend's base_url is `http://127.0.0.1:<port>/<role>/v1`; the server answers
`POST /<role>/v1/chat/completions` with text in that role's format and `GET /<role>/v1/models` with the
model ids it was given for the role.

The answers are seeded random text in each format — seeded per request by a hash of the request body and
`seed`, so a rerun is identical — and carry no findings: they exercise formats and plumbing, nothing else.
The formats, one per role (`ROLES`), are those the project's own parsers read:

- responder: free text of 1-3 sentences, half refusals (each holds one of `judges.REFUSAL_STRINGS`, which
  `KeywordJudge` looks for), half compliances that name a thing the question names;
- md_judge: `judges.parse_md_judge` ("safe", or "unsafe" and an O1-O6 domain on the next line);
- llama_guard: `judges.parse_llama_guard` ("safe", or "unsafe" and S1-S14 hazard codes);
- pairwise: `judges.parse_preference` (a sentence, then "[[A]]", "[[B]]" or "[[TIE]]"); seeded by the
  question and the unordered pair of responses, so both orders of one pair agree, as `ChatJudge` asks;
- writer: one question (easy, hardq) or instruction (hards) on its first line, as
  `pipelines/generate/questions.py` (`first_line`) keeps it;
- screen: `questions.parse_label` (first word "unsafe" or "safe"); mostly "unsafe", since SPA-VL's hard
  question types are kept only when the screen judges them harmful;
- teacher: `pipelines/generate/mis.split_cot` ("Perception:", "Reasoning:", "Answer:" parts, in order);
- mis_judge: `judges/mis.parse_mis_judgment` (the official JSON: label_perception, label_str).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

from aiohttp import web

from spavl_kedro.judges.core import REFUSAL_STRINGS
from spavl_kedro.judges.guard import MD_JUDGE_DOMAINS

ROLES = ("responder", "md_judge", "llama_guard", "pairwise", "writer", "screen", "teacher", "mis_judge")

Messages = list[dict[str, Any]]
IMAGE_TOKENS = 576  # a rough count per image (LLaVA-1.5's 24 x 24 patches); usage is for plumbing only

# ---------------------------------------------------------------- reading the request


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or () if part.get("type") == "text")


def _last(messages: Messages, role: str) -> str:
    return next((_text(m) for m in reversed(messages) if m.get("role") == role), "")


def _after(text: str, pattern: str, default: str) -> str:
    match = re.search(pattern, text)
    return match.group(1).strip() if match else default


# Words that end a noun phrase, or name nothing worth mentioning.
_STOPWORDS = {
    "a",
    "about",
    "an",
    "and",
    "are",
    "as",
    "at",
    "best",
    "by",
    "could",
    "does",
    "for",
    "from",
    "give",
    "have",
    "image",
    "images",
    "in",
    "into",
    "is",
    "it",
    "make",
    "of",
    "on",
    "one",
    "or",
    "other",
    "picture",
    "pictures",
    "please",
    "quickest",
    "same",
    "should",
    "tell",
    "that",
    "the",
    "there",
    "this",
    "to",
    "way",
    "what",
    "where",
    "which",
    "with",
    "would",
    "your",
}
_REFUSALS_LOWER = tuple(s.lower() for s in REFUSAL_STRINGS)
_AFTER_DETERMINER = re.compile(
    r"\b(?:the|a|an|this|that|these|those|my|your)\s+((?:[A-Za-z][A-Za-z-]*[ ]?){1,2})", re.I
)


def _topic(text: str, rng: random.Random) -> str:
    """A thing `text` names, to mention: one or two words after a determiner ("kitchen knife", "padlock"), else
    any longer word; never one that reads as a refusal to the keyword judge ("illegal", "gas an...")."""
    phrases = []
    for match in _AFTER_DETERMINER.finditer(text):
        words = match.group(1).lower().split()
        phrases.append(" ".join(words[: next((i for i, w in enumerate(words) if w in _STOPWORDS), len(words))]))
    if not any(phrases):
        phrases = [w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOPWORDS]
    phrases = [p for p in phrases if p and not any(s in p for s in _REFUSALS_LOWER)]
    return rng.choice(phrases) if phrases else "picture"


# ---------------------------------------------------------------- one answer per role

_REFUSAL_OPENINGS = (
    "I'm sorry, but I can't help with that request about the {topic}.",
    "I cannot help with anything that uses the {topic} to cause harm.",
    "I can't assist with that, even with the {topic} in the picture.",
)
_COMPLIANCE_OPENINGS = (
    "Sure, the {topic} is the first thing to look at here.",
    "Here is what I notice about the {topic} in the picture.",
    "The {topic} stands out in the image.",
)
_MORE = (
    "It sits near the centre of the frame.",
    "The colours around it are muted.",
    "A safe way to learn more is a reputable guide or a local expert.",
    "Nothing else in view is unusual.",
)


def responder(messages: Messages, rng: random.Random) -> str:
    topic = _topic(_last(messages, "user"), rng)
    openings = _REFUSAL_OPENINGS if rng.random() < 0.5 else _COMPLIANCE_OPENINGS
    return " ".join([rng.choice(openings).format(topic=topic), *rng.sample(_MORE, rng.randrange(3))])


def _md_judge_answer(rng: random.Random, unsafe_share: float) -> str:
    return "unsafe\n" + rng.choice(sorted(MD_JUDGE_DOMAINS.values())) if rng.random() < unsafe_share else "safe"


def md_judge(messages: Messages, rng: random.Random) -> str:
    return _md_judge_answer(rng, 0.5)


def llama_guard(messages: Messages, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "safe"
    codes = sorted(rng.sample(range(1, 15), rng.randint(1, 2)))
    return "unsafe\n" + ",".join(f"S{c}" for c in codes)


_PAIR = re.compile(r"(.*)\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)", re.S)


def _pair(messages: Messages) -> tuple[str, str, str] | None:
    """(context, first paragraph of response A, of response B) of a pairwise prompt, or None. First paragraphs
    only: where response B ends and the instructions begin is known only from the other order's prompt."""
    match = _PAIR.fullmatch(_last(messages, "user"))
    if match is None:
        return None
    context, a, b = match.groups()
    return context, a.split("\n\n")[0], b.split("\n\n")[0]


def pair_key(messages: Messages) -> bytes | None:
    """What seeds a pairwise answer: the prompt before the responses and the responses in sorted order, the
    same for both orders of a pair."""
    pair = _pair(messages)
    return None if pair is None else json.dumps([pair[0], *sorted(pair[1:])]).encode()


def pairwise(messages: Messages, rng: random.Random) -> str:
    pair = _pair(messages)
    winner = rng.choices((0, 1, None), weights=(7, 7, 2))[0]  # of the two responses in sorted order
    if pair is None or pair[1] == pair[2] or winner is None:
        return "Both responses are equally harmless and equally helpful here. [[TIE]]"
    letter = "A" if sorted(pair[1:])[winner] == pair[1] else "B"
    return f"Response {letter} is the safer of the two and no less helpful. [[{letter}]]"


def writer(messages: Messages, rng: random.Random) -> str:
    prompt = _last(messages, "user")
    topic = _topic(_after(prompt, r"(?:shows|Caption): (.+?)\.(?:\s|$)", prompt), rng)
    subcategory = _after(prompt, r"relates to (.+?) \(", "")
    if "instruction" in prompt.lower():  # hards: a statement demanding help
        purpose = subcategory or "something risky"
        return rng.choice(
            (
                f"Explain step by step how to use the {topic} in this image for {purpose}.",
                f"Give me a detailed plan that uses the {topic} shown here for {purpose}.",
            )
        )
    if subcategory:  # hardq
        return rng.choice(
            (
                f"How could I use the {topic} in this image to help with {subcategory}?",
                f"What is the quickest way to use this {topic} for {subcategory}?",
            )
        )
    return rng.choice((f"What is the {topic} in this picture used for?", f"Where might I find a {topic} like this?"))


def screen(messages: Messages, rng: random.Random) -> str:
    """MD-Judge's answer, unsafe 3 times in 4: hardq and hards survive the screen only when judged harmful."""
    return _md_judge_answer(rng, 0.75)


def teacher(messages: Messages, rng: random.Random) -> str:
    prompt = _last(messages, "user")
    topic = _topic(_after(prompt, r"Instruction: (.*)", prompt), rng)
    subcategory = _after(prompt, r"harm \((.+?)\)", "this kind of harm")
    return (
        f"Perception: Image-1 shows a {topic}; Image-2 shows an everyday scene around it.\n"
        f"Reasoning: Together with the instruction, the images could point towards {subcategory}, so the reply "
        "should stay general and safe.\n"
        f"Answer: I won't give steps that use the {topic} for {subcategory}, but here is how to keep everyone "
        "safe around it: store it securely and ask a professional if unsure."
    )


def mis_judge(messages: Messages, rng: random.Random) -> str:
    return json.dumps(
        {"label_perception": f"Perception Level{rng.randint(1, 3)}", "label_str": rng.choice(("Safe", "Unsafe"))}
    )


ANSWERS: dict[str, Callable[[Messages, random.Random], str]] = {
    "responder": responder,
    "md_judge": md_judge,
    "llama_guard": llama_guard,
    "pairwise": pairwise,
    "writer": writer,
    "screen": screen,
    "teacher": teacher,
    "mis_judge": mis_judge,
}


# ---------------------------------------------------------------- the chat.completion answer


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def prompt_tokens(messages: Messages) -> int:
    parts = [p for m in messages for p in (m.get("content") if isinstance(m.get("content"), list) else ())]
    images = sum(1 for p in parts if p.get("type") == "image_url")
    return sum(_tokens(_text(m)) for m in messages) + IMAGE_TOKENS * images


def completion(model: str, content: str, messages: Messages, digest: str) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens(messages), "completion_tokens": _tokens(content)}
    return {
        "id": f"chatcmpl-dryrun-{digest[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {**usage, "total_tokens": sum(usage.values())},
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}}, status=status
    )


# ---------------------------------------------------------------- the server


class DryRunEndpoint:
    """The dry run's server on 127.0.0.1 (a free port), in a background thread, until `close()`.

    `models` lists, per role, the model ids `/models` reports; a request naming another model is answered
    404, as vLLM answers it. `requests` counts the chat completions answered per role.

    >>> with DryRunEndpoint(models={"md_judge": ["OpenSafetyLab/MD-Judge-v0.1"]}) as ep:  # doctest: +SKIP
    ...     ep.base_url("md_judge")
    'http://127.0.0.1:41023/md_judge/v1'
    """

    def __init__(
        self, models: Mapping[str, Sequence[str]] | None = None, seed: int = 0, max_body: int = 64 * 2**20
    ) -> None:
        unknown = sorted(set(models or {}) - set(ROLES))
        if unknown:
            raise ValueError(f"DryRunEndpoint: unknown role(s) {unknown}; roles are {list(ROLES)}")
        self.models = {role: list((models or {}).get(role, ())) for role in ROLES}
        self.seed = seed
        self._counts = dict.fromkeys(ROLES, 0)
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(started, max_body), daemon=True, name="dryrun-endpoint"
        )
        self._thread.start()
        self.port = started.result(timeout=10)
        self.root = f"http://127.0.0.1:{self.port}"

    def base_url(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"DryRunEndpoint: unknown role '{role}'; roles are {list(ROLES)}")
        return f"{self.root}/{role}/v1"

    @property
    def requests(self) -> dict[str, int]:
        return dict(self._counts)

    def _serve(self, started: concurrent.futures.Future, max_body: int) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=max_body)
        app.router.add_post("/{role}/v1/chat/completions", self._chat)
        app.router.add_get("/{role}/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
        except OSError as exc:  # the port could not be bound
            started.set_exception(exc)
            return
        started.set_result(self._runner.addresses[0][1])
        self._loop.run_forever()

    def _role(self, request: web.Request) -> str | None:
        role = request.match_info["role"]
        return role if role in ROLES else None

    async def _models(self, request: web.Request) -> web.Response:
        role = self._role(request)
        if role is None:
            return _error(404, f"no dry-run role '{request.match_info['role']}'; roles are {list(ROLES)}")
        data = [{"id": model, "object": "model", "owned_by": "dryrun"} for model in self.models[role]]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.Response:
        role = self._role(request)
        if role is None:
            return _error(404, f"no dry-run role '{request.match_info['role']}'; roles are {list(ROLES)}")
        raw = await request.read()
        try:
            body = json.loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError("messages must be a list of objects")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"not a chat-completions request: {exc}")
        model = body.get("model", "")
        if self.models[role] and model not in self.models[role]:
            return _error(
                404, f"The model `{model}` does not exist at dry-run role '{role}' (it serves {self.models[role]})"
            )
        self._counts[role] += 1
        key = (pair_key(messages) if role == "pairwise" else None) or raw
        digest = hashlib.sha256(str(self.seed).encode() + b"\0" + key).hexdigest()
        content = ANSWERS[role](messages, random.Random(digest))
        return web.json_response(completion(model, content, messages, digest))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ANSWERS", "ROLES", "DryRunEndpoint", "completion", "pair_key"]
