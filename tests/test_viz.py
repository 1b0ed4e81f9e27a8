"""kedro-viz: every dataset sits in one of the project's layers, every name is readable, and the static build
(`make viz` = `kedro viz build`) renders the pipelines in a real browser.

The browser test uses Debian's chromium (`make browser` installs it; `make test` runs that first), serves the
build over http (the app fetches /api/main by absolute path, so file:// shows an empty page), opens it headless
and reads the rendered DOM. The screenshots stay in tests/artifacts/ (git ignores it) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import parse
import pytest
import yaml
from browser import ARTIFACTS, render, stop
from conftest import PROJECT, copy_project

from spavl_kedro.pipeline_registry import STAGES, register_pipelines

pytestmark = pytest.mark.slow  # make test runs it; make test-fast leaves it out

# The layers top to bottom, as conf/base/catalog.yml's header explains: they follow the stages, not the
# data/0N_ folders (the chain feeds model outputs back into training, so primary -> models -> model_output
# would be a cycle); `reporting` holds what no stage consumes (the preflight checks).
LAYERS = (
    "raw",
    "taxonomy",
    "dataset",
    "responders",
    "responses",
    "preferences",
    "splits",
    "policy",
    "evaluation",
    "reporting",
)
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")  # what a default name never is: "<lambda>([x]) -> [y]"
WINDOW = (1600, 1000)


def _catalog(env: str) -> dict:
    """conf/<env>/catalog.yml's entries, with each dataset factory ("aligned_{method}") also expanded for
    every name the pipelines use that it matches, as Kedro resolves them."""
    entries = yaml.safe_load((PROJECT / "conf" / env / "catalog.yml").read_text()) or {}
    entries = {name: entry for name, entry in entries.items() if not name.startswith("_")}  # _x: YAML anchors
    patterns = {name: entry for name, entry in entries.items() if "{" in name}
    used = set().union(*(_datasets(p) for p in register_pipelines().values()))
    for name in sorted(used - set(entries)):
        match = next((entry for pattern, entry in patterns.items() if parse.parse(pattern, name)), None)
        if match is not None:
            entries[name] = match
    return entries


def _layer(entry: dict) -> str | None:
    return ((entry.get("metadata") or {}).get("kedro-viz") or {}).get("layer")


def _datasets(pipeline) -> set[str]:
    return {name for name in pipeline.datasets() if not name.startswith("params:") and name != "parameters"}


@pytest.fixture(scope="module")
def pipelines() -> dict:
    return register_pipelines()


# ---- fast: configuration and names ----


@pytest.mark.parametrize("env", ["base", "paper"])
def test_every_catalog_entry_has_a_known_layer(env):
    wrong = {name: _layer(entry) for name, entry in _catalog(env).items() if _layer(entry) not in LAYERS}
    assert not wrong, f"conf/{env}/catalog.yml: entries without metadata.kedro-viz.layer in {LAYERS}: {wrong}"


def test_every_pipeline_dataset_is_declared_with_a_layer(pipelines):
    """A dataset the catalog does not declare is an undeclared MemoryDataset: kedro-viz draws it outside
    every layer band. Declare it (type: MemoryDataset) with its layer."""
    catalog = _catalog("base")
    used = set().union(*(_datasets(p) for p in pipelines.values()))
    missing = sorted(name for name in used if _layer(catalog.get(name, {})) is None)
    assert not missing, f"datasets used by pipelines but without a layer in conf/base/catalog.yml: {missing}"


def test_layers_follow_the_data_flow(pipelines):
    """No node writes into a layer above one it reads, so kedro-viz can stack the bands in LAYERS order."""
    layer = {name: _layer(entry) for name, entry in _catalog("base").items()}
    upward = [
        f"{node.name}: {source} ({layer[source]}) -> {target} ({layer[target]})"
        for pipeline in pipelines.values()
        for node in pipeline.nodes
        for source in _datasets(pipeline).intersection(node.inputs)
        for target in node.outputs
        if LAYERS.index(layer[source]) > LAYERS.index(layer[target])
    ]
    assert not upward, "edges going up the layer order:\n" + "\n".join(sorted(set(upward)))


def test_node_and_dataset_names_are_readable(pipelines):
    nodes = {node.name for pipeline in pipelines.values() for node in pipeline.nodes}
    datasets = set().union(*(_datasets(p) for p in pipelines.values()))
    unreadable = sorted(name for name in nodes | datasets | set(pipelines) - {"__default__"} if not SNAKE.match(name))
    assert not unreadable, f"not snake_case (a Node without name= gets its function's repr): {unreadable}"
    assert {"train_dpo", "train_sft", "train_reward", "policy_base", "aligned_dpo"} <= nodes | datasets


# ---- the static build, in JSON and in a browser ----


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """`kedro viz build` (what `make viz` runs) in a copy of the project; its ./build directory."""
    root = copy_project(tmp_path_factory.mktemp("viz") / "project")
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    kedro = Path(sys.executable).parent / "kedro"
    done = subprocess.run([str(kedro), "viz", "build"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"kedro viz build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root / "build"


def _api(build: Path, *parts: str) -> dict:
    return json.loads((build / "api").joinpath(*parts).read_text())


def test_build_lists_every_pipeline_with_its_nodes(build, pipelines):
    main = _api(build, "main")
    assert set(STAGES) == {"taxonomy", "generate", "judge", "split", "align", "evaluate"}
    assert {p["id"] for p in main["pipelines"]} == set(pipelines)
    assert main["selected_pipeline"] == "__default__"
    for name, pipeline in pipelines.items():
        built = _api(build, "pipelines", name)
        assert built["selected_pipeline"] == name
        tasks = {n["name"] for n in built["nodes"] if n["type"] == "task" and name in n["pipelines"]}
        assert tasks == {node.name for node in pipeline.nodes}, name


def test_build_puts_every_dataset_in_its_layer(build, pipelines):
    catalog = _catalog("base")
    data = {
        node["name"]: node
        for name in pipelines
        for node in _api(build, "pipelines", name)["nodes"]
        if node["type"] == "data"
    }
    assert len(data) > 60 and set(data) <= set(catalog)
    assert {name: node["layer"] for name, node in data.items()} == {name: _layer(catalog[name]) for name in data}
    main = _api(build, "main")
    assert set(main["layers"]) == {node["layer"] for node in data.values()}
    # kedro-viz sorts layers topologically over every pipeline: the stages' layers come out in LAYERS order;
    # a layer only raw feeds (preflight's reporting) may land anywhere after raw.
    stages = {n["layer"] for n in main["nodes"] if n["type"] == "data"}
    assert [layer for layer in main["layers"] if layer in stages] == [layer for layer in LAYERS if layer in stages]
    by_name = {n["name"]: n for n in main["nodes"]}
    assert by_name["train_dpo"]["type"] == "task" and "align" in by_name["train_dpo"]["pipelines"]
    assert by_name["policy_base"]["layer"] == "policy"
    assert by_name["policy_base"]["dataset_type"].endswith("ModelDirectoryDataset")


class _Rendered(HTMLParser):
    """What kedro-viz drew: the pipeline selector (current label and options), the graph's nodes with their
    label text ({(type, name): label}), and the layer bands top to bottom."""

    def names(self, kind: str) -> set[str]:
        return {name for node_kind, name in self.nodes if node_kind == kind}

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.depth, self.selector_depth, self.node = 0, None, None
        self.in_label = self.in_layer = self.in_text = False
        self.selected, self.options, self.nodes, self.layers = "", [], {}, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if a.get("data-test") == "kedro-pipeline-selector":
            self.selector_depth = self.depth
        inside = self.selector_depth is not None and self.depth > self.selector_depth
        if inside and "dropdown__label" in classes:
            self.in_label = True
        if inside and "menu-option__content" in classes:
            self.options.append(a.get("title"))
        if tag == "g" and "pipeline-node" in classes and "data-node-fullname" in a:
            self.node = (a.get("data-node-type"), a["data-node-fullname"])  # a task and a dataset may share a name
            self.nodes[self.node] = ""
        if tag == "text" and "pipeline-node__text" in classes:
            self.in_text = True
        if tag == "li" and "pipeline-layer-name" in classes:
            self.in_layer = True
            self.layers.append("")
        if tag not in self.VOID:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        self.depth -= 1
        if self.selector_depth is not None and self.depth <= self.selector_depth:
            self.selector_depth = None
        if tag == "button":
            self.in_label = False
        if tag == "li":
            self.in_layer = False
        if tag == "text":
            self.in_text = False
        if tag == "g":
            self.node = None

    def handle_data(self, data):
        if self.in_label:
            self.selected += data.strip()
        if self.in_layer:
            self.layers[-1] += data.strip()
        if self.node is not None and self.in_text:
            self.nodes[self.node] += data.strip()


@pytest.fixture(scope="module")
def served(build):
    """The build on http://127.0.0.1:<free port>/, plus a page that turns off the "new feature" walkthrough
    (kedro-viz keeps that setting in localStorage, per origin) before it opens the app."""
    (build / "shot.html").write_text(
        '<!doctype html><script>localStorage.setItem("KedroViz", JSON.stringify({showFeatureHints: false}));'
        'location.replace("./index.html" + location.search);</script>\n'
    )
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(build)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        banner = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
        port = re.search(r"port (\d+)", banner)
        assert port, f"http.server did not start: {banner!r}"
        url = f"http://127.0.0.1:{port.group(1)}"
        with urllib.request.urlopen(f"{url}/api/main", timeout=10) as response:
            assert response.status == 200
        yield url
    finally:
        stop(server)


def _open(url: str, screenshot: Path, profile: Path) -> _Rendered:
    """Headless chromium: the DOM after 10 s of virtual time (the graph lays out after its data loads),
    and a screenshot of the same moment. The layout runs in a web worker on real time, so on a loaded
    machine the screenshot can come before the drawing: then the page is opened once more, with 30 s."""
    page = _chromium_run(url, screenshot, profile, budget_ms=10_000)
    if _drawn_pixels(screenshot) <= DRAWN_SHARE * GRAPH_AREA:
        page = _chromium_run(url, screenshot, profile, budget_ms=30_000)
    return page


def _chromium_run(url: str, screenshot: Path, profile: Path, budget_ms: int) -> _Rendered:
    return _Rendered(render(url, screenshot, profile, budget_ms, WINDOW))


def _assert_drawn(png: Path) -> None:
    """A real picture: the window's size, many colours, and a graph area that is not one flat background."""
    from PIL import Image, ImageStat

    assert png.stat().st_size > 20_000, png
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == WINDOW
        rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 20)) > 100
    drawn = _drawn_pixels(png)
    assert drawn > DRAWN_SHARE * GRAPH_AREA, f"{png}: graph area nearly empty ({drawn} pixels)"
    assert ImageStat.Stat(_graph_area(png)).stddev[0] > 2


# Right of the sidebar, toolbar, layer names and minimap. The whole lineage at 10% zoom covers ~0.8% of it,
# the align pipeline ~3%; a graph that failed to render leaves only the version tag (<0.1%).
GRAPH_BOX = (700, 0, WINDOW[0], WINDOW[1])
GRAPH_AREA = (GRAPH_BOX[2] - GRAPH_BOX[0]) * (GRAPH_BOX[3] - GRAPH_BOX[1])
DRAWN_SHARE = 0.003


def _graph_area(png: Path):
    from PIL import Image

    with Image.open(png) as image:
        return image.convert("RGB").crop(GRAPH_BOX).convert("L")


def _drawn_pixels(png: Path) -> int:
    """Pixels of the graph area that differ from its background; 0 when there is no screenshot."""
    if not png.is_file():
        return 0
    graph = _graph_area(png)
    background = max(graph.getcolors(maxcolors=256))[1]
    return sum(count for count, shade in graph.getcolors(maxcolors=256) if abs(shade - background) > 24)


def test_browser_shows_every_pipeline_and_the_layers(served, pipelines, build, tmp_path):
    shot = ARTIFACTS / "viz_default.png"
    page = _open(f"{served}/shot.html?pid=__default__", shot, tmp_path / "profile")
    assert page.selected == "__default__"
    assert set(STAGES) <= set(page.options) and set(page.options) == set(pipelines)
    assert page.names("task") == {node.name for node in pipelines["__default__"].nodes}
    assert page.names("data") == _datasets(pipelines["__default__"])
    assert page.nodes["task", "train_dpo"] == "train_dpo"  # "Pretty name" is off: names as written
    assert page.nodes["data", "policy_base"] == "policy_base"
    assert page.layers == [layer for layer in LAYERS if layer in page.layers] and page.layers[0] == "raw"
    assert set(page.layers) == {
        d["layer"]
        for d in _api(build, "pipelines", "__default__")["nodes"]
        if d["type"] == "data" and "__default__" in d["pipelines"]
    }
    _assert_drawn(shot)


def test_browser_shows_the_align_pipeline_and_its_model_nodes(served, pipelines, tmp_path):
    shot = ARTIFACTS / "viz_align.png"
    page = _open(f"{served}/shot.html?pid=align", shot, tmp_path / "profile")
    assert page.selected == "align"
    assert page.names("task") == {node.name for node in pipelines["align"].nodes}
    assert page.names("data") == _datasets(pipelines["align"])  # only align is drawn
    assert page.nodes["task", "train_dpo"] == "train_dpo"
    assert {"policy_base", "aligned_dpo", "aligned_reward"} <= page.names("data")
    assert {"policy", "splits"} <= set(page.layers)
    _assert_drawn(shot)
