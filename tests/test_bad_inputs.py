"""A catalogue of bad inputs across the stages. Each one either stops with a message that names what is
wrong and where (file, record, field or key), or is kept with its error and counted when configured so;
none is dropped silently or counted as safe.

Each case is a function that feeds one bad input to the code that reads it and returns what to check.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DatasetError
from PIL import Image

from spavl_kedro.config import ImageSourceConfig, validate_parameters
from spavl_kedro.datasets import EvalSetDataset, ImageManifestDataset, ModelDirectoryDataset, SpaVLReleaseDataset
from spavl_kedro.datasets.credentials import CredentialsDataset
from spavl_kedro.judges.core import JudgeItem, KeywordJudge
from spavl_kedro.models.specs import BackendSpec
from spavl_kedro.models.vlm import OpenAIVLM, Prompt, load_vlm
from spavl_kedro.pipelines.generate.images import images_from_manifest
from spavl_kedro.pipelines.taxonomy.nodes import build_taxonomy

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _png(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.putpixel((1, 1), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- taxonomy


def _spec(env):
    return copy.deepcopy(env["taxonomy_spec"])


@case
def taxonomy_missing_level(env):
    spec = _spec(env)
    del spec["domains"][2]["categories"][0]["subcategories"]
    return lambda: build_taxonomy(spec, {}, {}), ValueError, "missing level 'subcategories'"


@case
def taxonomy_duplicate_triplet(env):
    spec = _spec(env)
    subs = spec["domains"][0]["categories"][0]["subcategories"]
    subs.append(copy.deepcopy(subs[0]))
    return (
        lambda: build_taxonomy(spec, {}, {}),
        ValueError,
        "'Representation & ToxicityHarms / Toxic / bully' is duplicated",
    )


@case
def taxonomy_changed_spelling_breaks_the_count(env):
    spec = _spec(env)  # "fixing" a published typo makes a 54th label next to the published one
    subs = spec["domains"][0]["categories"][0]["subcategories"]
    subs.append({**copy.deepcopy(subs[0]), "name": "bullying"})
    return lambda: build_taxonomy(spec, {}, {}), ValueError, "taxonomy has 54 subcategories, expected 53"


@case
def taxonomy_entry_without_description(env):
    spec = _spec(env)
    del spec["domains"][1]["categories"][0]["subcategories"][0]["description"]
    return lambda: build_taxonomy(spec, {}, {}), ValueError, "missing 'description'"


@case
def taxonomy_yaml_that_does_not_parse(env):
    path = env["tmp"] / "taxonomy.yml"
    path.write_text("domains:\n  - name: A\n    categories: [\n")
    from kedro_datasets.yaml import YAMLDataset

    return lambda: YAMLDataset(filepath=str(path)).load(), DatasetError, "taxonomy.yml"


# ---------------------------------------------------------------- images


def _manifest(env, rows, files):
    root = env["tmp"] / "imgs"
    root.mkdir(exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    path = env["tmp"] / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "caption", "subcategory", "keywords"]).to_csv(path, index=False)
    return ImageManifestDataset(str(path)).load()


def _collect(env, records, on_bad_row="error"):
    taxonomy = build_taxonomy(env["taxonomy_spec"], {}, {})
    return lambda: images_from_manifest(
        records, taxonomy, ImageSourceConfig(source="manifest", on_bad_row=on_bad_row), per_subcategory=3
    )


@case
def image_corrupt(env):
    records = _manifest(env, [("imgs/a.png", "x", "weapon", "")], {"a.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20})
    return _collect(env, records), ValueError, "row 0 (imgs/a.png): unreadable image"


@case
def image_zero_bytes(env):
    records = _manifest(env, [("imgs/empty.png", "x", "weapon", "")], {"empty.png": b""})
    return _collect(env, records), ValueError, "row 0 (imgs/empty.png)"


@case
def image_missing_file(env):
    records = _manifest(env, [("imgs/nowhere.png", "x", "weapon", "")], {})
    return _collect(env, records), ValueError, "row 0 (imgs/nowhere.png): file not found"


@case
def image_pixel_bomb(env):
    # PIL refuses images over twice MAX_IMAGE_PIXELS before decoding them; the row names the path
    Image.MAX_IMAGE_PIXELS = 1000
    records = _manifest(env, [("imgs/big.png", "x", "weapon", "")], {"big.png": _png(size=(200, 200))})
    return _collect(env, records), ValueError, "row 0 (imgs/big.png): unreadable image"


@case
def image_unknown_subcategory_is_quarantined_and_counted(env):
    records = _manifest(
        env,
        [("imgs/a.png", "x", "weapon", ""), ("imgs/b.png", "y", "wepon", "")],
        {"a.png": _png(), "b.png": _png((30, 30, 200))},
    )
    run = _collect(env, records, on_bad_row="quarantine")

    def check():
        images, quarantine, report = run()
        assert len(images) == 1 and list(quarantine["row"]) == [1]
        assert "unknown subcategory 'wepon' (did you mean 'weapon'?)" in quarantine["reason"].iloc[0]
        assert report["bad"] == 1 and report["rows"] == 2

    return check, None, None


@case
def manifest_missing_column(env):
    path = env["tmp"] / "manifest.csv"
    pd.DataFrame({"file": ["a.png"], "caption": ["x"]}).to_csv(path, index=False)
    return lambda: ImageManifestDataset(str(path)).load(), DatasetError, "path"


@case
def manifest_not_utf8(env):
    path = env["tmp"] / "manifest.csv"
    path.write_bytes("path,caption,subcategory\nimgs/a.png,caf\xe9,weapon\n".encode("latin-1"))
    return lambda: ImageManifestDataset(str(path)).load(), DatasetError, "manifest.csv"


# ---------------------------------------------------------------- imported release


def _release(env, frame: pd.DataFrame) -> Path:
    root = env["tmp"] / "release"
    (root / "data").mkdir(parents=True)
    frame.to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root


@case
def release_parquet_missing_column(env):
    root = _release(
        env, pd.DataFrame({"image": [{"bytes": _png(), "path": "a/b/c/1.jpg"}], "question": ["q"], "chosen": ["c"]})
    )
    return lambda: SpaVLReleaseDataset(str(root)).load(), DatasetError, "missing column(s) ['rejected', 'image_name']"


@case
def release_parquet_mistyped_column(env):
    root = _release(
        env,
        pd.DataFrame(
            {
                "image": ["not a struct"],
                "question": ["q"],
                "chosen": ["c"],
                "rejected": ["r"],
                "image_name": ["a/b/c/1.jpg"],
            }
        ),
    )
    return lambda: SpaVLReleaseDataset(str(root)).load(), DatasetError, "train-00000-of-00001.parquet"


@case
def release_not_parquet(env):
    root = env["tmp"] / "release"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train-00000-of-00001.parquet").write_text("this is not parquet")
    return lambda: SpaVLReleaseDataset(str(root)).load(), DatasetError, "cannot read it as parquet"


@case
def release_folder_missing(env):
    return (
        lambda: SpaVLReleaseDataset(str(env["tmp"] / "nowhere")).load(),
        DatasetError,
        "SPA-VL release folder .*nowhere does not exist",
    )


@case
def eval_set_missing_json_field(env):
    path = env["tmp"] / "mis_hard.json"
    (env["tmp"] / "img").mkdir()
    for name in ("1.png", "2.png"):
        (env["tmp"] / "img" / name).write_bytes(_png())
    path.write_text(
        json.dumps(
            [{"question": "q", "category": "c", "image_path1": "img/1.png", "image_path2": "img/2.png", "id": 7}]
        )
    )
    return (lambda: EvalSetDataset(format="mis_test", path=str(path)).load(), DatasetError, "sub_category")


# ---------------------------------------------------------------- responses and judging


@case
def empty_response_is_judged_unsafe_not_safe(env):
    def check():
        verdict = KeywordJudge().verdicts([JudgeItem("How do I pick a lock?", "")])[0]
        assert verdict.safe is False and verdict.category == "no_refusal"

    return check, None, None


@case
def non_utf8_bytes_in_a_response_are_kept_readable(env):
    def check():  # a server's broken encoding arrives as replacement characters; the record stays
        text = b"Sure, here \xff\xfe steps".decode("utf-8", errors="replace")
        verdict = KeywordJudge(compliance_markers=["Sure, here"]).verdicts([JudgeItem("q", text)])[0]
        assert verdict.category == "compliance" and verdict.safe is False

    return check, None, None


@case
def unreachable_endpoint_is_kept_with_its_error(env):
    def check():
        backend = OpenAIVLM(
            name="down",
            model="m",
            base_urls=["http://127.0.0.1:9/v1"],
            max_retries=1,
            backoff_s=0.01,
            timeout_s=2,
            progress=False,
        )
        [generation] = backend.generate([Prompt("hello", ())])
        assert generation.error is not None and "ClientConnectorError" in generation.error
        assert generation.text == ""

    return check, None, None


# ---------------------------------------------------------------- parameters and models


@case
def parameter_wrong_type(env):
    params = copy.deepcopy(env["params"])
    params["split"]["validation_size"] = "ten percent"
    return lambda: validate_parameters(params), ValueError, "split.validation_size"


@case
def parameter_unknown_key(env):
    params = copy.deepcopy(env["params"])
    params["evaluate"]["sampels"] = 3
    return lambda: validate_parameters(params), ValueError, "evaluate.sampels: Extra inputs are not permitted"


@case
def parameter_unknown_recipe_key(env):
    params = copy.deepcopy(env["params"])
    params["align"]["grpo"]["num_generation"] = 8
    return lambda: validate_parameters(params), ValueError, "align.grpo.num_generation: Extra inputs are not permitted"


@case
def parameter_missing_block(env):
    params = copy.deepcopy(env["params"])
    del params["judge"]
    return lambda: validate_parameters(params), ValueError, "judge: missing parameter block"


@case
def parameter_bad_eval_set_name(env):
    params = copy.deepcopy(env["params"])
    params["evaluate"]["sets"] = ["test_harm", "mmsafetybench"]
    return lambda: validate_parameters(params), ValueError, "evaluate.sets.1"


@case
def model_directory_missing(env):
    return (lambda: ModelDirectoryDataset(str(env["tmp"] / "no_model")).load(), DatasetError, "no_model")


@case
def model_with_pickle_weights_only(env):
    from spavl_kedro.models import tiny

    config = tiny.TinyModelConfig(
        text_hidden=32, text_layers=1, text_heads=2, vision_hidden=16, vision_layers=1, image_size=16, patch_size=8
    )
    processor = tiny.build_processor(["a refusal", "a compliance"] * 20, config)
    directory = env["tmp"] / "pickled"
    model = tiny.build_model(processor, config, seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    import torch  # the same weights as a pickle checkpoint, the only weights there

    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return lambda: load_vlm(str(directory)), OSError, "safetensors weights only"


@case
def remote_code_through_load_kwargs(env):
    spec = {"name": "m", "kind": "transformers", "model": "x", "load_kwargs": {"trust_remote_code": True}}
    return lambda: BackendSpec.model_validate(spec), ValueError, "load_kwargs must not set trust_remote_code"


@case
def remote_code_on_an_endpoint(env):
    spec = {"name": "m", "kind": "openai", "model": "x", "base_urls": ["http://a/v1"], "trust_remote_code": True}
    return lambda: BackendSpec.model_validate(spec), ValueError, "trust_remote_code is for kind 'transformers' only"


@case
def credentials_file_that_is_not_yaml(env):
    path = env["tmp"] / "credentials.yml"
    path.write_text("inference_endpoints:\n  openai: {api_key: sk-abc\n")
    dataset = CredentialsDataset(entry="inference_endpoints", filepath=str(path))

    def check():
        with pytest.raises(DatasetError) as err:
            dataset.load()
        assert "credentials.yml is not valid YAML" in str(err.value) and "sk-abc" not in str(err.value)

    return check, None, None


@pytest.fixture
def env(tmp_path, params, taxonomy_spec):
    limit = Image.MAX_IMAGE_PIXELS
    yield {"tmp": tmp_path, "params": params, "taxonomy_spec": taxonomy_spec}
    Image.MAX_IMAGE_PIXELS = limit


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, env):
    run, error, message = CASES[name](env)
    if error is None:
        run()  # the case checks what was kept and counted itself
        return
    with pytest.raises(error) as err:
        run()
    text = str(err.value) + "".join(f" {c}" for c in (err.value.__cause__,) if c is not None)
    assert message in text or re.search(message, text), text  # literal text, or a pattern where marked
