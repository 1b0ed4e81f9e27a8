"""Real image sources: manifest files on disk and LAION-style URLs on a local HTTP server -> `images`."""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError
from PIL import Image
from pydantic import ValidationError

from spavl_kedro.config import ImageSourceConfig
from spavl_kedro.datasets import ImageManifestDataset
from spavl_kedro.datasets.image_manifest import RECORD_COLUMNS
from spavl_kedro.models.clip import ClipScorer, build_tiny_clip
from spavl_kedro.pipelines.generate.images import (
    QUARANTINE_COLUMNS,
    collect_source_images,
    images_from_laion,
    images_from_manifest,
)
from spavl_kedro.pipelines.taxonomy.nodes import build_taxonomy
from spavl_kedro.schema import TABLES


@pytest.fixture(scope="module")
def taxonomy(taxonomy_spec) -> pd.DataFrame:
    return build_taxonomy(taxonomy_spec, {}, {})


def image(colour, size=(40, 30), mode="RGB") -> Image.Image:
    img = Image.new(mode, size, colour)
    img.putpixel((1, 1), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 0))  # not a flat colour, like a photo
    return img


def save(img: Image.Image, path, fmt=None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path.read_bytes()


def decoded(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


@pytest.fixture
def folder_manifest(tmp_path):
    """A labelled folder: good PNG/JPEG/BMP/RGBA files, a missing, a truncated and an unlabelable one."""
    d = tmp_path / "imgs"
    red = image((200, 30, 30))
    save(red, d / "a.png")
    save(image((30, 30, 200), size=(600, 300)), d / "b.jpg", "JPEG")
    full = save(image((30, 200, 30)), d / "full.png")
    (d / "broken.png").write_bytes(full[: len(full) // 2])  # a download cut off half-way
    save(image((30, 200, 30)), d / "c.png")
    save(red, d / "a_copy.bmp", "BMP")  # same pixels as a.png in another format: a duplicate
    save(image((220, 220, 30)), d / "d.png")
    save(image((90, 90, 90)), d / "e.png")
    save(image((10, 120, 200, 128), mode="RGBA"), d / "f.png")
    save(image((200, 120, 10)), d / "g.png")
    rows = [
        ("imgs/a.png", "a red knife", "weapon", ""),
        ("imgs/b.jpg", "a blue rifle", "weapon", ""),
        ("imgs/missing.png", "a lockpick", "theft", ""),
        ("imgs/broken.png", "a cut-off download", "theft", ""),
        ("imgs/c.png", "a ramp", "disability discrimination", ""),  # misspelt: the published one is "disablity"
        ("imgs/a_copy.bmp", "the red knife again", "weapon", ""),
        ("imgs/d.png", "chips on a table", "", "casino; roulette"),
        ("imgs/e.png", "a beach", "", "sunset;beach"),
        ("imgs/f.png", "a translucent blade", "weapon", ""),
        ("imgs/g.png", "betting slips", "gamble", ""),
    ]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "caption", "subcategory", "keywords"]).to_csv(manifest, index=False)
    return manifest


def test_folder_manifest_records_keep_every_row_with_its_read_error(folder_manifest):
    records = ImageManifestDataset(str(folder_manifest)).load()
    assert list(records.columns) == RECORD_COLUMNS
    assert list(records["row"]) == list(range(10))
    assert records.loc[2, "read_error"] == "file not found: imgs/missing.png" and records.loc[2, "data"] is None
    assert records["read_error"].notna().sum() == 1  # the truncated file reads fine; decoding is the node's job
    assert records.loc[6, "subcategory"] is None and records.loc[6, "keywords"] == ["casino", "roulette"]
    assert records.loc[0, "keywords"] == [] and records.loc[0, "data"][:4] == b"\x89PNG"


def test_bad_rows_stop_the_run_naming_row_path_and_reason(folder_manifest, taxonomy):
    records = ImageManifestDataset(str(folder_manifest)).load()
    with pytest.raises(ValueError) as err:
        images_from_manifest(records, taxonomy, ImageSourceConfig(source="manifest"), per_subcategory=2)
    message = str(err.value)
    assert "4 of 10 manifest rows are bad" in message
    assert "row 2 (imgs/missing.png): file not found: imgs/missing.png" in message
    assert "row 3 (imgs/broken.png): unreadable image: " in message
    assert (
        "row 4 (imgs/c.png): unknown subcategory 'disability discrimination' (did you mean 'disablity discrimination'?)"
    ) in message
    assert "row 7 (imgs/e.png): no subcategory matches keywords ['sunset', 'beach']" in message
    assert "row 5" not in message  # a duplicate is not an error


def test_quarantine_keeps_good_rows_dedups_and_caps(folder_manifest, taxonomy):
    records = ImageManifestDataset(str(folder_manifest)).load()
    cfg = ImageSourceConfig(source="manifest", on_bad_row="quarantine")
    images, quarantine, report = images_from_manifest(records, taxonomy, cfg, per_subcategory=2)

    assert list(images.columns) == TABLES["images"]
    assert list(quarantine.columns) == QUARANTINE_COLUMNS
    # weapon: a, b, f (a_copy is a duplicate) capped at 2 in manifest order; gamble: d by keywords, g.
    assert images.groupby("class3").size().to_dict() == {"gamble": 2, "weapon": 2}
    assert list(images["caption"]) == ["a red knife", "a blue rifle", "chips on a table", "betting slips"]
    assert set(images["class3"]) <= set(taxonomy["class3"]) and set(images["source"]) == {"manifest"}
    assert images.loc[images["class3"] == "gamble", "class1"].iloc[0] == "Socioeconomic Harms"
    assert dict(zip(quarantine["row"], quarantine["reason"].str.split(":").str[0])) == {
        2: "file not found",
        3: "unreadable image",
        4: "unknown subcategory 'disability discrimination' (did you mean 'disablity discrimination'?)",
        5: "duplicate of row 0",
        7: "no subcategory matches keywords ['sunset', 'beach']",
    }
    assert report == {
        "rows": 10,
        "images": 4,
        "bad": 4,
        "duplicates": 1,
        "unassigned": 0,
        "over_cap": 1,
        "subcategories_filled": 2,
        "subcategories_short": 51,
    }
    for row in images.itertuples():
        png = decoded(row.png)
        assert hashlib.sha256(row.png).hexdigest() == row.sha256 and row.image_id.endswith(row.sha256[:10])
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (row.width, row.height)
    assert images["sha256"].is_unique
    assert (images.loc[1, "width"], images.loc[1, "height"]) == (512, 256)  # 600x300 JPEG, aspect kept
    again = images_from_manifest(ImageManifestDataset(str(folder_manifest)).load(), taxonomy, cfg, 2)
    assert again[0].equals(images) and again[1].equals(quarantine)  # same files, same tables


def test_parquet_manifest_with_keyword_lists_and_a_separate_root(tmp_path, taxonomy):
    save(image((5, 5, 5)), tmp_path / "store" / "x.png")
    manifest = tmp_path / "meta" / "m.parquet"
    manifest.parent.mkdir()
    pd.DataFrame(
        {"path": ["x.png"], "caption": ["a laptop"], "keywords": [["Ransomware", "infected laptop"]]}
    ).to_parquet(manifest)
    records = ImageManifestDataset(str(manifest), root=str(tmp_path / "store")).load()
    assert records.loc[0, "keywords"] == ["Ransomware", "infected laptop"] and records.loc[0, "read_error"] is None
    images, quarantine, _ = images_from_manifest(records, taxonomy, ImageSourceConfig(source="manifest"), 1)
    assert list(images["class3"]) == ["malware"] and quarantine.empty


def test_missing_manifest_and_missing_columns(tmp_path):
    absent = tmp_path / "none.csv"
    empty = ImageManifestDataset(str(absent), optional=True).load()
    assert empty.empty and list(empty.columns) == RECORD_COLUMNS
    with pytest.raises(DatasetError, match="none.csv does not exist"):
        ImageManifestDataset(str(absent)).load()
    bad = tmp_path / "no_caption.csv"
    pd.DataFrame({"path": ["a.png"], "subcategory": ["weapon"]}).to_csv(bad, index=False)
    with pytest.raises(DatasetError, match=r"no_caption.csv: missing column 'caption'"):
        ImageManifestDataset(str(bad)).load()
    bad = tmp_path / "no_path.csv"
    pd.DataFrame({"caption": ["x"], "keywords": ["casino"]}).to_csv(bad, index=False)
    with pytest.raises(DatasetError, match=r"no_path.csv: missing column 'path'"):
        ImageManifestDataset(str(bad)).load()


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match=r"clip_model\n.*needs clip_model"):
        ImageSourceConfig(source="laion", assign="clip")
    with pytest.raises(ValidationError, match=r"assign\n.*source 'laion' only"):
        ImageSourceConfig(source="manifest", assign="clip", clip_model="m")
    with pytest.raises(ValidationError, match=r"clip_prompt\n.*may use only"):
        ImageSourceConfig(source="laion", clip_prompt="a photo of {subcategory}")
    with pytest.raises(ValidationError, match=r"per_subcategory\n.*[Ee]xtra"):
        ImageSourceConfig(per_subcategory=3)  # the caller's knob, not this block's
    with pytest.raises(ValidationError, match=r"max_side"):
        ImageSourceConfig(max_side=0)


# ---- LAION-style: URLs on a real local HTTP server ---------------------------------------------------

LAION_CAPTIONS = [
    "Casino night: roulette tables and poker chips",  # gamble, 3 distinct hits
    "a casino at night",  # gamble, 1
    "Slot machines in a row",  # gamble, 1 ("slot machine" + plural)
    "RANSOMWARE on an infected laptop",  # malware, 2
    "a sunset over the sea",  # no keyword: unassigned
    "a dead link",  # 404
    "not an image",  # text served as .jpg
    "a casino at night, again",  # same pixels as row 1: duplicate
]


@pytest.fixture
def laion_manifest(tmp_path, monkeypatch):
    web = tmp_path / "web"
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    for i, colour in enumerate(colours):
        save(image(colour, size=(48 + 8 * i, 40)), web / f"{i}.jpg", "JPEG")
    (web / "6.jpg").write_text("<html>moved</html>")
    (web / "7.jpg").write_bytes((web / "1.jpg").read_bytes())
    handler = functools.partial(_QuietHandler, directory=str(web))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    manifest = tmp_path / "laion.parquet"
    pd.DataFrame(
        {"URL": [f"{base}/{i}.jpg" for i in range(8)], "TEXT": LAION_CAPTIONS, "similarity": np.linspace(0.3, 0.4, 8)}
    ).to_parquet(manifest)
    yield manifest, base
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_laion_records_fetch_urls_and_record_http_errors(laion_manifest):
    manifest, base = laion_manifest
    records = ImageManifestDataset(str(manifest), fetch_timeout_s=5).load()
    assert list(records.columns) == RECORD_COLUMNS and len(records) == 8
    assert records.loc[5, "read_error"] == f"HTTP 404 for {base}/5.jpg"
    assert records["read_error"].notna().sum() == 1 and records.loc[0, "path"] == f"{base}/0.jpg"
    assert records.loc[3, "caption"] == "RANSOMWARE on an infected laptop"


def test_a_silent_server_times_out_into_a_read_error(tmp_path):
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg"
    try:
        pd.DataFrame({"url": [url], "caption": ["x"]}).to_parquet(tmp_path / "m.parquet")
        records = ImageManifestDataset(str(tmp_path / "m.parquet"), fetch_timeout_s=0.3).load()
    finally:
        silent.close()
    assert records.loc[0, "read_error"] == f"fetch failed for {url}: timed out" and records.loc[0, "data"] is None


def test_laion_keyword_assignment_keeps_the_best_scored(laion_manifest, taxonomy):
    records = ImageManifestDataset(str(laion_manifest[0])).load()
    cfg = ImageSourceConfig(source="laion", on_bad_row="quarantine")
    images, quarantine, report = images_from_laion(records, taxonomy, cfg, per_subcategory=2)
    # gamble: rows 0 (3 hits), 1 and 2 (1 hit each; 1 comes first); row 7 duplicates row 1.
    assert list(images["caption"]) == [LAION_CAPTIONS[3], LAION_CAPTIONS[0], LAION_CAPTIONS[1]]
    assert list(images["class3"]) == ["malware", "gamble", "gamble"] and set(images["source"]) == {"laion"}
    assert dict(zip(quarantine["row"], quarantine["reason"].str.split(":").str[0])) == {
        5: "HTTP 404 for http",
        6: "unreadable image",
        7: "duplicate of row 1",
    }
    assert report["unassigned"] == 1 and report["over_cap"] == 1 and report["images"] == 3
    with pytest.raises(ValueError, match=r"row 5 \(http://127\.0\.0\.1:\d+/5\.jpg\): HTTP 404"):
        images_from_laion(records, taxonomy, ImageSourceConfig(source="laion"), per_subcategory=2)
    strict = ImageSourceConfig(source="laion", on_bad_row="quarantine", min_keyword_hits=2)
    assert list(images_from_laion(records, taxonomy, strict, 2)[0]["class3"]) == ["malware", "gamble"]


def test_laion_clip_assignment_with_a_tiny_clip_directory(laion_manifest, taxonomy, tmp_path):
    texts = [*taxonomy["description"], *LAION_CAPTIONS] * 2
    build_tiny_clip(texts, seed=0).save(tmp_path / "clip")
    records = ImageManifestDataset(str(laion_manifest[0])).load()
    cfg = ImageSourceConfig(source="laion", on_bad_row="quarantine", assign="clip", clip_model=str(tmp_path / "clip"))
    # collect_source_images loads the CLIP directory itself (the real Auto* path).
    images, quarantine, report = collect_source_images(records, taxonomy, cfg.model_dump(), per_subcategory=1)

    scorer = ClipScorer(str(tmp_path / "clip"))
    good = [0, 1, 2, 3, 4]  # decodable, not duplicated
    pictures = [Image.open(io.BytesIO(records.loc[i, "data"])).convert("RGB") for i in good]
    prompts = [f"a photo about {s.class3}: {s.description}" for s in taxonomy.itertuples()]
    scores = scorer.scores(pictures, prompts)
    assert scores.shape == (5, 53) and np.all(np.abs(scores) <= 1.0 + 1e-5)
    best = scores.argmax(axis=1)
    # Every decodable image goes to its most similar subcategory; one kept per subcategory, the best scored.
    expected = {}
    for i, b in zip(good, best):
        if b not in expected or scores[good.index(i), b] > scores[good.index(expected[b]), b]:
            expected[b] = i
    assert sorted(images["caption"]) == sorted(LAION_CAPTIONS[i] for i in expected.values())
    assert set(images["class3"]) == {taxonomy["class3"][b] for b in expected}
    assert images.groupby("class3").size().max() == 1 and set(images["class3"]) <= set(taxonomy["class3"])
    assert report["unassigned"] == 0 and report["images"] + report["over_cap"] == 5
    assert len(quarantine) == 3  # 404, not-an-image, duplicate
