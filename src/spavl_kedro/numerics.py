"""The same figures on every x86-64 machine: CPU kernels pinned to one instruction set before torch loads.

The embedded default trains its tiny models from scratch, so a last-bit difference in one matrix product
grows into other weights, other answers and other figures. On a CPU, which kernels run depends on the
instruction set found at start-up: PyTorch's own vectorised kernels (AVX2 or AVX512), MKL's BLAS and oneDNN's
JIT kernels each pick theirs. Measured on one machine (AMD EPYC with AVX512, 2026-12-06): a short tiny
bootstrap ended with other weights under AVX512 than under AVX2, at the same speed; 1 and 2 threads gave the
same weights. So the project asks all three libraries for their AVX2 code paths, which every x86-64 CPU
of the last decade runs:

- `ATEN_CPU_CAPABILITY=avx2`: PyTorch's kernel dispatch level (`torch.backends.cpu.get_cpu_capability()` then
  reads AVX2)
- `MKL_CBWR=AVX2`: MKL's conditional numerical reproducibility mode
- `ONEDNN_MAX_CPU_ISA=AVX2`: the widest instruction set oneDNN's JIT may use

Each is only a default: a value already in the environment wins (e.g. `ATEN_CPU_CAPABILITY=default` to let a
machine use its widest kernels). They must be set before torch is imported, which is why the package's
`__init__` calls `pin_cpu_kernels`. Other architectures (aarch64) are left alone.
"""

from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> None:
    """Set `PINNED` where the environment does not say otherwise (x86-64 only). Too late once torch is
    imported: the run's hook then warns."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in PINNED.items():
            os.environ.setdefault(name, value)


def describe() -> str:
    """What decides the floating-point results here, for logs and benchmark records."""
    import torch

    settings = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in PINNED)
    return f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()} ({settings})"
