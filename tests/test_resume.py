"""Crash and resume: a real `kedro run` answering questions is SIGKILLed midway, then run again.

The rerun must skip the shards already on disk (their files are not rewritten) and finish with every
(question, responder) answered exactly once.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import PROJECT, copy_project

# A 4-subcategory world from two domains; shards of 4 questions so the answering takes many shards.
PARAMS = {
    "taxonomy.domains": 2, "taxonomy.categories": 2, "taxonomy.subcategories": 4,
    "generate.images.per_subcategory": 3, "generate.shard_size": 4,
    "generate.seed_corpus.questions_per_image": 1, "tiny.bootstrap.epochs": 2,
}
ANSWERING = ["--from-nodes", "plan_response_shards", "--to-nodes", "collect_responses"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project copy with a small taxonomy whose tiny responders are already bootstrapped on disk."""
    root = copy_project(tmp_path_factory.mktemp("resume"))
    spec = yaml.safe_load((PROJECT / "data/01_raw/taxonomy.yml").read_text())
    small = copy.deepcopy(spec)
    small["domains"] = [copy.deepcopy(d) for d in spec["domains"][:2]]
    for domain in small["domains"]:
        domain["categories"] = domain["categories"][:1]
        domain["categories"][0]["subcategories"] = domain["categories"][0]["subcategories"][:2]
    (root / "data/01_raw/taxonomy.yml").write_text(yaml.safe_dump(small, sort_keys=False))
    # In a subprocess like the runs under test: an MLflow run left active in this process by an earlier
    # test would otherwise swallow this one's parameters.
    setup = _kedro(root, "--pipelines", "taxonomy,generate", "--to-nodes", "bootstrap_responders")
    output = setup.communicate(timeout=900)[0].decode()
    assert setup.returncode == 0, output[-3000:]
    return root


def _kedro(root: Path, *args: str) -> subprocess.Popen:
    params = ",".join(f"{k}={v}" for k, v in PARAMS.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    kedro = Path(sys.executable).parent / "kedro"
    return subprocess.Popen([str(kedro), "run", "--params", params, *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _shards(root: Path) -> dict[Path, int]:
    folder = root / "data/07_model_output/response_shards"
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.parquet")} if folder.exists() else {}


def test_sigkill_midway_then_rerun_answers_everything_once(project):
    questions = pd.read_parquet(project / "data/03_primary/questions.parquet")
    kept = int(questions["kept"].sum())
    total_shards = 4 * -(-kept // 4)  # four responders

    run = _kedro(project, *ANSWERING)
    deadline = time.monotonic() + 300
    while len(_shards(project)) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stdout.read().decode()[-2000:]
    before = _shards(project)
    assert 3 <= len(before) < total_shards  # killed midway: some shards written, not all

    rerun = _kedro(project, *ANSWERING)
    output = rerun.communicate(timeout=600)[0].decode()
    assert rerun.returncode == 0, output[-3000:]
    after = _shards(project)
    assert len(after) == total_shards
    assert all(after[p] == mtime for p, mtime in before.items())  # finished shards were skipped, not redone
    responses = pd.read_parquet(project / "data/07_model_output/responses.parquet")
    assert len(responses) == kept * 4
    assert not responses.duplicated(["question_id", "responder"]).any()
    assert set(responses["question_id"]) == set(questions.loc[questions["kept"], "question_id"])
    assert responses["error"].isna().all()
