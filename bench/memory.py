"""Peak memory and CPU time of a process tree, for the benchmarks and the object-store test, read from /proc
(Linux). Memory is the proportional set size (PSS), so pages shared between processes (Ray's object store, torch's
libraries) count once."""

from __future__ import annotations

import os
import threading


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a local Ray cluster's GCS, raylets and workers below the driver)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_snapshot(pid: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (title, user + system CPU seconds so far) for ``pid`` (default: this process) and every process below
    it.  Ray names its workers (``ray::ServeReplica:app:Deployment``, ``ray::ProxyActor``, ``ray::IDLE``) and renames
    them while they run a method (``ray::ServeController.listen_for_change``), so two snapshots are compared per pid
    (:func:`cpu_spent`), never per title: a title that appears between them would otherwise be charged the process's
    whole lifetime."""
    root = os.getpid() if pid is None else pid
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for p in [root, *descendants(root)]:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        words = [os.path.basename(a.decode(errors="replace").strip()) for a in argv if a.strip()] or ["?"]
        # a Python helper (Ray's dashboard agent, log monitor) is named by its script
        title = "this process" if p == root else words[1] if words[0].startswith("python") and len(words) > 1 \
            else words[0]
        out[p] = (title, (int(fields[11]) + int(fields[12])) / tick)
    return out


def process_role(title: str) -> str:
    """A Ray worker's role without the method it happens to run: ``ray::ServeController.listen_for_change`` ->
    ``ray::ServeController``."""
    return title.split(".", 1)[0] if title.startswith("ray::") else title


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two :func:`cpu_snapshot` calls: per pid (a process started in between
    counts from zero; one that ended in between is lost), summed by :func:`process_role` of its later title."""
    out: dict[str, float] = {}
    for p, (title, seconds) in after.items():
        role = process_role(title)
        out[role] = out.get(role, 0.0) + seconds - before.get(p, (title, 0.0))[1]
    return out


class PeakMemory:
    """Peak PSS of this process and every process below it, sampled every ``every_s`` in a thread while the
    ``with`` block runs."""

    def __init__(self, every_s: float = 0.25):
        self.peak, self.every, self._stop = 0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        return pss_bytes([os.getpid(), *descendants(os.getpid())])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
