"""Crash and determinism on a small world, in real `kedro run` processes.

Run A goes through all six pipelines uninterrupted. Run B, in a second copy with the same seed and at the
same time (a stage behind A), is killed
with SIGKILL at seeded random points of the three long stages (generate's answers, judge's verdicts,
evaluate's answers: ten kills in all), each time rerun until it finishes; a shard finished before a kill
is never written again. Then every table both runs wrote
must be identical, byte for byte once the columns that time things (latency, runtime) are left out:
the same seed gives the same data, and a crash neither loses nor duplicates a record.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_project, shrink_taxonomy

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

PARAMS = {
    "taxonomy.domains": 2,
    "taxonomy.categories": 2,
    "taxonomy.subcategories": 4,
    "generate.images.per_subcategory": 3,
    "generate.shard_size": 4,
    "generate.seed_corpus.questions_per_image": 1,
    "generate.seed_corpus.scenes": 40,
    "generate.seed_corpus.questioned_scenes": 8,
    "tiny.vision.steps": 20,
    "tiny.foundation.epochs": 2,
    "tiny.bootstrap.epochs": 1,
    # a guard taught 36 examples twice answered almost nothing in MD-Judge's format, so no pair was judged and
    # align had nothing to train on: enough passes for the format (its verdicts need not be right here)
    "judge.guard_epochs": 12,
    "judge.shard_size": 16,
    "split.validation_size": 0.2,
    "align.dpo.num_train_epochs": 1,
    # three images a subcategory hold out two: an MIS sample seldom shows two training images, so SFT learns
    # from the chosen answers here instead of chain-of-thought targets that may not exist
    "align.sft_data": "chosen",
    "evaluate.shard_size": 4,
    "evaluate.samples": 1,
    "evaluate.max_items": 20,  # per set and variant: every set (and its image-blanked copies), quickly
}
# (stage to run, its shard folder or None, how many kills, the table written once the folder is complete);
# kill points are drawn from a seeded generator
STAGES = [
    (["--pipelines", "taxonomy,generate"], "07_model_output/response_shards", 4, "07_model_output/responses.parquet"),
    (["--pipeline", "judge"], "07_model_output/verdict_shards", 3, "07_model_output/verdicts.parquet"),
    (["--pipelines", "split,align"], None, 0, None),
    (["--pipeline", "evaluate"], "07_model_output/eval_answer_shards", 3, "07_model_output/eval_answers.parquet"),
]
TIMING = {"latency_s", "train_runtime", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _project(root: Path) -> Path:
    root = copy_project(root)
    shrink_taxonomy(root)
    # four evaluation sets of the eight: enough shards to kill in, less to wait for (a list: not --params)
    (root / "conf/local/parameters.yml").write_text("evaluate:\n  sets: [test_harm, benign, advbench, mis_test]\n")
    return root


def _kedro(root: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    """`kedro run` in `root`, its output piped (or written to `log`, for a run nobody reads while it runs)."""
    params = ",".join(f"{k}={v}" for k, v in PARAMS.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [str(Path(sys.executable).parent / "kedro"), "run", "--params", params, *args]
    if log is None:
        return subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    with log.open("wb") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _finish(run: subprocess.Popen, log: Path | None = None) -> None:
    output = run.communicate(timeout=900)[0]
    output = log.read_text() if log is not None else output.decode()
    assert run.returncode == 0, output[-4000:]


def _wait_for(path: Path, run: subprocess.Popen, log: Path) -> None:
    """Until run A has written `path` (the stage's shards are then all on disk), or fail if A stops first."""
    deadline = time.monotonic() + 900
    while not path.exists():
        assert run.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"run A wrote no {path} in 900 s"
        time.sleep(0.05)


def _shards(folder: Path) -> int:
    return len(list(folder.rglob("*.parquet"))) if folder.exists() else 0


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.parquet")}


def _table_digests(root: Path) -> dict[str, str]:
    """A content hash of every table under data/ (parquet, csv, json), timing columns left out."""
    digests = {}
    for path in sorted((root / "data").rglob("*")):
        relative = str(path.relative_to(root / "data"))
        if path.suffix == ".parquet" and "06_models" not in relative:
            frame = pd.read_parquet(path)
            frame = frame.drop(columns=[c for c in frame.columns if c in TIMING])
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            digests[relative] = hashlib.sha256(buffer.getvalue()).hexdigest()
        elif path.suffix in (".csv", ".md", ".yml") and "01_raw" not in relative:
            digests[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Run A goes through all six pipelines in one process while run B is killed and rerun stage by stage a
    # stage behind it: each kedro process computes on one thread (OMP_NUM_THREADS=1), so the two share the
    # machine's two cores. B draws a stage's kill points once A has finished that stage.
    a = _project(tmp_path_factory.mktemp("run_a"))
    b = _project(tmp_path_factory.mktemp("run_b"))
    log_a = a / "run_a.log"
    run_a = _kedro(a, log=log_a)
    rng = random.Random(20261122)
    kills, written = [], {}
    for args, folder, n_kills, complete in STAGES:
        if folder is not None:
            _wait_for(a / "data" / complete, run_a, log_a)
            total = _shards(a / "data" / folder)
            assert total > n_kills, (folder, total)
            for target in sorted(rng.sample(range(1, total), n_kills)):  # kill once this many shards are on disk
                # a kill can land a shard late (a shard finished while the signal went out): the next kill
                # then waits for one shard more than is on disk, so every drawn kill still happens
                target = max(target, _shards(b / "data" / folder) + 1)
                if target >= total:
                    continue
                run = _kedro(b, *args)
                deadline = time.monotonic() + 600
                while _shards(b / "data" / folder) < target and run.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                kills.append((folder, target, _shards(b / "data" / folder), run.returncode))
                written.update(_mtimes(b / "data" / folder))
        _finish(_kedro(b, *args))
    _finish(run_a, log_a)
    rewritten = [str(p) for p, mtime in written.items() if p.stat().st_mtime_ns != mtime]
    assert not rewritten, rewritten  # a shard finished before a kill is skipped by every later run
    return a, b, kills


def test_ten_sigkills_at_random_points_lose_and_duplicate_nothing(runs):
    a, b, kills = runs
    assert len(kills) >= 10, kills
    assert all(code == -signal.SIGKILL for *_, code in kills), kills  # each run really died mid-stage
    assert {folder for folder, *_ in kills} == {folder for _, folder, *_ in STAGES if folder}
    for name in (
        "07_model_output/responses.parquet",
        "07_model_output/verdicts.parquet",
        "07_model_output/eval_answers.parquet",
    ):
        table = pd.read_parquet(b / "data" / name)
        key = {
            "responses": ["question_id", "responder"],
            "verdicts": ["response_id", "judge"],
            "eval_answers": ["model", "item_id", "decoding", "sample"],
        }[Path(name).stem]
        assert not table.duplicated(key).any() and len(table) == len(pd.read_parquet(a / "data" / name))


def test_same_seed_same_tables(runs):
    a, b, _ = runs
    digests_a, digests_b = _table_digests(a), _table_digests(b)
    assert len(digests_a) >= 25 and set(digests_a) == set(digests_b)
    differ = sorted(name for name in digests_a if digests_a[name] != digests_b[name])
    assert not differ, differ
