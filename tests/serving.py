"""A tiny random LLaVA in memory and on disk, and a real `transformers serve` of that directory.

Shared by the test modules that drive `OpenAIVLM` against a real server (import the fixtures:
`from serving import served, tiny`). Each importing module gets its own model and server (module scope).

`transformers serve` needs FastAPI, uvicorn and the `openai` package (the `dev` extra installs them); the
server fixture fails, naming them, where they are missing. Startup with the model preloaded takes ~9 s on
2 CPU cores, most of it imports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spavl_kedro.models.specs import TinyModelConfig
from spavl_kedro.models.tiny import VLM, build_model, build_processor


def build_tiny(directory: Path | None = None) -> VLM:
    """A random ~0.9M-parameter LLaVA whose tokenizer knows a refusal and a compliance; saved to `directory`
    when given, so a server can load the same weights."""
    texts = [
        "I'm sorry, but I cannot help with that request.",
        "Sure, here are the steps: first, look closely at the picture.",
    ]
    processor = build_processor(texts * 50, TinyModelConfig())
    model = build_model(processor, TinyModelConfig(), seed=0).eval()
    if directory is not None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return VLM(model=model, processor=processor)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[VLM, Path]:
    directory = tmp_path_factory.mktemp("tiny-llava")
    return build_tiny(directory), directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(directory: Path, workdir: Path, timeout_s: float = 120) -> Iterator[str]:
    """`transformers serve <directory>` on a free port until the block ends; yields its base URL (.../v1).
    The model is the directory path, preloaded, so requests must name exactly that path (or no model)."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.fail("transformers serve needs fastapi, uvicorn and openai: pip install -e .[dev]")
    port = free_port()
    cache = workdir / "hf-cache"  # must exist, or /v1/models answers 500
    cache.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DO_NOT_TRACK": "1",
    }
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(directory),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with log_path.open("w") as log:
        # Own process group: teardown stops the server and anything it spawned, and nothing else.
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_until_ready(f"{base_url}/models", server, log_path, timeout_s=timeout_s)
            yield base_url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """A real server of the `tiny` directory; yields (base_url, model name)."""
    _, directory = tiny
    with transformers_serve(directory, tmp_path_factory.mktemp("serve")) as base_url:
        yield base_url, str(directory)


def wait_until_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    # The forced model loads before uvicorn binds the port, so the first 200 means ready to generate.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"transformers serve not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


class ChatEndpoint:
    """An aiohttp app answering POST /v1/chat/completions with `handler`, on 127.0.0.1 in a background
    thread; `base_url` is its .../v1. Subclasses define `_chat(request)`."""

    def __init__(self, max_body: int = 64 * 2**20) -> None:
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready, max_body), daemon=True).start()
        assert ready.wait(10), "the test endpoint did not start"

    def _serve(self, ready, max_body: int) -> None:
        import asyncio

        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=max_body)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0).start())
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        ready.set()
        self._loop.run_forever()

    async def _chat(self, request):
        raise NotImplementedError

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
