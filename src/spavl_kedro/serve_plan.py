"""The vLLM servers for a profile's responders on one GPU node, as a script that starts them.

    python -m spavl_kedro.serve_plan --env paper > serve.sh
    bash serve.sh                   # starts every server, waits until each answers, keeps them running
    kedro run --env paper           # in another shell: the generate stage asks all servers at once

vLLM serves one model per process, so every open-weights responder gets a `vllm serve` of its own, pinned
to its GPU(s) with CUDA_VISIBLE_DEVICES and listening on the port its base URL names; the generate stage
asks the servers at the same time (one lane each, `pipelines/sharding.py`). Which responders get one:
- `kind: openai` at http://127.0.0.1 or localhost: a server here, on the URL's port (one per URL listed);
- `kind: transformers`: a server here on the next free port, and the script lists the `kind: openai` spec
  to put in its place (an in-process model would need GPUs that the servers hold);
- `kind: openai` at https:// or at another host: a hosted API or a server elsewhere, left as it is;
- `kind: tiny`: built in-process, nothing to serve.

How each server is sized (bf16 weights, 2 bytes per parameter; the parameter count comes from the
checkpoint's safetensors headers when it is in a local directory or the Hugging Face cache, else from the
size in its name, else from `--size NAME=BILLIONS`):
- tensor parallel: the smallest power of two that keeps the weights within half of each GPU, the other half
  left to the KV cache: 1 for 7-13B on 80 GB (13B is 27 GB of weights), 2 for 13B on 40 GB;
- more servers than GPUs: two servers whose weights fit in a quarter of a GPU (7-8B on 80 GB) share one,
  each with `--gpu-memory-utilization 0.45` (vLLM's limit is per instance), larger ones keep theirs. Pairs
  are dealt largest first to the least-loaded GPU, so the summed sizes (decode time grows with them) stay
  even. A model of unknown size keeps a GPU to itself;
- `--max-model-len`: two images of up to 3,700 tokens (LLaVA-OneVision at 512 px, docs/compute_plan.md)
  plus 280 for the question plus the responder's `max_new_tokens`, within the model's own context when its
  config.json is readable;
- `--limit-mm-per-prompt '{"image": 2}'`: MIS prompts carry two images.
Flags are vLLM's own (docs.vllm.ai, "vllm serve" and its engine arguments).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from spavl_kedro.models.specs import BackendSpec

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
FIRST_PORT = 8000  # vLLM's default port
PROMPT_TOKENS = 2 * 3_700 + 280  # two of the longest image encodings here plus the question
SHARED_UTILIZATION = 0.45  # each of two servers on one GPU; vLLM's default for a GPU of its own is 0.9
BYTES_PER_PARAMETER = 2  # bf16


@dataclass(frozen=True)
class Facts:
    """What the checkpoint itself says, when it is on this machine: parameters, context, remote code."""

    params_b: float | None = None
    context: int | None = None  # max_position_embeddings of its language model
    remote_code: bool = False  # its config.json maps classes to its own Python (auto_map)
    mistral_format: bool = False  # params.json and no config.json (Pixtral-12B-2409): Mistral's own layout


@dataclass
class Server:
    responder: str
    model: str
    port: int
    params_b: float | None
    size_from: str  # where params_b came from
    max_model_len: int
    context: int | None = None  # the model's own, when its config.json was read
    tensor_parallel: int = 1
    gpus: tuple[int, ...] = ()
    shared_with: str | None = None  # the other server on its GPU
    remote_code: bool = False
    trust_remote_code: bool = False  # the spec asks for it (kind transformers)
    mistral_format: bool = False


@dataclass
class Plan:
    servers: list[Server]
    elsewhere: dict[str, str]  # responder -> why it needs no server here
    replace: dict[str, dict[str, Any]] = field(default_factory=dict)  # responder -> the spec to configure
    gpus: int = 8
    gpu_memory_gb: float = 80


def plan_servers(
    responders: Sequence[BackendSpec],
    generation: dict[str, Any],
    *,
    gpus: int = 8,
    gpu_memory_gb: float = 80,
    sizes: dict[str, float] | None = None,
    facts: Callable[[str], Facts] | None = None,
) -> Plan:
    """The servers the responders need on a node of `gpus` GPUs of `gpu_memory_gb` each; raises, saying
    what to change, when they do not fit. `sizes` (responder name -> billions) overrides any other source."""
    facts, sizes = facts or model_facts, sizes or {}
    unknown = set(sizes) - {spec.name for spec in responders}
    if unknown:
        raise ValueError(f"--size names no responder: {sorted(unknown)}")
    servers: list[Server] = []
    elsewhere: dict[str, str] = {}
    replace: dict[str, dict[str, Any]] = {}
    ports = {}  # port -> server there
    wanted: list[tuple[BackendSpec, int | None]] = []  # (spec, port or None for "next free")
    for spec in responders:
        if spec.bootstrapped:
            elsewhere[spec.name] = "tiny: built in the Kedro process"
        elif not spec.served:
            wanted.append((spec, None))
        else:
            local = [url for url in spec.base_urls if (urlsplit(url).hostname or "") in LOCAL_HOSTS]
            if not local:
                where = ", ".join(spec.base_urls)
                kind = "an API" if all(url.startswith("https://") for url in spec.base_urls) else "served elsewhere"
                elsewhere[spec.name] = f"{kind}: {where}"
            wanted += [(spec, urlsplit(url).port or 80) for url in local]
    next_port = max([port for _, port in wanted if port] + [FIRST_PORT - 1]) + 1
    for spec, port in wanted:
        if port is None:
            port, next_port = next_port, next_port + 1
            replace[spec.name] = {
                "name": spec.name,
                "kind": "openai",
                "model": spec.model,
                "base_urls": [f"http://127.0.0.1:{port}/v1"],
                "concurrency": 64,
                "timeout_s": 300,
                **({"generation": spec.generation} if spec.generation else {}),
            }
        if port in ports:
            if ports[port].model != spec.model:
                raise ValueError(
                    f"responders '{ports[port].responder}' and '{spec.name}' both name port {port} "
                    f"for different models; vLLM serves one model per process: give each its own port"
                )
            continue  # the same model under two names (other generation settings): one server for both
        known = facts(spec.model)
        if spec.name in sizes:
            params_b, size_from = sizes[spec.name], "--size"
        elif known.params_b is not None:
            params_b, size_from = known.params_b, "safetensors headers"
        else:
            params_b = size_in_name(spec.model)
            size_from = "its name" if params_b is not None else "unknown"
        new_tokens = int({**generation, **spec.generation}.get("max_new_tokens", 512))
        length = PROMPT_TOKENS + new_tokens
        server = Server(
            spec.name,
            spec.model,
            port,
            params_b,
            size_from,
            min(length, known.context) if known.context else length,
            known.context,
            remote_code=known.remote_code,
            trust_remote_code=spec.trust_remote_code,
            mistral_format=known.mistral_format,
        )
        ports[port] = server
        servers.append(server)
    _place(servers, gpus, gpu_memory_gb)
    return Plan(servers, elsewhere, replace, gpus, gpu_memory_gb)


def _place(servers: list[Server], gpus: int, gpu_memory_gb: float) -> None:
    """Tensor parallel sizes and GPUs; see the module docstring for the rules."""

    def weights_gb(server: Server) -> float:
        return (server.params_b or 0) * BYTES_PER_PARAMETER

    alone, sharable = [], []
    for server in servers:
        while weights_gb(server) / server.tensor_parallel > gpu_memory_gb / 2:
            server.tensor_parallel *= 2
        fits_quarter = server.params_b is not None and weights_gb(server) <= gpu_memory_gb / 4
        (sharable if fits_quarter else alone).append(server)
    free = list(range(gpus))
    for server in alone:
        if server.tensor_parallel > len(free):
            needed = sum(s.tensor_parallel for s in alone) + -(-len(sharable) // 2)
            raise ValueError(
                f"the {len(servers)} servers need at least {needed} GPUs of {gpu_memory_gb:g} GB; this "
                f"node has {gpus}: serve some responders elsewhere (their base_urls at another host) "
                f"or give the GPU count and memory you have (--gpus, --gpu-memory-gb)"
            )
        server.gpus, free = tuple(free[: server.tensor_parallel]), free[server.tensor_parallel :]
    if len(sharable) > 2 * len(free):
        raise ValueError(
            f"{len(sharable)} servers of up to {gpu_memory_gb / 4 / BYTES_PER_PARAMETER:g}B parameters "
            f"are left for {len(free)} GPUs, at most two per GPU: serve some elsewhere"
        )
    load = {gpu: [] for gpu in free}
    by_size = sorted(sharable, key=lambda s: -s.params_b)  # stable: equal sizes keep the configuration's order
    for gpu, server in zip(free, by_size):  # one each while there are GPUs, then pair with the least loaded
        load[gpu].append(server)
    for server in by_size[len(free) :]:
        gpu = min((g for g in free if len(load[g]) < 2), key=lambda g: (sum(s.params_b for s in load[g]), g))
        load[gpu].append(server)
    for gpu, on_it in load.items():
        for server in on_it:
            server.gpus = (gpu,)
            server.shared_with = next((s.responder for s in on_it if s is not server), None)


def script(plan: Plan, *, env: str, host: str = "127.0.0.1") -> str:
    """A bash script that starts the plan's servers, waits until each answers, then keeps them running (the
    first to stop ends it, and its EXIT trap stops the others); the configuration it needs as comments."""
    used = sorted({gpu for s in plan.servers for gpu in s.gpus})
    shared = sorted({s.gpus[0] for s in plan.servers if s.shared_with})
    lines = [
        "#!/usr/bin/env bash",
        f"# vLLM servers for the responders of conf/{env} (python -m spavl_kedro.serve_plan --env {env}):",
        f"# {len(plan.servers)} servers on {len(used)} of {plan.gpus} GPUs of {plan.gpu_memory_gb:g} GB"
        + (f"; GPUs {', '.join(map(str, shared))} hold two servers each." if shared else "."),
        f"# Start it, wait for 'all servers answer', then run: kedro run --env {env}",
        "# Write it where the weights are in the Hugging Face cache: sizes, contexts and formats come from them.",
        "set -euo pipefail",
        'logs="${VLLM_LOG_DIR:-logs/vllm}"; mkdir -p "$logs"',
        "declare -A pid",
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # stop every server when this script ends",
        "ready() {  # until the server on port $1 lists its model (what preflight checks too)",
        f'  until curl -sf "http://{host}:$1/v1/models" > /dev/null; do',
        '    kill -0 "${pid[$1]}" 2>/dev/null || { echo "the server on port $1 stopped: see $logs" >&2; exit 1; }',
        "    sleep 5",
        "  done",
        "}",
    ]
    first_on = {}
    for server in plan.servers:
        note = f"{server.params_b:.3g}B parameters ({server.size_from})" if server.params_b else "size unknown"
        where = f"GPU {server.gpus[0]}" if len(server.gpus) == 1 else f"GPUs {','.join(map(str, server.gpus))}"
        lines.append(
            f"# {server.responder}: {note}, tensor parallel {server.tensor_parallel}, {where}"
            + (f", shared with {server.shared_with}" if server.shared_with else "")
        )
        if server.size_from == "unknown":
            lines.append("#   (not in the cache and no size in its name: a GPU to itself; --size corrects it)")
        if server.context is None:
            lines.append(
                f"#   (context not read: if vLLM refuses --max-model-len {server.max_model_len}, give the model's own)"
            )
        if server.remote_code and not server.trust_remote_code:
            lines.append(
                f"#   its config.json names its own Python (auto_map): vLLM needs --trust-remote-code; "
                f"add it if you trust {server.model}"
            )
        command = [
            "vllm",
            "serve",
            server.model,
            "--host",
            host,
            "--port",
            str(server.port),
            "--dtype",
            "bfloat16",
            "--tensor-parallel-size",
            str(server.tensor_parallel),
            "--max-model-len",
            str(server.max_model_len),
            "--limit-mm-per-prompt",
            json.dumps({"image": 2}),
        ]
        if server.shared_with:
            command += ["--gpu-memory-utilization", str(SHARED_UTILIZATION)]
        if server.trust_remote_code:
            command.append("--trust-remote-code")
        if server.mistral_format:  # as its model card serves it: Mistral's tokenizer, config and weight files
            command += ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
        run = f"CUDA_VISIBLE_DEVICES={','.join(map(str, server.gpus))} exec {shlex.join(command)}"
        before = first_on.setdefault(server.gpus, server.port)
        # The second server on a GPU starts once the first has taken its memory, so their start-up memory
        # profiles do not overlap.
        wait = f"ready {before} && " if before != server.port else ""
        lines.append(f'({wait}{run}) > "$logs/{server.responder}.log" 2>&1 &')
        lines.append(f"pid[{server.port}]=$!")
    ports = " ".join(str(s.port) for s in plan.servers)
    lines += (
        [
            f"for port in {ports}; do ready $port; done",
            f'echo "all {len(plan.servers)} servers answer; now: kedro run --env {env}" >&2',
            "wait -n  # runs until a server stops",
            'echo "a server stopped (logs in $logs): stopping the others" >&2',
            "exit 1",
            "",
        ]
        if plan.servers
        else [f'echo "conf/{env} has no responder to serve on this node" >&2', ""]
    )
    lines += [f"# {name}: no server here ({why})" for name, why in plan.elsewhere.items()]
    if plan.replace:
        lines.append(
            f"# conf/{env} runs these in the Kedro process; to ask the servers above instead, replace "
            "their entries in generate.responders with:"
        )
        lines += [f"#   - {_flow(spec)}" for spec in plan.replace.values()]
    elif plan.servers:
        lines.append(f"# conf/{env}'s generate.responders already name these servers' base_urls.")
    return "\n".join(lines) + "\n"


def _flow(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10_000).strip()


def size_in_name(model: str) -> float | None:
    """Billions of parameters as a model id spells them ("llava-1.5-13b-hf" -> 13.0), or None.

    >>> size_in_name("llava-hf/llava-1.5-13b-hf"), size_in_name("OpenGVLab/InternVL2_5-78B"), size_in_name("a/SmolVLM")
    (13.0, 78.0, None)
    """
    found = re.search(r"(?:^|[-_/])(\d+(?:\.\d+)?)[bB](?=$|[-_])", model)
    return float(found.group(1)) if found else None


def model_facts(model: str) -> Facts:
    """Facts of a model directory, or of a hub id whose files are in the Hugging Face cache (no download)."""
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(model, name) for name in ("config.json", "params.json")]
        cached = [path for path in found if isinstance(path, str)]  # not cached: None, or a "missing" marker
        if not cached:
            return Facts()
        folder = Path(cached[0]).parent
    has_config = (folder / "config.json").exists()
    config = json.loads((folder / "config.json").read_text()) if has_config else {}
    text = config.get("text_config") or config.get("llm_config") or {}
    context = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return Facts(
        _parameters(folder),
        int(context) if context else None,
        "auto_map" in config,
        mistral_format=not has_config and (folder / "params.json").exists(),
    )


def _parameters(folder: Path) -> float | None:
    """Billions of parameters from the safetensors headers (8 bytes of length, then JSON naming each tensor's
    shape), without reading a weight; None unless every shard the index names is there."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = [path.name for path in sorted(folder.glob("*.safetensors"))]
    if not names or not all((folder / name).exists() for name in names):
        return None
    total = 0
    for name in names:
        with open(folder / name, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for key, tensor in header.items():
            if key != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="paper", help="Kedro environment whose generate.responders to serve")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs on this node (default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80, help="memory of each GPU, GB (default 80)")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=BILLIONS",
        help="a responder's parameter count, where neither its files nor its name say it",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    from spavl_kedro.config import GenerateConfig, load_parameters, typed

    try:
        sizes = {name: float(value) for name, _, value in (entry.partition("=") for entry in args.size)}
    except ValueError:
        parser.error(f"--size takes NAME=BILLIONS (e.g. smolvlm=2.25), got {args.size}")
    cfg = typed(GenerateConfig, load_parameters(args.env)["generate"])
    try:
        plan = plan_servers(
            cfg.responders, cfg.generation, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb, sizes=sizes
        )
    except ValueError as exc:
        print(f"serve_plan: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(script(plan, env=args.env, host=args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
