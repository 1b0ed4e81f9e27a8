"""Every command the README, CONTRIBUTING and docs/ show, in a code block or an inline code span, still
validates: a `make` target exists (and its ARGS / SMOKE_ARGS / DRYRUN_ARGS validate as what they feed), a
`kedro run` parses with Kedro's own `run` command, its environment, pipeline and nodes exist and its
`--params` pass the configuration checks on top of that environment, and a `python -m` module or
benchmark script knows every option used. Commands of other projects (SPA-VL's trainers, vLLM) are left
out by name. The README's official-data command also runs, on a release fixture: test_end_to_end.py."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import PROJECT

PAGES = [PROJECT / "README.md", PROJECT / "CONTRIBUTING.md", *sorted((PROJECT / "docs").glob("*.md"))]
OURS = re.compile(
    r"^(make |(\.venv/bin/)?kedro run|(\.venv/bin/)?python -m spavl_kedro|(\.venv/bin/)?python benchmarks/)"
)
# other projects' commands shown for reference (SPA-VL-RLHF's trainers, vLLM, the shell): not ours to check
THEIRS = ("accelerate launch", "torchrun", "vllm ", "export ", "bash ", "curl ", "git ", "cd ")


def _commands(page: Path) -> list[str]:
    """The project's commands on a page: the lines of its code blocks (continuations joined, comments and
    shell plumbing cut) and its inline code spans."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", "").splitlines():  # as the shell joins a continued line
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            found += [part.split(" > ")[0].strip() for part in line.split("&&")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`([^`\n]+)`", prose)
    return [c for c in found if OURS.match(c) and not c.startswith(THEIRS) and "<" not in c and "..." not in c]


COMMANDS = sorted({(page.relative_to(PROJECT).as_posix(), c) for page in PAGES for c in _commands(page)})


def test_the_docs_show_commands_of_every_kind():
    kinds = {re.sub(r"^\.venv/bin/", "", c).split()[0] + (" -m" if " -m " in c else "") for _, c in COMMANDS}
    assert {"make", "kedro", "python", "python -m"} <= kinds, kinds
    assert len(COMMANDS) > 30


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (PROJECT / "Makefile").read_text(), re.M))


def _help(main, where: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0, f"{where} --help failed"
    return out.getvalue()


def _check_options(args: list[str], usage: str, where: str) -> None:
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in usage]
    assert not unknown, f"{where}: options {unknown} are not in its --help"


def _check_kedro_run(args: list[str], where: str) -> None:
    from kedro.framework.cli.project import run
    from kedro.framework.project import pipelines

    from spavl_kedro.config import validate_parameters

    parsed = run.make_context("run", list(args)).params  # Kedro's own parser: unknown options fail here
    env = parsed.get("env") or "base"
    assert (PROJECT / "conf" / env).is_dir(), f"{where}: no conf/{env}"
    _bootstrapped()
    name = parsed.get("pipeline") or "__default__"
    assert name in pipelines, f"{where}: no pipeline {name!r}; known: {sorted(pipelines)}"
    nodes = {node.name for node in pipelines[name].nodes}
    for key in ("node_names", "from_nodes", "to_nodes"):
        missing = sorted(set(parsed.get(key) or ()) - nodes)
        assert not missing, f"{where}: pipeline {name!r} has no nodes {missing}"
    params = copy.deepcopy(_parameters(env))
    _merge(params, parsed.get("params") or {})
    validate_parameters(params)  # raises naming the bad key


@functools.cache
def _bootstrapped() -> None:
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT)


@functools.cache
def _parameters(env: str) -> dict:
    from spavl_kedro.config import load_parameters

    return load_parameters(env)


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _benchmark_main(script: str):
    path = PROJECT / script
    assert path.is_file(), f"{script} does not exist"
    if str(path.parent) not in sys.path:  # as when run as a script: its own folder first on the path
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def check(command: str, where: str) -> None:
    words = shlex.split(re.sub(r"^\.venv/bin/", "", command))
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w]
        assert set(targets) <= _make_targets(), f"{where}: make targets {targets} not in the Makefile"
        for setting in (w for w in words[1:] if "=" in w):
            var, value = setting.split("=", 1)
            if var == "ARGS":
                _check_kedro_run(shlex.split(value), where)
            elif var == "SMOKE_ARGS":
                from spavl_kedro.smoke import main

                _check_options(shlex.split(value), _help(main, "smoke"), where)
            else:
                assert f"$({var})" in (PROJECT / "Makefile").read_text(), f"{where}: the Makefile reads no {var}"
    elif words[:2] == ["kedro", "run"]:
        _check_kedro_run(words[2:], where)
    elif words[:2] == ["python", "-m"]:
        main = importlib.import_module(words[2]).main
        _check_options(words[3:], _help(main, words[2]), where)
        if words[2] == "spavl_kedro.sweep":  # each --grid key=a,b is a parameter: its first value must validate
            grids = [words[i + 1] for i, w in enumerate(words) if w == "--grid"]
            _check_kedro_run(["--params", ",".join(g.split(",")[0] for g in grids)], where)
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        _check_options(words[2:], _help(_benchmark_main(words[1]), words[1]), where)
    else:
        pytest.fail(f"{where}: no rule checks {command!r}")


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_documented_command_validates(page, command):
    check(command, f"{page}: `{command}`")


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("kedro run --pipeline algn", "no pipeline 'algn'"),
        ("kedro run --params align.dpo.betta=0.2", "betta"),
        ("kedro run --pipeline align --nodes train_sftt", "no nodes .'train_sftt'"),
        ("kedro run --pipline align", "No such option"),
        ("make runn", "not in the Makefile"),
        (".venv/bin/python benchmarks/split_scale.py --pairz 10", "--pairz"),
        (".venv/bin/python -m spavl_kedro.compare --bogus", "--bogus"),
    ],
)
def test_a_broken_command_fails_the_check_naming_what_is_wrong(command, named):
    with pytest.raises(Exception, match=named):
        check(command, "a broken example")
