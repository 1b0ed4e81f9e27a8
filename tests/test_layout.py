"""The layering a newcomer relies on: the package's modules import downwards only and never in a circle, a
stage's module never imports another stage's module (what stages share lives in models/, judges/, training/,
datasets/ or the
package root), and the configuration imports without the training stack; tests use the package's public
names."""

from __future__ import annotations

import ast
import re

from conftest import PROJECT

SRC = PROJECT / "src"
PIPELINES = SRC / "spavl_kedro" / "pipelines"
SHARED = {"sharding"}  # pipelines/sharding.py: the resumable-shard helpers every stage uses

# The package's layers, lowest first, by top-level module or subpackage of spavl_kedro: a module imports its
# own layer or a lower one. `""` is the package's __init__.py.
LAYERS = [
    {"numerics", "seeding", "imaging", "grounding", "schema", "scenes", "metrics", "wording", "blocks"},  # helpers
    {"models"},  # model access: backend kinds and specs, tiny LLaVAs, local and served VLMs
    {"judges", "evalsets"},  # the judges, their kinds and specs; the evaluation sets
    {"training"},  # the methods table, each method's settings beside its trainer
    {"config", "datasets", "dryrun_endpoint", "smoke"},  # the stage blocks; catalog datasets; device checks
    {"config_docs", "pipelines", "serve_plan", "paper_dryrun"},  # the six stages and what plans them
    {"hooks", "run_names", "pipeline_registry", "compare", "sweep", ""},  # the Kedro project around them
    {"settings"},  # Kedro's settings.py: the hooks and the config loader
]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every spavl_kedro import in a module, type-checking and function-local ones too;
    `from a import b` names a.b when b is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spavl_kedro"):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("spavl_kedro")]
    return found


def _module_graph() -> dict[str, set[str]]:
    paths = {
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (SRC / "spavl_kedro").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        graph[module] = {
            target for _, target in _imports(ast.parse(path.read_text())) if target in paths and target != module
        }
    return graph


def _group(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_package_imports_downwards_only():
    """No module imports from a higher layer (LAYERS), so each layer can be read and tested without those
    above it; a new top-level module must be placed in a layer here."""
    layer = {group: n for n, groups in enumerate(LAYERS) for group in groups}
    graph = _module_graph()
    unplaced = sorted({_group(m) for m in graph} - set(layer))
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = [
        f"{module} (layer {layer[_group(module)]}) imports {target} (layer {layer[_group(target)]})"
        for module, targets in graph.items()
        for target in targets
        if layer[_group(target)] > layer[_group(module)]
    ]
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(sorted(upward))


def test_the_package_has_no_import_cycle():
    """Modules import each other in no circle, type-checking imports included: a cycle means neither
    module can be understood, or moved, without the other."""
    graph = _module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_no_stage_imports_another_stages_module():
    crossings = []
    for path in PIPELINES.rglob("*.py"):
        stage = path.relative_to(PIPELINES).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
            )
            for module in modules:
                if module.startswith("spavl_kedro.pipelines."):
                    other = module.split(".")[2]
                    if other != stage and other not in SHARED:
                        crossings.append(f"{path.relative_to(PROJECT)}:{node.lineno} imports {module}")
    assert not crossings, "a stage imports another stage's module:\n  " + "\n  ".join(crossings)


def test_tests_import_only_public_names_of_the_package():
    """A test written against a private helper pins an implementation detail and breaks on a rename that
    changes no behaviour; what a test needs is public (no leading underscore) in its module."""
    private = []
    for path in sorted((PROJECT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spavl_kedro"):
                private += [
                    f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not private, "tests import private names:\n  " + "\n  ".join(private)


# A path a doc names: in backticks or a markdown link, under one of the repository's top-level folders.
# Where the user puts their own files (keys, downloads, templates copied from model cards): named, never shipped.
USER_PLACED = ("conf/local/", "data/01_raw/benchmarks", "data/01_raw/spa_vl_official", "data/01_raw/judge_templates")
NAMED_PATH = re.compile(
    r"(?:`|\]\()((?:src|tests|docs|conf|benchmarks|notebooks|data/01_raw)/[A-Za-z0-9_./<>*{},-]+?)[`)#]"
)


def test_every_file_a_doc_names_exists():
    """README.md and docs/ name files by path; a rename that leaves a doc behind fails here. Patterns
    (`<stage>`, `*`, `{a,b}`) and the places where users put their own files are skipped."""
    missing = []
    for doc in [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]:
        for path in NAMED_PATH.findall(doc.read_text()):
            if any(c in path for c in "<>*{}") or path.startswith(USER_PLACED):
                continue
            if not (PROJECT / path.rstrip("/.")).exists() and not (doc.parent / path).exists():
                missing.append(f"{doc.relative_to(PROJECT)}: {path}")
    assert not missing, "docs name files that do not exist:\n  " + "\n  ".join(missing)
