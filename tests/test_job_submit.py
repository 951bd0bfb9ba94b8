"""The cluster path on one machine: a head started with `ray start --head`, a training job sent with
`ray job submit`, and its checkpoint on storage afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import kill_session

from clcae.config import load_config, to_dict
from clcae.data.synthesis import PairGenerator

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback ports, token auth off (a test head; real clusters keep it on)."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
                             "--temp-dir=/tmp/ray_j", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "ray start --head exited"
                time.sleep(0.5)
        else:
            pytest.fail("the Ray head's job server did not come up in 90 s")
        yield url, env
    finally:
        proc.send_signal(signal.SIGTERM)  # stops this head only (never `ray stop`: it kills every Ray)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        kill_session(proc.pid)


def test_ray_job_submit_trains_and_checkpoints(head, tmp_path):
    url, env = head
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    PairGenerator(to_dict(cfg), str(tmp_path / "pairs"), "cpu").write_shard(0, 7)
    cmd = [RAY, "job", "submit", "--address", url, "--", sys.executable, str(ROOT / "jobs" / "train.py"),
           "stage=contrastive", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run-name", "submitted",
           f"train.storage_path={tmp_path / 'runs'}", f"data.pairs=[{tmp_path / 'pairs'}]", "data.batch_size=2",
           "train.max_steps=2", "train.checkpoint_every=2", "train.cpus_per_worker=0.5"]
    deadline = time.time() + 90
    while True:  # the job agent starts a little after the dashboard answers
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    assert (tmp_path / "runs" / "submitted" / "checkpoint_000002" / "checkpoint.pt").exists()
