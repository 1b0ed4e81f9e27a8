"""The CPU kernels are pinned before torch loads, so a run computes the same on every x86-64 machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from spavl_kedro.numerics import PINNED

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pin applies to x86-64 only"),
    pytest.mark.slow,  # each test starts fresh interpreters that import torch: make test runs them
]

PROBE = "import spavl_kedro, torch; print(torch.backends.cpu.get_cpu_capability())"


def _capability(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED}
    return subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_importing_the_package_pins_torch_to_avx2_kernels():
    assert _capability() == "AVX2"


def test_a_value_already_in_the_environment_wins():
    assert _capability(ATEN_CPU_CAPABILITY="default") == "DEFAULT"


def test_the_test_session_itself_runs_pinned():
    import torch

    assert torch.backends.cpu.get_cpu_capability() == "AVX2"  # conftest imports the package first
