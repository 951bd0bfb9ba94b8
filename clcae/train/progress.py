"""Training progress on the driver's console: one line per ``train.log_every`` steps.

The workers' own output stays in Ray's session logs (``ray.init(log_to_driver=False)``), so the progress line
cannot be a worker's print.  Ray Train calls a :class:`ProgressCallback` in its controller after every
``ray.train.report``; the controller runs on the driver's node (Ray Train pins it there), so the callback appends
rank 0's metrics to a local file and a thread of the driver (:func:`follow`) prints each new line.  No extra
actor or process.  Nothing here may fail a run: a line that cannot be written or read is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray.train

log = logging.getLogger("clcae.train")

# metrics that are not losses, printed in this order after the step
_SHOWN_FIRST = ("accuracy", "logit_scale")


class ProgressCallback(ray.train.UserCallback):
    """Runs in Ray Train's controller: appends rank 0's reported metrics (one JSON line per report) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            line = dict(metrics[0]) if metrics else {}
            if checkpoint is not None:
                line["checkpoint"] = os.path.basename(str(checkpoint.path).rstrip("/"))
            with open(self.path, "a") as f:
                f.write(json.dumps(line, default=float) + "\n")
        except Exception:  # noqa: BLE001 - progress is a courtesy; training goes on without it
            pass

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, BaseException]) -> None:
        """A worker raised or died (with its node, say): one line, so a restart is not silent on the console."""
        try:
            ranks = sorted(worker_exceptions)
            exc = worker_exceptions[ranks[0]]
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            line = {"event": "failure", "time": time.time(), "ranks": ranks,
                    "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]}
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except Exception:  # noqa: BLE001 - as above
            pass


def format_failure(event: dict[str, Any]) -> str:
    """``rank(s) 1 failed (ActorDiedError: ... its node has died ...); restarting from the newest checkpoint``."""
    ranks = ", ".join(str(r) for r in event.get("ranks", []))
    return (f"rank(s) {ranks} failed ({event.get('error', '')}); Ray Train restarts the workers from the newest "
            "checkpoint (train.max_failures)")


def format_line(metrics: dict[str, Any], max_steps: int) -> str:
    """``step 5/10  loss 0.693  accuracy 0.500  12.3 img/s  (checkpoint_000005)``."""
    parts = [f"step {int(metrics.get('step', 0))}/{max_steps}"]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k not in ("step", "images_per_s")}
    keys = [k for k in ("total", "loss") if k in numbers]
    keys += [k for k in _SHOWN_FIRST if k in numbers]
    keys += [k for k in sorted(numbers) if k not in keys][: max(0, 6 - len(keys))]  # a line, not a table
    parts += [f"{k} {numbers[k]:.4g}" for k in keys]
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    if metrics.get("checkpoint"):
        parts.append(f"({metrics['checkpoint']})")
    return "  ".join(parts)


@contextlib.contextmanager
def follow(max_steps: int, prefix: str, interval_s: float = 0.5) -> Iterator[ProgressCallback]:
    """A callback for ``RunConfig(callbacks=[...])`` whose lines the driver logs (``clcae.train`` at INFO) while
    the block runs, and once more at its end, so the last report is printed before the summary."""
    fd, path = tempfile.mkstemp(prefix="clcae-train-progress-", suffix=".jsonl")
    os.close(fd)
    stop = threading.Event()
    offset = 0

    def drain() -> None:
        nonlocal offset
        try:
            with open(path) as f:
                f.seek(offset)
                while True:
                    line = f.readline()
                    if not line.endswith("\n"):  # none, or half written: read it next time
                        break
                    offset = f.tell()
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("event") == "failure":
                            log.warning("%s%s", prefix, format_failure(event))
                        else:
                            log.info("%s%s", prefix, format_line(event, max_steps))
        except OSError:
            pass

    def loop() -> None:
        while not stop.wait(interval_s):
            drain()

    thread = threading.Thread(target=loop, name="clcae-train-progress", daemon=True)
    thread.start()
    try:
        yield ProgressCallback(path)
    finally:
        stop.set()
        thread.join()
        drain()
        with contextlib.suppress(OSError):
            os.unlink(path)
