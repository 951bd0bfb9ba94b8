"""What every command line of the platform (jobs/, bench/) shares: where the shipped configs are, and how
``key=value`` config overrides are told apart from option values.

    parser.add_argument("--config", type=config_file, default=default_config("tiny"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_with_overrides(parser, argv)

* :func:`default_config` names a shipped config by its absolute path, so a default works from any folder (not
  only from the repository root, which ``default="configs/tiny.yaml"`` needed).
* :func:`config_file` (an argparse ``type``) keeps a ``--config`` path as typed when it exists where the user
  is, and otherwise finds a shipped config named relative to the repository (``configs/ffhq.yaml``); so does
  ``load_config`` itself, for the entry points that pass the path on as typed (jobs/train.py, serve/app.py).
* :func:`parse_with_overrides` moves every ``key=value`` override out of the way before argparse runs: an option
  with ``nargs="+"`` (``--actors 1 2``, ``--input a b``) otherwise swallows the override that follows it and
  fails (``invalid int value``) or, worse, takes it for an input.  An option's own value stays its own, even when
  it looks like ``NAME=VALUE`` (``--edit smile=2.0``, ``--set loss.l2=1``: options whose metavar has a ``=``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from clcae.config import REPO_ROOT, find_config

CONFIG_DIR = REPO_ROOT / "configs"

# A config override: a dotted key (loss.lpips, directions.smile.path), '=', anything.  A URI or a path with '='
# in it (s3://b/year=2020, data/year=2020) does not match: its key part has ':' or '/'.
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def default_config(name: str = "tiny") -> str:
    """The absolute path of the shipped ``configs/{name}.yaml``: a ``--config`` default that works from any folder."""
    return str(CONFIG_DIR / f"{name}.yaml")


def config_file(value: str) -> str:
    """argparse ``type`` of ``--config``: :func:`clcae.config.find_config` (the path as typed when that file exists,
    else a shipped config named relative to the repository, else as typed for ``load_config`` to report missing),
    so the namespace shows the file that will be read."""
    return str(find_config(value))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                         dest: str = "overrides") -> argparse.Namespace:
    """``parser.parse_intermixed_args`` with every ``key=value`` override that is not an option's value collected
    into ``args.<dest>`` (in the order given), wherever it stands on the line."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(parser, argv)
    # parse_intermixed_args refuses parsers with subcommands; with the overrides out of the way, plain parsing
    # of a subcommand line accepts options in any order too.
    subcommands = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)  # noqa: SLF001
    args = parser.parse_args(rest) if subcommands else parser.parse_intermixed_args(rest)
    if not hasattr(args, dest):  # this (sub)command takes no overrides: say so rather than drop them
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return args
    setattr(args, dest, overrides + list(getattr(args, dest) or []))
    return args


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(arguments for argparse, overrides): walks ``argv`` as argparse will, so an option's values stay with it."""
    rest: list[str] = []
    overrides: list[str] = []
    current = parser
    takes = 0            # values the last option still takes for sure (nargs None or N)
    list_kv = False      # inside a list option whose items are KEY=VALUE (``--set``)
    after_dashes = False
    for token in argv:
        if after_dashes:
            rest.append(token)
            continue
        if takes:
            rest.append(token)
            takes -= 1
            continue
        if token == "--":
            after_dashes = True
            rest.append(token)
            continue
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            action = _option(current, token)
            takes, list_kv = _arity(action, token)
            rest.append(token)
            continue
        if OVERRIDE.match(token) and not list_kv:
            overrides.append(token)
            continue
        sub = _subparser(current, token)
        if sub is not None:  # a subcommand: its own options from here on
            current, list_kv = sub, False
        rest.append(token)
    return rest, overrides


def _option(parser: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public lookup of an option string
    name = token.split("=", 1)[0]
    if name in actions:
        return actions[name]
    matches = [a for s, a in actions.items() if s.startswith(name) and s.startswith("--")]
    return matches[0] if parser.allow_abbrev and len({id(a) for a in matches}) == 1 else None


def _arity(action: argparse.Action | None, token: str) -> tuple[int, bool]:
    """(values the option surely takes next, whether it is a list of KEY=VALUE items)."""
    if action is None or "=" in token:  # unknown (argparse will say so) or --opt=value
        return 0, False
    nargs = action.nargs
    kv = "=" in str(action.metavar or "")
    if nargs is None:
        return 1, False
    if isinstance(nargs, int):
        return nargs, False
    if nargs in ("*", "+", argparse.REMAINDER):
        return 0, kv
    return 0, False  # "?" and flags: the next token is a value only if it is not an override


def _subparser(parser: argparse.ArgumentParser, token: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction) and token in action.choices:  # noqa: SLF001
            return action.choices[token]
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
