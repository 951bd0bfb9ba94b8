"""The one base class of the platform's user-facing errors.

Every error that means "the user must fix something" (a config key, a missing file, a bad input, unreachable
storage) derives from :class:`CLCAEError`, next to the builtin base it always had (most are ``ValueError``), so
code that catches ``ValueError`` keeps working.  The command lines (``clcae.cli_args.run_job``) print such an
error as one line, ``error: <message>``, and exit 2; anything else is a bug and keeps its traceback.

This module imports nothing: every other module may import it.
"""

from __future__ import annotations


class CLCAEError(Exception):
    """A mistake the user can fix (config, paths, inputs, models, storage): its message says what and how.

    ``exit_code`` is what a command line exits with when this error stops it (2: the job could not start).
    """

    exit_code: int = 2


class ClusterCapacityError(CLCAEError, ValueError):
    """A job or app asks a Ray cluster that cannot grow for more CPUs or GPUs than it has: Ray would leave the
    actors pending and the job would wait forever without a word, so it is refused before it starts."""
