"""One KedroSession run of the embedded default at its smallest size, in a copy of the project.

Checks what a user sees afterwards: every table on disk, the MLflow parent run with Kedro params and both
evaluation metrics, the nested DPO run with its curves, and a single stage re-run from disk.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import PROJECT, copy_project
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

SMALLEST = {
    "generate": {
        "images": {"per_subcategory": 3},
        "seed_corpus": {"questions_per_image": 1, "scenes": 100, "questioned_scenes": 20},
    },
    "tiny": {"vision": {"steps": 50}, "foundation": {"epochs": 2}, "bootstrap": {"epochs": 1}},
    # three images a subcategory hold out two, so an MIS sample seldom shows two training images: SFT learns
    # from the chosen answers here rather than from chain-of-thought targets that may not exist
    "align": {"dpo": {"num_train_epochs": 1}, "sft_data": "chosen"},
    "evaluate": {"samples": 1, "max_items": 20},  # 20 items per set and variant: every set, quickly
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("project"))
    bootstrap_project(root)
    with KedroSession.create(project_path=root, runtime_params=SMALLEST) as session:
        session.run()
    return root


def test_tables_are_written(project):
    data = project / "data"
    assert len(pd.read_parquet(data / "02_intermediate/taxonomy.parquet")) == 53
    assert len(pd.read_parquet(data / "03_primary/images.parquet")) == 53 * 3
    responses = pd.read_parquet(data / "07_model_output/responses.parquet")
    # three SPA-VL questions per image and two MIS samples per subcategory, each answered by four responders
    assert len(responses) == (53 * 3 * 3 + 53 * 2) * 4
    shard_size = yaml.safe_load((project / "conf/base/parameters_generate.yml").read_text())["generate"]["shard_size"]
    assert len(list((data / "07_model_output/response_shards").rglob("*.parquet"))) == 4 * -(-(53 * 11) // shard_size)
    assert len(pd.read_parquet(data / "03_primary/mis_cot.parquet")) == 53 * 2
    assert len(pd.read_parquet(data / "05_model_input/test_harm.parquet")) == 53
    # the split exported in the published layout, with its card; align trained on that export
    export = data / "09_export/spa_vl"
    assert list((export / "data").glob("train-*.parquet")) and (export / "test/harm-00000-of-00001.parquet").exists()
    assert (export / "README.md").read_text().startswith("---\nlicense: cc-by-4.0")
    assert (data / "09_export/spa_vl_rlhf/config_train.json").exists()  # and for SPA-VL's own trainers
    assert sorted(p.name for p in (data / "06_models/responders").iterdir()) == [
        "tiny-careful",
        "tiny-guarded",
        "tiny-lax",
        "tiny-reckless",
    ]
    assert (data / "06_models/aligned/dpo/dpo/adapter_model.safetensors").exists()  # method / name
    assert "| metric | n | base | dpo | sft |" in (data / "08_reporting/eval_report.md").read_text()
    assert sorted(p.name for p in (data / "08_reporting/eval_plots").iterdir()) == [
        "harmlessness_vs_helpfulness.png",
        "test_harm_unsafe_rate_by_class1.png",
    ]
    scores = pd.read_parquet(data / "08_reporting/eval_scores.parquet")
    assert set(scores["model"]) == {"base", "dpo", "sft"} and scores["value"].between(0, 1).all()


def test_the_default_runs_export_is_what_spa_vl_rlhf_loads_and_reads_back_to_the_train_pairs(project):
    """The export for github.com/EchoseChen/SPA-VL-RLHF from this run, read as its loaders read it: a config
    keyed hardq / hardd / easy naming JSON lists of {id, image, question, chosen, rejected}, integer ids,
    images opened at image_folder / image. The importer gives back the split's train pairs."""
    from spavl_kedro.datasets import SpaVLRLHFDataset

    folder = project / "data/09_export/spa_vl_rlhf"
    config = json.loads((folder / "config_train.json").read_text())
    assert set(config) == {"hardq", "hardd", "easy"}
    records = [record for keyword in config for record in json.loads(Path(config[keyword]).read_text())]
    assert records and all(set(r) == {"id", "image", "question", "chosen", "rejected"} for r in records)
    assert all(type(r["id"]) is int for r in records) and len({r["id"] for r in records}) == len(records)
    assert all((folder / "images" / r["image"]).is_file() for r in records)
    train = pd.read_parquet(project / "data/05_model_input/train.parquet")
    assert len(records) == len(train)
    back = SpaVLRLHFDataset(path=str(folder)).load()
    back = back[back["split"] == "train"]
    triple = lambda t: sorted(zip(t["question"], t["chosen"], t["rejected"]))  # noqa: E731
    assert triple(back) == triple(train)


def test_mlflow_parent_and_child_runs(project):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    training = [r for r in children if r.data.tags.get("spavl.role") == "training"]
    evaluation = [r for r in children if r.data.tags.get("spavl.role") == "evaluation"]
    assert len(parents) == 1 and len(training) == 2  # one training run each: DPO and SFT
    assert len(evaluation) == 3 and len(children) == 5  # and one evaluation run per policy: base, dpo, sft
    parent = parents[0]
    child = next(r for r in training if "rewards/accuracies" in r.data.metrics)  # the DPO run
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["generate.images.per_subcategory"] == "3"
    assert parent.data.params["align.dpo.beta"] == "0.1"
    # both papers' methods, each logged by its own train node with its data size
    assert parent.data.params["align.trained.dpo.method"] == "dpo"
    assert parent.data.params["align.trained.sft.method"] == "sft"
    # which input format judged: the tiny guard's own template from the config, with its hash
    assert parent.data.params["judge.template.tiny-guard"].startswith("md_judge: inline prompt, sha256 ")
    assert parent.data.params["judge.template.keyword"] == "none (refusal strings)"
    assert int(parent.data.params["align.trained.dpo.train_examples"]) > 0
    # a run page a reader can use: the headline per policy (named with the judge that decided it), not one
    # chart per judge, class and question type (3,842 metrics before this rule, on the default); the wording rows,
    # the image-blanked floors and each judge's AUROC are headline figures too
    assert len(parent.data.metrics) <= 200, len(parent.data.metrics)
    for model in ("base", "dpo", "sft"):
        for name in (
            "test_harm/unsafe_rate.tiny-guard",
            "test_harm/sampled_unsafe_rate.tiny-guard",
            "benign/refusal_rate.rules",
            "capability/accuracy.rules",
            "mis_test/rsr.tiny-guard",
        ):
            assert f"eval/{model}/{name}" in parent.data.metrics, (model, name)
    assert not any("/class1/" in name or name.endswith(".keyword") for name in parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"eval_report.md", "eval"} <= artifacts, artifacts
    # the breakdowns and the item-by-item evaluation are MLflow tables: every policy's answer, every judge's verdict
    experiment, run_ids = parent.info.experiment_id, [parent.info.run_id]
    items = client.load_table(experiment, "eval/items.json", run_ids=run_ids)
    breakdown = client.load_table(experiment, "eval/metrics_table.json", run_ids=run_ids)
    on_disk = pd.read_parquet(project / "data/08_reporting/eval_item_table.parquet")
    every = pd.read_parquet(project / "data/05_model_input/eval_items.parquet")
    # every item but the white copies of the image-blanked ablation, whose answers are in eval_answers
    assert len(items) == len(on_disk) == (every["variant"] != "image_blanked").sum()
    sampled = items["eval_set"].isin(["test_harm", "benign", "mis_test"])  # evaluate.sampled_sets
    for model in ("base", "dpo", "sft"):
        assert items[f"{model} greedy"].notna().all() and items.loc[sampled, f"{model} sampled"].notna().all()
        assert items.loc[~sampled, f"{model} sampled"].isna().all()
        verdicts = items[f"{model} greedy · tiny-guard"]
        harm = items["eval_set"].isin(["test_harm", "figstep", "mm_safetybench", "advbench", "mis_test"])
        assert verdicts[harm].notna().all() and verdicts[harm].str.contains(r"=\d").all(), verdicts[harm].head()
    assert items["images"].map(lambda cell: cell["type"] == "image").all()
    assert {"Malicious Use", "Representation & ToxicityHarms"} <= set(breakdown["group"])  # published names, unmangled
    assert parent.data.metrics["judge/pairs"] > 0
    assert parent.data.metrics["generate/responses_failed"] == 0
    assert parent.data.metrics["judge/pairs_order_consistent"] == parent.data.metrics["judge/pairs"]
    assert -1 <= parent.data.metrics["judge/agreement/keyword_vs_keyword-lower/kappa"] <= 1
    assert parent.data.metrics["generate/questions_kept"] == 53 * 11
    for curve in ("loss", "rewards/accuracies", "rewards/margins"):
        assert len(client.get_metric_history(child.info.run_id, curve)) >= 2, curve
    # trainer arguments live in the child run, never mixed into the Kedro params of the parent
    assert "learning_rate" in child.data.params and "learning_rate" not in parent.data.params


def test_mlflow_runs_say_what_they_did_and_hold_one_run_per_policy(project):
    """The runs table tells runs apart by name and tags; each evaluated policy has its own run with the same
    metric names as the others (so MLflow compares them side by side), the evaluation sets as dataset inputs,
    and a link to the run that trained it, whose own input is its training data."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name == "__default__ · dpo+sft · ours · seed 0"
    tags = parent.data.tags
    assert tags["spavl.methods"] == "dpo,sft" and tags["spavl.train_source"] == "ours"
    assert "generate=0" in tags["spavl.seeds"] and tags["spavl.env"] == "local"
    assert tags["runner"] == "SequentialRunner"
    assert "eval_report.md" in tags["mlflow.note.content"]
    assert not any(" object at 0x" in value for value in tags.values())
    assert len({r.info.run_name for r in runs}) == len(runs)  # every name distinct

    trained = {r.data.tags["spavl.model"]: r for r in runs if r.data.tags.get("spavl.role") == "training"}
    assert sorted(trained) == ["dpo", "sft"]
    for name, run in trained.items():
        (training_input,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert training_input.dataset.name == f"{name} training data" and len(training_input.dataset.digest) >= 8
    policies = {r.data.tags["spavl.policy"]: r for r in runs if r.data.tags.get("spavl.role") == "evaluation"}
    assert sorted(policies) == ["base", "dpo", "sft"]
    keys = {policy: set(run.data.metrics) for policy, run in policies.items()}
    assert keys["base"] == keys["dpo"] == keys["sft"] and "test_harm/unsafe_rate.tiny-guard" in keys["base"]
    for policy, run in policies.items():
        assert run.info.run_name == f"eval · {policy}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags.get("spavl.trained_in_run") == (trained[policy].info.run_id if policy in trained else None)
        for name, value in run.data.metrics.items():  # the parent's eval/<policy>/<name>, the same number
            assert parent.data.metrics[f"eval/{policy}/{name}"] == value, (policy, name)
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} >= {"eval: test_harm", "eval: test_help", "eval: mis_test"}
        assert all(i.dataset.digest and i.tags[0].value == "evaluation" for i in inputs)


def test_notebook_executes_against_the_run(project):
    """notebooks/explore_catalog.ipynb, run top to bottom in the project copy as a user would open it."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(PROJECT / "notebooks/explore_catalog.ipynb", as_version=4)
    (project / "notebooks").mkdir(exist_ok=True)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(project / "notebooks")}}
    ).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "training pairs; columns: ['image', 'question', 'chosen', 'rejected', 'image_name']" in printed
    figures = [
        o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    assert len(figures) >= 4  # pair images, distributions, trade-off and scale plots
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_single_stage_reruns_from_disk(project):
    before = (project / "data/08_reporting/eval_report.md").stat().st_mtime_ns
    with KedroSession.create(project_path=project, runtime_params=SMALLEST) as session:
        session.run(pipeline_names=["evaluate"])
    assert (project / "data/08_reporting/eval_report.md").stat().st_mtime_ns > before


def _digest(folder: Path) -> str:
    """One hash of every file of a model directory, by relative path and content."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _align(project: Path, nodes: list[str], **align) -> None:
    params = {**SMALLEST, "align": {**SMALLEST["align"], **align}}
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_name="align", node_names=nodes)


def test_one_method_retrains_alone_and_a_failing_method_keeps_the_others_models(project):
    """`kedro run --pipeline align --nodes train_sft` after the default run retrains SFT (here on another
    seed, so its weights must change) and leaves DPO's adapter byte for byte; then a run whose SFT fails
    after DPO has trained fails, with DPO's new adapter written and SFT's last model kept."""
    aligned = project / "data/06_models/aligned"
    dpo, sft = _digest(aligned / "dpo/dpo"), _digest(aligned / "sft/sft")
    _align(project, ["train_sft"], sft={"seed": 1})
    assert _digest(aligned / "dpo/dpo") == dpo
    retrained = _digest(aligned / "sft/sft")
    assert retrained != sft
    assert json.loads((project / "data/08_reporting/align_summary/sft/sft.json").read_text())["settings"]["seed"] == 1

    # SFT's checkpoints cannot be written (their folder would sit inside a file): the run stops there
    blocked = str(project / "pyproject.toml" / "checkpoints")
    with pytest.raises(Exception, match="pyproject.toml"):
        _align(
            project,
            ["train_dpo", "train_sft"],
            dpo={"num_train_epochs": 1, "seed": 1},
            sft={"seed": 2, "checkpoint_steps": 1, "checkpoint_dir": blocked},
        )
    assert _digest(aligned / "dpo/dpo") != dpo  # DPO trained first (on another seed) and its node saved it
    assert _digest(aligned / "sft/sft") == retrained  # the failed SFT erased nothing


def test_the_mlflow_compare_view_shows_base_and_dpo_side_by_side(project, tmp_path):
    """`make mlflow`'s server on this run's store, and MLflow's compare view of the base and DPO evaluation
    runs in headless chromium: both runs' names and the HarmEval metric, with each policy's value, on one
    page. The screenshot stays in tests/artifacts/mlflow_compare.png."""
    import subprocess
    import sys
    import time
    import urllib.parse
    import urllib.request

    from browser import ARTIFACTS, render, stop
    from serving import free_port

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    policies = {r.data.tags["spavl.policy"]: r for r in runs if r.data.tags.get("spavl.role") == "evaluation"}
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri"]
    command += [f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    quiet = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # loopback only
    server = subprocess.Popen(
        command, env=quiet, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow ui did not answer /health in 2 minutes")
        ids = [policies["base"].info.run_id, policies["dpo"].info.run_id]
        experiments = [policies["base"].info.experiment_id]
        query = f"runs={urllib.parse.quote(json.dumps(ids))}&experiments={urllib.parse.quote(json.dumps(experiments))}"
        dom = render(
            f"{url}/#/compare-runs?{query}",
            ARTIFACTS / "mlflow_compare.png",
            tmp_path / "profile",
            30_000,
            (1600, 1400),
        )
    finally:
        stop(server)
    (ARTIFACTS / "mlflow_compare.html").write_text(dom)
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "eval · base" in text and "eval · dpo" in text, text[:2000]
    # The metrics table is two grids of absolutely placed cells (MLflow 3.17): the names, and one column of
    # values per run, a row's cells at the same `top`; only the rows in view are drawn (alphabetical).
    cells = re.findall(
        r'style="height: \d+px; left: (\d+)px; position: absolute; top: (\d+)px; width: \d+px;">(.*?)</div>', dom
    )
    names, values = {}, {}
    for left, top, cell in cells:
        shown = re.sub(r"<[^>]+>", "", cell).strip()
        if "/" in shown:
            names[int(top)] = shown
        else:
            values.setdefault(int(top), []).append((int(left), shown))
    drawn = {names[top]: [v for _, v in sorted(values[top])] for top in names if top in values}
    assert len(drawn) >= 3 and set(drawn) <= set(policies["base"].data.metrics), drawn
    for name, (base, dpo) in drawn.items():  # base's column first, as the URL lists the runs
        expected = (policies["base"].data.metrics[name], policies["dpo"].data.metrics[name])
        assert (float(base), float(dpo)) == pytest.approx(expected, abs=5e-3), name


def test_the_readme_official_data_command_trains_on_a_release(project, tmp_path):
    """The README's official-data command, as written there, on this project after its default run: the
    release's folder in place of `/data/SPA-VL`. DPO and SFT train on the release's train pairs (SFT on their
    chosen answers), each recording the official source. Runs last: it replaces this project's models."""
    import os
    import re
    import subprocess
    import sys

    from releases import write_parquet_release

    commands = re.findall(
        r"^(\.venv/bin/kedro run .*align\.train_source=official.*)$", (PROJECT / "README.md").read_text(), re.M
    )
    assert len(commands) == 1, commands
    release = tmp_path / "SPA-VL"
    rows = write_parquet_release(release)
    command = commands[0].replace("/data/SPA-VL", str(release)).split()
    command[0] = str(Path(sys.executable).with_name("kedro"))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for method in ("dpo", "sft"):
        summary = json.loads((project / f"data/08_reporting/align_summary/{method}/{method}.json").read_text())
        assert summary["train_source"] == "official", method
        assert summary["train_examples"] == len(rows["train"]["question"]), method
