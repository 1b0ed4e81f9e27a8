"""preflight: what a configuration needs that this machine lacks, found before any work starts.

`kedro run --env paper --pipeline preflight` checks, without loading a model or sending a prompt:
- every model a backend names (responders, writers, teachers, guard and chat judges, the policy, CLIP):
  a local directory with a config and safetensors weights, or a hub id already in the local cache (this
  project runs offline, so an uncached hub id is missing);
- every OpenAI-compatible endpoint: `GET <base_url>/models` answers, and lists the model when it says;
- every API key a backend names: present in conf/local/credentials.yml or SPAVL_KEY_* (never shown);
- the accelerator: CUDA GPUs, bf16, and whether `align.launch`'s accelerate config fits them (and
  DeepSpeed is installed when it asks for it);
- memory: GPU memory per process, host RAM and disk for each method the run trains, estimated from the
  policy's config.json and the recipe (`memory.py`), against what this machine has;
- data the configuration reads: the official SPA-VL release when `align.train_source` is official, and
  the prompt template file of every guard judge that names one (MD-Judge's, copied from its model card).

It writes `preflight_report` (markdown: one row per check with what to do), `preflight_checks` and
`preflight_estimate` (JSON: per method, the memory estimate's parts and whether it fits), then
`preflight_verdict` fails the run when anything is missing, so scripts can gate on it. The same checks gate
every run that loads a real model, before its first node (`gate`, called by the project's hooks).
`preflight.assume` sizes the memory checks for hardware this machine does not have; `preflight.check_endpoints:
false` lists the endpoints without calling them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel

from spavl_kedro.config import validate_parameters
from spavl_kedro.datasets.credentials import env_name
from spavl_kedro.models.specs import BackendSpec
from spavl_kedro.pipelines.preflight import memory

CHECK_COLUMNS = ["check", "where", "target", "status", "detail"]
ENDPOINT_TIMEOUT_S = 5.0


@dataclass
class Check:
    check: str  # model | endpoint | credential | accelerator | memory | data
    where: str  # the configuration key that asks for it
    target: str
    status: str  # ok | missing | unreachable | warning
    detail: str


@dataclass(frozen=True)
class Hardware:
    """What the memory checks compare against: this machine's, or `preflight.assume`'s."""

    gpus: int
    gpu_bytes: int  # per GPU; 0 without one
    host_bytes: int | None
    disk_bytes: int | None
    temp_bytes: int | None
    assumed: bool


def run_preflight(
    parameters: dict[str, Any], credentials: Mapping[str, Any]
) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """Every check as a table, as a readable report, and the memory estimate per method as JSON."""
    cfg = validate_parameters(parameters)
    hardware = _hardware(cfg)
    checks: list[Check] = []
    for where, spec in backends(cfg):
        checks += _backend_checks(where, spec, credentials, cfg["preflight"].check_endpoints)
    for where, policy in _policies(cfg["align"]):
        if policy.kind == "transformers":
            checks.append(_model_check(f"{where}.model", policy.model, policy.trust_remote_code))
    clip = cfg["generate"].images.clip_model
    if clip:
        checks.append(_model_check("generate.images.clip_model", clip))
    checks += _accelerator_checks(cfg["align"], hardware)
    memory_checks, estimate = _memory_checks(cfg["align"], hardware)
    checks += memory_checks
    checks += _template_checks(cfg["judge"])
    if cfg["align"].train_source == "official":
        path = Path(cfg["align"].official_dir)
        checks.append(
            Check(
                "data",
                "align.official_dir",
                str(path),
                "ok" if path.exists() else "missing",
                "found" if path.exists() else "download the SPA-VL release (parquet or train.zip) there",
            )
        )
    table = pd.DataFrame([c.__dict__ for c in checks], columns=CHECK_COLUMNS)
    return table, _report(table, hardware), estimate


def loads_real_models(cfg: Mapping[str, BaseModel]) -> bool:
    """Whether a configuration loads anything but the tiny offline models: what the gate guards."""
    return (
        any(not spec.bootstrapped for _, spec in backends(cfg))
        or any(policy.kind == "transformers" for _, policy in _policies(cfg["align"]))
        or bool(cfg["generate"].images.clip_model)
    )


def _policies(align: BaseModel) -> list[tuple[str, BaseModel]]:
    """(where, spec) of every base policy: `align.policy` and each of `align.bases`."""
    return [("align.policy", align.policy), *((f"align.bases.{name}", spec) for name, spec in align.bases.items())]


def gate(
    parameters: dict[str, Any], credentials: Mapping[str, Any], blocks: set[str]
) -> tuple[pd.DataFrame, str, dict[str, Any]] | None:
    """The checks a run makes before its first node: None when `preflight.gate` is off or the configuration
    loads tiny models only; else the checks of the parameter blocks the run's pipelines read (`blocks`:
    `align`, `generate`, ...), the report and the estimate. The caller saves them and calls `preflight_verdict`."""
    cfg = validate_parameters(parameters)
    if not cfg["preflight"].gate or not loads_real_models(cfg):
        return None
    table, _, estimate = run_preflight(parameters, credentials)
    table = table[table["where"].str.split(".").str[0].str.split("[").str[0].isin(blocks)].reset_index(drop=True)
    return table, _report(table, _hardware(cfg)), estimate


def _hardware(cfg: Mapping[str, BaseModel]) -> Hardware:
    import torch

    assume = cfg["preflight"].assume
    temp_root = Path(tempfile.gettempdir())
    disk_root = next(
        p
        for p in [Path(cfg["align"].checkpoint_dir).absolute(), *Path(cfg["align"].checkpoint_dir).absolute().parents]
        if p.exists()
    )
    if assume is not None:
        gib = lambda v: None if v is None else int(v * memory.GIB)  # noqa: E731
        return Hardware(
            assume.gpus,
            gib(assume.gpu_memory_gib),
            gib(assume.host_ram_gib) or _host_memory(),
            gib(assume.disk_gib) or shutil.disk_usage(disk_root).free,
            gib(assume.temp_gib) or shutil.disk_usage(temp_root).free,
            True,
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_bytes = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
    return Hardware(
        gpus, gpu_bytes, _host_memory(), shutil.disk_usage(disk_root).free, shutil.disk_usage(temp_root).free, False
    )


def _template_checks(judge: BaseModel) -> list[Check]:
    """Every prompt template file a guard judge names (MD-Judge's lives in its model card: copied by hand)."""
    checks = []
    for n, spec in enumerate(judge.judges):
        if spec.prompt_file is not None:
            found = Path(spec.prompt_file).is_file()
            checks.append(
                Check(
                    "data",
                    f"judge.judges[{n}].prompt_file",
                    spec.prompt_file,
                    "ok" if found else "missing",
                    "found"
                    if found
                    else f"copy the {spec.format} prompt template from the model card "
                    "there, with {question} and {response} where the request and the answer go",
                )
            )
    return checks


def preflight_verdict(checks: pd.DataFrame) -> None:
    """Fail the run, after the report is written, when anything is missing or unreachable."""
    bad = checks[checks["status"].isin(["missing", "unreachable"])]
    if len(bad):
        raise RuntimeError(
            f"preflight: {len(bad)} of {len(checks)} checks failed (see data/08_reporting/"
            f"preflight_report.md):\n  "
            + "\n  ".join(f"{r.where}: {r.target}: {r.status} ({r.detail})" for r in bad.itertuples())
        )


def backends(cfg: Mapping[str, BaseModel]) -> Iterator[tuple[str, BackendSpec]]:
    """Every BackendSpec anywhere in the validated configuration, with its dotted key."""

    def walk(value: Any, where: str) -> Iterator[tuple[str, BackendSpec]]:
        if isinstance(value, BackendSpec):
            yield where, value
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                yield from walk(getattr(value, name), f"{where}.{name}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(item, f"{where}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{where}.{key}")

    for block, model in cfg.items():
        yield from walk(model, block)


def _backend_checks(where: str, spec: BackendSpec, credentials: Mapping[str, Any], call: bool = True) -> list[Check]:
    if spec.bootstrapped:
        return []  # built offline by the generate stage
    if not spec.served:
        return [_model_check(f"{where}.model", spec.model, spec.trust_remote_code)]
    checks = []
    key = None
    if spec.api_key is not None:
        entry = credentials.get(spec.api_key)
        key = entry.get("api_key") if isinstance(entry, Mapping) else entry
        checks.append(
            Check(
                "credential",
                f"{where}.api_key",
                spec.api_key,
                "ok" if key else "missing",
                "present (value not shown)"
                if key
                else f"add it under the api_credentials entry of conf/local/credentials.yml or set "
                f"{env_name(spec.api_key)}",
            )
        )
    for url in spec.base_urls:
        checks.append(
            _endpoint_check(f"{where}.base_urls", url, spec.model, key)
            if call
            else Check(
                "endpoint", f"{where}.base_urls", url, "warning", "not called: preflight.check_endpoints is false"
            )
        )
    return checks


def _model_check(where: str, model: str, trust_remote_code: bool = False) -> Check:
    if trust_remote_code:
        return Check("model", where, model, "warning", "trust_remote_code is on: the model's own Python runs")
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            return Check("model", where, model, "missing", "a directory without config.json")
        if not any(path.glob("*.safetensors")):
            return Check("model", where, model, "missing", "no *.safetensors weights (pickle weights are not loaded)")
        return Check("model", where, model, "ok", "local directory")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:  # not a hub id (org/name) either: a directory that is not there
        return Check("model", where, model, "missing", "no such directory")
    if isinstance(cached, str):
        weights = any(Path(cached).parent.glob("*.safetensors"))
        return Check(
            "model",
            where,
            model,
            "ok" if weights else "missing",
            "in the local hub cache" if weights else "cached config but no safetensors weights",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return Check(
        "model",
        where,
        model,
        "missing",
        f"not a directory and not in the hub cache ({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')})"
        + (
            "; HF_HUB_OFFLINE is set, so it will not be downloaded"
            if offline
            else f"; `huggingface-cli download {model}` first"
        ),
    )


def _endpoint_check(where: str, base_url: str, model: str | None, key: str | None) -> Check:
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=ENDPOINT_TIMEOUT_S) as response:
            # Gemini names its models "models/<name>" and prefixes a requested "<name>" itself
            # (ai.google.dev/api/compatibility), so a listed "models/<name>" serves "<name>".
            listed = [
                str(m.get("id")).removeprefix("models/") for m in json.loads(response.read() or b"{}").get("data", [])
            ]
    except urllib.error.HTTPError as exc:
        status = "missing" if exc.code in (401, 403) else "unreachable"
        return Check(
            "endpoint",
            where,
            base_url,
            status,
            f"HTTP {exc.code} from /models" + (" (check the API key)" if exc.code in (401, 403) else ""),
        )
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("endpoint", where, base_url, "unreachable", f"no answer from /models: {reason}")
    if model and listed and model not in listed:
        return Check("endpoint", where, base_url, "missing", f"serves {listed[:5]}, not '{model}'")
    if model in listed:
        return Check("endpoint", where, base_url, "ok", f"answers; serves '{model}'")
    return Check(
        "endpoint",
        where,
        base_url,
        "ok",
        "answers; its /models lists no models, so the model name is only checked by the first request",
    )


def _accelerator_checks(align: BaseModel, hardware: Hardware) -> list[Check]:
    import torch

    gpus = hardware.gpus
    if hardware.assumed:
        names = f"{gpus} GPU(s) of {memory.gib(hardware.gpu_bytes)}, assumed (preflight.assume)"
    else:
        names = f"{gpus} GPU(s): {', '.join(torch.cuda.get_device_name(i) for i in range(gpus))}" + (
            ", bf16" if gpus and torch.cuda.is_bf16_supported() else ""
        )
    checks = [
        Check(
            "accelerator",
            "align.<method>.use_cpu",
            "CUDA",
            "ok" if gpus else "warning",
            names if gpus else "no GPU: every method trains on the CPU in fp32 (days at 7B scale)",
        )
    ]
    for config in sorted({c for c in map(align.launch.config_for, align.methods) if c is not None}):
        where = "align.launch"
        launch = yaml.safe_load(Path(config).read_text()) or {}
        wanted = align.launch.num_processes or int(launch.get("num_processes", 1))
        on_cpu = launch.get("use_cpu") or "cpu" in Path(config).stem
        if not on_cpu and gpus < wanted:
            checks.append(
                Check(
                    "accelerator", where, config, "missing", f"asks for {wanted} GPU process(es); {gpus} GPU(s) visible"
                )
            )
        else:
            checks.append(Check("accelerator", where, config, "ok", f"{wanted} process(es)"))
        if (
            launch.get("distributed_type") == "DEEPSPEED"
            and importlib.util.find_spec("deepspeed") is None
            and not hardware.assumed
        ):
            checks.append(
                Check("accelerator", where, "deepspeed", "missing", f"{config} uses DeepSpeed: pip install deepspeed")
            )
    return checks


def _memory_checks(align: BaseModel, hardware: Hardware) -> tuple[list[Check], dict[str, Any]]:
    """GPU memory per process, host RAM, disk and temp space each method of this run needs
    (`memory.estimate`), against `hardware`; and the estimate as JSON, per method: its parts in GiB and
    whether it fits, sized on the base each method trains from (`align.policy_of`). A tiny policy is skipped; a
    policy whose config.json is not here cannot be sized."""
    from spavl_kedro.training.methods import get_method

    recipes = {method: align.settings(method, output_dir="unused") for method in align.methods}
    bases = {method: align.policy_of(method)[1] for method in recipes}
    sized = {m: spec.model for m, spec in bases.items() if spec.kind == "transformers"}  # method -> model
    if not sized:
        return [], {"policy": align.policy.kind, "methods": {}}
    checks, shapes, errors = [], {}, {}
    for model in dict.fromkeys(sized.values()):
        try:
            shapes[model] = memory.model_shape(model, {m: recipes[m] for m, its in sized.items() if its == model})
        except (OSError, ValueError) as exc:
            where = ", ".join(f"align.{m}" for m, its in sized.items() if its == model)
            checks.append(
                Check(
                    "memory",
                    where,
                    model,
                    "warning",
                    f"cannot size the training without the model's config.json here ({type(exc).__name__})",
                )
            )
            errors[model] = type(exc).__name__
    records = _records_bytes(align)
    gib = lambda v: round(v / memory.GIB, 2)  # noqa: E731
    main = shapes.get(align.policy.model)
    report = {
        "policy": align.policy.model or align.policy.kind,
        "parameters": main.total if main else None,
        "records_gib": gib(records),
        "hardware": {
            "gpus": hardware.gpus,
            "gpu_memory_gib": gib(hardware.gpu_bytes),
            "host_ram_gib": hardware.host_bytes and gib(hardware.host_bytes),
            "disk_gib": hardware.disk_bytes and gib(hardware.disk_bytes),
            "temp_gib": hardware.temp_bytes and gib(hardware.temp_bytes),
            "assumed": hardware.assumed,
        },
        "methods": {},
        **({"errors": errors} if errors else {}),
    }
    recipes = {m: settings for m, settings in recipes.items() if sized.get(m) in shapes}
    for method, settings in recipes.items():
        processes, zero = _launch_shape(align, method)
        images = 2 if get_method(method).records == "targets" and align.sft_data == "cot" else 1
        scored = get_method(method).rewarded and align.rl.model_weight > 0
        shape = shapes[sized[method]]
        need = memory.estimate(
            method, settings, shape, processes, zero, images, reward_model=scored, records_bytes=records
        )
        where = f"align.{method}"
        parts = ", ".join(f"{k} {memory.gib(v)}" for k, v in need.parts.items() if v)
        head = f"{memory.gib(need.gpu_bytes)} per GPU ({parts}) on {processes} process(es), ZeRO-{zero}"
        gpu_fits = bool(hardware.gpus) and need.gpu_bytes <= 0.9 * hardware.gpu_bytes
        if not hardware.gpus:
            checks.append(Check("memory", where, "GPU", "warning", f"needs {head}; no GPU here to compare"))
        else:
            checks.append(
                Check(
                    "memory",
                    where,
                    "GPU",
                    "ok" if gpu_fits else "missing",
                    f"needs {head}; has {memory.gib(hardware.gpu_bytes)}"
                    + (
                        ""
                        if gpu_fits
                        else "; try lora: true, activation_checkpointing: true, a smaller batch_size or a "
                        "DeepSpeed ZeRO config"
                    ),
                )
            )
        fits = {"gpu": gpu_fits}
        for target, needed, has in (
            ("host RAM", need.host_bytes, hardware.host_bytes),
            ("disk", need.disk_bytes, hardware.disk_bytes),
            ("temp space", need.temp_bytes, hardware.temp_bytes),
        ):
            ok = has is None or needed <= has
            fits[target.lower().replace(" ", "_")] = ok
            checks.append(
                Check(
                    "memory",
                    where,
                    target,
                    "ok" if ok else "missing",
                    f"needs {memory.gib(needed)}"
                    + (f"; has {memory.gib(has)}" if has is not None else "")
                    + (f" free in {tempfile.gettempdir()}" if target == "temp space" else ""),
                )
            )
        report["methods"][method] = {
            "gpu_gib": gib(need.gpu_bytes),
            "parts_gib": {k: gib(v) for k, v in need.parts.items()},
            "host_ram_gib": gib(need.host_bytes),
            "disk_gib": gib(need.disk_bytes),
            "temp_gib": gib(need.temp_bytes),
            "policy": sized[method],
            "parameters": shape.total,
            "processes": processes,
            "zero_stage": zero,
            "launch": align.launch.config_for(method),
            "lora": bool(getattr(settings, "lora", False)),
            "weights_dtype": settings.weights_dtype,
            "activation_checkpointing": settings.activation_checkpointing,
            "fits_by": fits,
            "fits": all(fits.values()),
        }
    return checks, report


def _records_bytes(align: BaseModel) -> int:
    """Size on disk of the pairs the methods train on (images included), when they are there yet: the
    official release, or this project's export; 0 before the split has run."""
    root = Path(align.official_dir if align.train_source == "official" else "data/09_export/spa_vl")
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "test" not in p.parts)


def _launch_shape(align: BaseModel, method: str) -> tuple[int, int]:
    """(processes, ZeRO stage) `method` launches with (`align.launch`): (1, 0) in process, stage 0 for DDP."""
    config = align.launch.config_for(method)
    if config is None:
        return 1, 0
    launch = yaml.safe_load(Path(config).read_text()) or {}
    processes = align.launch.num_processes or int(launch.get("num_processes", 1))
    deepspeed = launch.get("deepspeed_config") or {} if launch.get("distributed_type") == "DEEPSPEED" else {}
    zero = int(deepspeed.get("zero_stage", 0))
    return processes, zero


def _host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        return None


def _report(table: pd.DataFrame, hardware: Hardware | None = None) -> str:
    bad = table[table["status"].isin(["missing", "unreachable"])]
    lines = [
        "# Preflight",
        "",
        f"{len(table)} checks: {int((table['status'] == 'ok').sum())} ok, {len(bad)} missing or unreachable, "
        f"{int((table['status'] == 'warning').sum())} warnings. Nothing was loaded, generated or trained.",
        "",
    ]
    if hardware is not None and hardware.assumed:
        lines += [
            f"Memory sized for assumed hardware (preflight.assume): {hardware.gpus} GPU(s) of "
            f"{memory.gib(hardware.gpu_bytes)}.",
            "",
        ]
    for title, rows in (
        ("Missing or unreachable", bad),
        ("Warnings", table[table["status"] == "warning"]),
        ("OK", table[table["status"] == "ok"]),
    ):
        if rows.empty:
            continue
        lines += [f"## {title}", "", "| check | configuration key | target | detail |", "|---|---|---|---|"]
        lines += [f"| {r.check} | `{r.where}` | {r.target} | {r.detail} |" for r in rows.itertuples()]
        lines.append("")
    return "\n".join(lines)
