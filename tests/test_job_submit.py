"""The cluster path on one machine: a head started with `ray start --head`, a training job sent with
`ray job submit`, and its checkpoint on storage afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import kill_session
from helpers import free_port

from clcae.config import load_config, to_dict
from clcae.data.synthesis import PairGenerator

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # its own `ray start` head


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback ports, token auth off (a test head; real clusters keep it on)."""
    port, dash, agent_http, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
                             # The agents' default ports (52365, ...) are taken by any other Ray on the host;
                             # then the job agent never serves and every submit gets "No available agent".
                             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
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


def agent_log() -> str:
    log = Path("/tmp/ray_j/session_latest/logs/dashboard_agent.log")
    return "\n--- dashboard_agent.log ---\n" + log.read_text()[-3000:] if log.exists() else "\n(no agent log)"


def test_ray_job_submit_trains_and_checkpoints(head, tmp_path):
    url, env = head
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    PairGenerator(to_dict(cfg), str(tmp_path / "pairs"), "cpu").write_shard(0, 7)
    cmd = [RAY, "job", "submit", "--address", url, "--", sys.executable, str(ROOT / "jobs" / "train.py"),
           "stage=contrastive", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run-name", "submitted",
           f"train.storage_path={tmp_path / 'runs'}", f"data.pairs=[{tmp_path / 'pairs'}]", "data.batch_size=2",
           "train.max_steps=2", "train.checkpoint_every=2", "train.cpus_per_worker=0.5"]
    # The job agent registers a little after the dashboard answers: retry for a while, and show the agent's
    # log if it never comes.
    deadline = time.time() + 120
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + agent_log()
    assert "succeeded" in done.stdout.lower()
    assert (tmp_path / "runs" / "submitted" / "checkpoint_000002" / "checkpoint.pt").exists()
