"""Headless Debian chromium for the tests that look at a UI as a person would (kedro-viz, MLflow): start it
on a URL, let the page's scripts run, keep the rendered DOM and a screenshot. `make browser` installs
chromium (`make test` runs it first); the screenshots stay in tests/artifacts/ (git ignores it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import PROJECT

ARTIFACTS = PROJECT / "tests" / "artifacts"


def chromium() -> str:
    """Debian's chromium, which `make browser` installs (`make test` runs it first)."""
    found = shutil.which("chromium")
    assert found, "chromium is not installed: run `make browser` (apt-get install chromium), as `make test` does"
    return found


def stop(process: subprocess.Popen) -> None:
    """Kill the process group started for `process` (chromium and servers leave children)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def render(url: str, screenshot: Path, profile: Path, budget_ms: int, window: tuple[int, int]) -> str:
    """The DOM of `url` after `budget_ms` of virtual time, and a screenshot of the same moment."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        # nothing but the page under test: no update checks, pings or background fetches
        "--disable-background-networking",
        "--disable-component-update",
        "--no-pings",
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={window[0]},{window[1]}",
        f"--user-data-dir={profile}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    browser = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        dom, _ = browser.communicate(timeout=120)
    finally:
        stop(browser)
    assert browser.returncode == 0, f"chromium exited with {browser.returncode}"
    return dom
