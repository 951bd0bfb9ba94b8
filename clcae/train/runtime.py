"""Starting or joining Ray, and what a job prints, the same way for every job.

A job's console is for its user: our progress lines, the summary, where the outputs went (and, at the end,
where Ray's own logs are).  Ray's internals (actor and worker output, Ray Data's operator tables and progress
bars, Ray Train's controller messages) go to the files of the Ray session unless ``--verbose``::

    configure_output(args.verbose)      # first thing in main(): our logging, Ray's knobs in the environment
    init_ray()                          # log_to_driver=verbose, the "ray" logger at WARNING unless verbose
    ...
    print(ray_logs_note())              # "Ray's logs: /tmp/ray/session_.../logs" (clcae.cli_args.run_job does it)

Every knob is Ray's own, set here and nowhere else:

* ``ray.init(log_to_driver=False)``: workers' and actors' stdout/stderr stay in ``<session>/logs/worker-*``
  (Ray Train's controller and workers, Ray Data's split coordinator and map actors, Serve's replicas).
* ``ray.init(logging_level=WARNING)``: the driver's ``ray`` logger ("Started a local Ray instance", ...);
  ``RAY_SERVE_LOG_TO_STDERR=0`` and the ``ray.serve`` logger at WARNING: Serve's lines; ``RAY_COLOR_PREFIX=0``
  outside a terminal: the errors Ray pushes to the driver come without colour codes.
* ``RAY_DATA_LOGGING_CONFIG``: Ray Data's logging config (:data:`DATA_LOGGING`), Ray's default but for the
  console handler's level (ERROR; ``<session>/logs/ray-data/ray-data.log`` still gets everything) and a handler
  that prints Ray Data's non-interactive progress block as one line per interval
  (``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds, 10 unless set).  In a terminal Ray Data draws one progress
  bar per dataset (``DataContext.enable_operator_progress_bars = False``: no bar per operator).
* Training progress is one line per ``train.log_every`` steps, printed by the driver
  (:mod:`clcae.train.progress`), not by the workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

log = logging.getLogger("clcae")

# The session folder of the Ray this process started or joined (its logs are under logs/), for the final note.
_session_dir: str | None = None
_verbose = False
_knobs_set = False

PROGRESS_INTERVAL_S = "10"

# Ray Data's logging config for our jobs: Ray's default (ray/data/_internal/logging.py DEFAULT_CONFIG) with the
# console at ERROR - the session's logs/ray-data/ray-data.log still gets everything - and Ray Data's
# non-interactive progress block printed as one line per interval by DataProgressHandler.
DATA_LOGGING: dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
    "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"}},
    "handlers": {
        "file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                 "filename": "ray-data.log"},
        "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "ERROR",
                    "filters": ["console_filter"]},
        "progress": {"class": "clcae.train.runtime.DataProgressHandler"},
    },
    "loggers": {
        "ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False},
        "ray.data._internal.progress.logging_progress": {"level": "INFO", "handlers": ["progress"]},
    },
}


def data_logging_config() -> str:
    """The path of :data:`DATA_LOGGING` as a YAML file (Ray Data reads a file): one per content, in the temp
    folder, so every job and every Ray worker started from it reads the same file."""
    text = yaml.safe_dump(DATA_LOGGING, sort_keys=False)
    path = Path(tempfile.gettempdir()) / f"clcae-ray-data-logging-{hashlib.sha1(text.encode()).hexdigest()[:10]}.yaml"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a concurrent job never reads half a file
    return str(path)


def configure_output(verbose: bool = False) -> None:
    """Console logging for a job: our INFO lines as plain text on stderr, other libraries' warnings; with
    ``verbose``, everything at INFO with timestamps and logger names, and Ray's own console output untouched.

    Sets Ray's environment knobs too, so call it before Ray starts; ``init_ray`` sets those knobs itself (but
    leaves the logging of a process that did not call this, e.g. a bench script, as it is)."""
    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    for handler in root.handlers[:]:  # a job's main() may run twice in one process (tests)
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.INFO)
    else:
        handler.setFormatter(_PlainFormatter())
        root.setLevel(logging.WARNING)  # third-party INFO (httpx requests, fsspec) is not for the user
        logging.getLogger("clcae").setLevel(logging.INFO)
    root.addHandler(handler)
    if not verbose:
        _quiet_ray_knobs()


def _quiet_ray_knobs() -> None:
    """Ray's own settings for a quiet console (environment variables Ray reads when it starts or is imported)."""
    global _knobs_set
    if _knobs_set:
        return
    _knobs_set = True
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", data_logging_config())
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", PROGRESS_INTERVAL_S)
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # Serve's log lines: to its files (read at import)
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the errors Ray pushes to the driver: no colour codes
    # Ray Data reads its logging config when it is imported; a job may have imported it already.
    if "ray.data" in sys.modules:
        from ray.data._internal.logging import configure_logging

        configure_logging()


class _StderrHandler(logging.StreamHandler):
    """The job's console handler: writes to whatever ``sys.stderr`` is when a line is logged (a test's capture,
    a redirect), not to the stream of the moment it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _PlainFormatter(logging.Formatter):
    """Our lines as they are; a warning or error says so (and whose it is)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


# Ray starts its workers at nice 15, below the driver and everything else on the machine. On a machine of its own
# that costs nothing; on one shared with anything else (a plain script, other jobs, tests) the job's actors get a
# fraction of the CPU a plain loop gets (bench/batch.py, 2 cores shared with other work: the inversion actor took
# 1.8-3x the plain loop's wall time per image for the same model). A local cluster runs the user's own job: its
# workers keep the user's priority. A cluster started with `ray start` keeps its own setting.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


def init_ray(num_cpus: int | None = None, verbose: bool | None = None) -> str | None:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local one; returns the
    session folder (Ray's logs are in its ``logs/``).  ``verbose`` (default: what :func:`configure_output` was
    told) lets Ray print its workers' output and its own INFO lines.

    Locally, logical CPUs are set above the physical ones: with exactly one CPU per core, Train workers leave
    Ray Data no CPU budget and the input pipeline stalls (ray issue #44687).
    """
    global _session_dir
    verbose = _verbose if verbose is None else verbose
    if not verbose:
        _quiet_ray_knobs()
    import ray

    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # not 32 footer-reader processes
    if ray.is_initialized():
        _session_dir = _session_dir or _current_session_dir()
        return _session_dir
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        # A local cluster's token notice is not the user's business.
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        # Serve's driver-side logger streams at INFO whatever RAY_SERVE_LOG_TO_STDERR says, and is reset to INFO
        # when ray.serve is imported: import it now (half a second), then set its level.
        import ray.serve  # noqa: F401

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(**quiet)  # RAY_ADDRESS names the cluster
    else:
        context = ray.init(num_cpus=num_cpus or max(4, (os.cpu_count() or 2) * 2), include_dashboard=False,
                           _system_config=LOCAL_SYSTEM_CONFIG, **quiet)
    _session_dir = (getattr(context, "address_info", None) or {}).get("session_dir") or _current_session_dir()
    ctx = ray.data.DataContext.get_current()
    # In a terminal: one progress bar per dataset, not one per operator (outside one Ray Data logs progress,
    # which the handler of ray_data_logging.yaml prints as one line per interval).
    ctx.enable_operator_progress_bars = verbose or not sys.stdout.isatty()
    return _session_dir


def fixed_size_cluster() -> bool:
    """Whether the Ray cluster of this process cannot grow: the local one :func:`init_ray` starts when RAY_ADDRESS is
    unset.  A cluster named by RAY_ADDRESS (``ray job submit``, ``ray up``) may have an autoscaler that adds nodes
    for actors that wait, so waiting there is right."""
    return not os.environ.get("RAY_ADDRESS")


def require_resources(need: dict[str, float], available: dict[str, float], who: str, fix: str) -> None:
    """Raise ClusterCapacityError "{who} need 6.5 CPUs (the cluster has 4). {fix}" unless ``need`` (Ray resources,
    e.g. {"CPU": 6.5, "GPU": 0}) fits ``available`` (a cluster's totals)."""
    from clcae.errors import ClusterCapacityError

    names = {"CPU": "CPUs", "GPU": "GPUs"}
    short = "; ".join(f"{v:g} {names.get(k, k)} (the cluster has {available.get(k, 0.0):g})"
                      for k, v in need.items() if v > available.get(k, 0.0) + 1e-9)
    if short:
        raise ClusterCapacityError(f"{who} need {short}. {fix}")


def _current_session_dir() -> str | None:
    try:
        import ray

        return ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001 - no public getter
    except Exception:  # noqa: BLE001 - joined through Ray Client, or not started: no local session folder
        return None


def ray_logs_dir() -> str | None:
    """``<session>/logs`` of the Ray this process started or joined, or None when it did not start Ray."""
    return f"{_session_dir}/logs" if _session_dir else None


def ray_logs_note() -> str | None:
    """The line a job ends with: where Ray's own output went (None when Ray did not start)."""
    logs = ray_logs_dir()
    if logs is None:
        return None
    return f"Ray's logs: {logs}" + ("" if _verbose else " (--verbose prints them here)")


class DataProgressHandler(logging.Handler):
    """Ray Data's progress outside a terminal, one line per interval instead of a block of tables.

    Ray Data's ``LoggingExecutionProgressManager`` logs, every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL``
    seconds, a block: ``======= Running Dataset: ID =======``, ``Total Progress: 3/?``, resource and task lines,
    one ``OPERATOR: done/total`` line per operator, and a closing ``=====`` line.  This handler keeps the counts
    and prints ``data: 12 s, MapBatches(InvertActor) 8/16, Write 1/?`` at the closing line.
    """

    _COUNT = re.compile(r"^\s*(?:- )?(?P<name>[^:]+): (?P<done>\d+)/(?P<total>\d+|\?)$")

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self._parts: list[str] = []
        self._dataset = ""
        self._t0 = time.monotonic()  # when this dataset's first block came: Ray logs one as execution starts

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if message.startswith("======= Running Dataset"):
                dataset = message.strip("= ")
                if dataset != self._dataset:
                    self._dataset, self._t0 = dataset, time.monotonic()
                self._parts = []
            elif message.startswith("====="):
                if self._parts:
                    sys.stderr.write(f"data: {time.monotonic() - self._t0:.0f} s, {', '.join(self._parts)}\n")
                    sys.stderr.flush()
                self._parts = []
            else:
                match = self._COUNT.match(message)
                if match:
                    name = "rows out" if match["name"] == "Total Progress" else match["name"].strip()
                    self._parts.append(f"{name} {match['done']}/{match['total']}")
        except Exception:  # noqa: BLE001 - progress must never break a job
            self.handleError(record)
