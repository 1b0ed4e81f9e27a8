"""An API key reaches the server that needs it and nothing else: not MLflow, not logs, not any output.

A project copy calls a real local OpenAI-compatible server (`transformers serve`) with a known fake key,
once from conf/local/credentials.yml and once from the environment (SPAVL_KEY_*), through the generate
stage and the preflight; then every file the runs wrote (data/, mlflow.db, mlartifacts/) and everything
they printed is searched for the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import copy_project, shrink_taxonomy
from serving import free_port, served, tiny  # noqa: F401  (pytest fixtures, used by name)

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

FILE_KEY = "sk-test-FILEKEY-0123456789abcdef"
ENV_KEY = "sk-test-ENVKEY-fedcba9876543210"
SMALL = {
    "taxonomy.domains": 2,
    "taxonomy.categories": 2,
    "taxonomy.subcategories": 4,
    "generate.images.per_subcategory": 3,
    "generate.seed_corpus.questions_per_image": 1,
    "generate.seed_corpus.scenes": 40,
    "generate.seed_corpus.questioned_scenes": 8,
    "tiny.vision.steps": 20,
    "evaluate.reference_responder": "served-file",
}


def _kedro(root: Path, *args: str, env: dict[str, str]) -> str:
    kedro = Path(sys.executable).parent / "kedro"
    params = ",".join(f"{k}={v}" for k, v in SMALL.items())
    done = subprocess.run(
        [str(kedro), "run", "--params", params, *args], cwd=root, capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_a_fake_key_never_leaves_the_request(served, tmp_path):  # noqa: F811
    base_url, model = served
    root = copy_project(tmp_path / "project")
    shrink_taxonomy(root)
    local = root / "conf/local"
    (local / "credentials.yml").write_text(yaml.safe_dump({"inference_endpoints": {"filekey": {"api_key": FILE_KEY}}}))
    spec = {"kind": "openai", "model": model, "base_urls": [base_url], "concurrency": 4}
    (local / "parameters.yml").write_text(
        yaml.safe_dump(
            {
                "generate": {
                    "responders": [
                        {"name": "served-file", "api_key": "filekey", **spec},
                        {"name": "served-env", "api_key": "envkey", **spec},
                    ],
                    "generation": {"max_new_tokens": 8, "do_sample": False},
                }
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPAVL_KEY_ENVKEY": ENV_KEY}

    printed = _kedro(root, "--pipelines", "taxonomy,generate", env=env)
    printed += _kedro(root, "--pipeline", "preflight", env=env)

    # the keys were used: every response came back from the server, and preflight saw both keys
    responses = pd.read_parquet(root / "data/07_model_output/responses.parquet")
    assert set(responses["responder"]) == {"served-file", "served-env"} and responses["error"].isna().all()
    checks = pd.read_csv(root / "data/08_reporting/preflight_checks.csv")
    credentials = checks[checks["check"] == "credential"]
    assert set(credentials["target"]) == {"filekey", "envkey"} and set(credentials["status"]) == {"ok"}

    searched = 0
    for path in [p for p in root.rglob("*") if p.is_file() and "conf" not in p.relative_to(root).parts]:
        content = path.read_bytes()
        searched += 1
        for key in (FILE_KEY, ENV_KEY):
            assert key.encode() not in content, f"{key} found in {path}"
    assert searched > 20 and (root / "mlflow.db").exists()
    for key in (FILE_KEY, ENV_KEY):
        assert key not in printed
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 2
    for run in runs:
        logged = " ".join(map(str, [*run.data.params.values(), *run.data.tags.values()]))
        assert FILE_KEY not in logged and ENV_KEY not in logged
