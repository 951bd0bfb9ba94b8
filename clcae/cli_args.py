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
* :func:`add_verbose` adds ``-v/--verbose`` (Ray's own output on the console, see ``clcae.train.runtime``).
* :func:`run_job` (or the decorator :func:`job` on ``main``) ends every entry point the same way: a user's
  mistake (:class:`clcae.errors.CLCAEError`) is one line ``error: <message>`` on stderr and exit 2, Ctrl-C is
  exit 130 with a one-line note, anything else is a bug and keeps its traceback (exit 1); the job's last line
  says where Ray's logs are, when it started Ray.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from clcae.config import REPO_ROOT, find_config
from clcae.errors import CLCAEError

CONFIG_DIR = REPO_ROOT / "configs"

# A config override: a dotted key (loss.lpips, directions.smile.path), '=', anything.  A URI or a path with '='
# in it (s3://b/year=2020, data/year=2020) does not match: its key part has ':' or '/'.
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose``: Ray's own output (workers, Ray Data, Ray Train) on the console, not only in its logs."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print Ray's own output too (by default it goes to the Ray session's log files)")


def run_job(main: Callable[[], int | None]) -> int:
    """Run a job's ``main()`` and turn how it ended into an exit status (``sys.exit(run_job(main))``).

    * ``CLCAEError`` (a config key, a missing file or model, a bad input, unreachable storage): ``error: <message>``
      on stderr, no traceback, exit ``exc.exit_code`` (2: the job could not start).
    * ``KeyboardInterrupt``: a one-line note, exit 130 (128 + SIGINT, as shells report it).
    * anything else is a bug: its traceback, exit 1.

    Whatever happened, once Ray was started the last line says where its logs are.
    """
    from clcae.train.runtime import ray_logs_note

    try:
        code = main()
    except CLCAEError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); outputs written so far are kept, and re-running the same command resumes",
              file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001 - a bug: the traceback is what whoever fixes it needs
        traceback.print_exc()
        code = 1
    note = ray_logs_note()
    if note:
        print(note, file=sys.stderr)
    return 0 if code is None else int(code)


def job(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorator of a job's ``main(argv=None)``: the same function, ending as :func:`run_job` says (so tests that
    call ``main([...])`` get the exit status and the ``error:`` line, as a user does)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        return run_job(lambda: main(*args, **kwargs))

    return wrapper


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (some messages list what is wrong one item per line)."""
    text = str(exc) or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


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
