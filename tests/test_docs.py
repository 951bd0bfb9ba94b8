"""Every command README.md and bench/README.md show runs as written (issue 12, item 18) - as far as a test can tell
without weights or a cluster: each command is parsed by the program that would run it, never run.

* ``python SCRIPT ...``: the script exists and its own parser accepts exactly those arguments (the script's
  ``parse_args(argv)``; ``jobs/train.py``'s ``parse``); its ``--config`` file exists and its ``key=value`` overrides
  load on that config (unknown keys, bad values); files of this repository it names (``*.yaml``, ``*.py``) exist.
* ``clcae ...``: ``clcae.cli``'s parser accepts it; ``clcae weights fetch NAME`` names a known file.
* ``make X``: the Makefile has target X.  ``serve run X``: X is a Serve config (its builder and config exist) or
  an import path ``module:builder`` that exists.  ``ray up FILE`` / ``ray job submit ... -- CMD``: FILE exists,
  CMD is checked as above.

Commands come from fenced ``bash``/``sh``/unlabelled blocks (one per line, ``\\`` continuations joined, ``#``
comments dropped) and from inline code spans that start with a command.  Spans with a placeholder (``...``,
``NAME``, ``<id>``, ``[--optional]``) are synopses, not commands, and are skipped; so are mentions of a bare
(sub)command in prose (``ray job submit``).  Commands are checked as run from the repository root.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from clcae.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "bench/README.md")
PROGRAMS = ("python", "make", "clcae", "serve", "ray")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
# Scripts without parse_args whose main() parses its arguments and then calls load_config(...) before anything else
MAIN_PARSES_FIRST = ("serve/app.py",)
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|^\[|^[A-Z][A-Z_]+$")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def commands(doc: str) -> list[Command]:
    """The shell commands ``doc`` shows: code-block lines and inline spans that start with a program."""
    found: list[Command] = []
    lines = (ROOT / doc).read_text().splitlines()
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence is None:
            for span in re.findall(r"`([^`\n]+)`", line):
                argv = _split(span)
                if argv and argv[0] in PROGRAMS and not any(PLACEHOLDER.search(t) for t in argv):
                    found.append(Command(doc, number, span))
            continue
        if fence not in SHELL_BLOCKS:
            continue
        text = stripped[2:] if stripped.startswith("$ ") else stripped
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        argv = _split(text)
        if argv and argv[0] in PROGRAMS:
            found.append(Command(doc, start, text))
    return found


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return []


ALL = [c for doc in DOCS for c in commands(doc)]


def test_the_docs_show_commands():
    programs = {c.argv[0] for c in ALL}
    assert {"python", "make", "clcae", "serve", "ray"} <= programs
    # the command of issue 12 item 18 is among them
    assert any("bench/batch.py --images 2048 --batch 16 --actors 1" in c.text for c in ALL)


# ------------------------------------------------------------------------------------------------ checkers
_modules: dict[Path, ModuleType] = {}


def _script(path: Path) -> ModuleType:
    if path not in _modules:
        name = "docs_" + re.sub(r"\W", "_", str(path.relative_to(ROOT)))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


class _Parsed(Exception):
    def __init__(self, config: Any, overrides: list[str]):
        super().__init__()
        self.config, self.overrides = config, overrides


def _parse(module: ModuleType, args: list[str], cmd: Command, monkeypatch) -> tuple[Any, list[str]]:
    """(config path, overrides) of ``args`` as the script's own parser reads them; pytest.fail on a parse error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if hasattr(module, "parse_args"):
                ns = module.parse_args(args)
                overrides = list(getattr(ns, "overrides", None) or []) + list(getattr(ns, "set", None) or [])
                return getattr(ns, "config", None), overrides
            if hasattr(module, "parse"):  # jobs/train.py: (namespace, stage, overrides)
                ns, _, overrides = module.parse(args)
                return ns.config, list(overrides)
            # serve/app.py (owned with Serve) has no parse function yet: run its main up to the config load, which
            # records what the parser produced instead of loading anything. Any other script must have parse_args.
            if Path(module.__file__).resolve() not in {ROOT / p for p in MAIN_PARSES_FIRST}:
                pytest.fail(f"{cmd}\n  {module.__file__} has no parse_args(argv) for this test to call")

            def record(path: Any, overrides: Any = ()) -> None:
                raise _Parsed(path, list(overrides))

            monkeypatch.setattr(module, "load_config", record)
            try:
                module.main(args)
            except _Parsed as parsed:
                return parsed.config, parsed.overrides
            pytest.fail(f"{cmd}\n  {module.__file__} has no parse_args(argv) and its main never loaded a config")
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{cmd}\n  does not parse: {err.getvalue().strip().splitlines()[-1:]}")
    return None, []


def _repo_files(argv: list[str], cmd: Command) -> None:
    """Files of this repository that a command names (configs, scripts, cluster and Serve YAML) must exist."""
    for token in argv:
        value = token.split("=", 1)[1] if re.match(r"[\w.]+=", token) else token
        if "://" in value or value.startswith(("~", "/")):
            continue
        if value.endswith((".yaml", ".yml", ".py")) or value.startswith("configs/"):
            assert (ROOT / value).is_file(), f"{cmd}\n  names {value}, which does not exist in the repository"


def check_python(cmd: Command, argv: list[str], monkeypatch) -> None:
    assert len(argv) >= 2 and argv[1].endswith(".py"), f"{cmd}\n  expected `python SCRIPT.py ...`"
    path = ROOT / argv[1]
    assert path.is_file(), f"{cmd}\n  {argv[1]} does not exist"
    _repo_files(argv, cmd)
    config, overrides = _parse(_script(path), argv[2:], cmd, monkeypatch)
    if config is not None:
        assert (ROOT / str(config)).is_file(), f"{cmd}\n  --config {config} does not exist"
    try:
        load_config(ROOT / str(config) if config is not None else None, overrides)
    except ConfigError as exc:
        pytest.fail(f"{cmd}\n  its config and overrides do not load: {exc}")


def check_clcae(cmd: Command, argv: list[str]) -> None:
    from clcae.cli import build_parser
    from clcae.official import OFFICIAL

    parser = build_parser()
    words = {"weights", "fetch", "list", "check", "convert", "export"}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv[1:])
    except SystemExit:
        if set(argv[1:]) <= words:
            return  # a mention of a subcommand in prose, e.g. "`clcae weights fetch` downloads ..."
        pytest.fail(f"{cmd}\n  does not parse: {err.getvalue().strip().splitlines()[-1:]}")
    if getattr(ns, "cmd", None) == "fetch":
        assert ns.name == "all" or ns.name in OFFICIAL, f"{cmd}\n  {ns.name!r} is not in `clcae weights list`"
    _repo_files(argv, cmd)


def check_make(cmd: Command, argv: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    for target in (t for t in argv[1:] if "=" not in t and not t.startswith("-")):
        assert target in targets, f"{cmd}\n  the Makefile has no target {target!r} (it has {sorted(targets)})"


def _import_path(target: str, cmd: Command) -> None:
    module, _, attr = target.partition(":")
    file = ROOT / (module.replace(".", "/") + ".py")
    assert file.is_file(), f"{cmd}\n  {module} ({file.relative_to(ROOT)}) does not exist"
    names = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert attr in names, f"{cmd}\n  {file.relative_to(ROOT)} defines no {attr}"


def check_serve(cmd: Command, argv: list[str]) -> None:
    assert argv[1:2] in (["run"], ["deploy"]), f"{cmd}\n  only `serve run` and `serve deploy` are known"
    if len(argv) < 3:  # the command named in prose ("with `serve run`/`serve deploy` ..."): nothing to check
        return
    target = argv[2]
    if target.endswith((".yaml", ".yml")):
        _repo_files([target], cmd)
        spec = yaml.safe_load((ROOT / target).read_text())
        for app in spec["applications"]:
            _import_path(app["import_path"], cmd)
            config = (app.get("args") or {}).get("config")
            if config:
                assert (ROOT / config).is_file(), f"{cmd}\n  {target} names the config {config}, which does not exist"
    else:
        _import_path(target, cmd)
        _repo_files(argv[3:], cmd)


def check_ray(cmd: Command, argv: list[str], monkeypatch) -> None:
    if argv[1:3] == ["job", "submit"] and "--" in argv:
        inner = argv[argv.index("--") + 1:]
        if inner and inner[0] == "python":
            check_python(cmd, inner, monkeypatch)
        return
    _repo_files(argv, cmd)


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.doc}:{c.line}" for c in ALL])
def test_command_parses_as_written(cmd: Command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the READMEs' commands run from the repository root
    argv = cmd.argv
    program = argv[0]
    if program == "python":
        check_python(cmd, argv, monkeypatch)
    elif program == "clcae":
        check_clcae(cmd, argv)
    elif program == "make":
        check_make(cmd, argv)
    elif program == "serve":
        check_serve(cmd, argv)
    elif program == "ray":
        check_ray(cmd, argv, monkeypatch)


def test_config_files_the_docs_name_exist():
    for doc in DOCS:
        for name in set(re.findall(r"configs/[\w.-]+\.ya?ml", (ROOT / doc).read_text())):
            assert (ROOT / name).is_file(), f"{doc} names {name}, which does not exist"
