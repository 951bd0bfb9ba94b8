"""Shared pytest fixtures: a loopback S3 server (moto) and a small local Ray cluster.

Both are module-scoped: a test module that asks for them gets one server / one cluster, torn down when
the module ends. Use them from any test file:

    def test_roundtrip(s3_server, s3_bucket, ray_cluster):
        uri = f"{s3_bucket}/shards"            # "s3://<fresh bucket>/shards"
        make_shards(folder, uri, s3_server.storage)
        ds = read_shards(uri, s3_server.storage)

Settings follow /work/shared/reference/test-setup.md (measured on this machine kind).
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from clcae.config import StorageConfig

# No outbound probes (usage stats, EC2 metadata), a tiny Parquet footer-reader pool, and Ray Train's
# controller polling fast enough for short fits. Set before anything imports ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

S3_CREDENTIALS = "testing"  # moto accepts any key; s3fs insists on having one
S3_REGION = "us-east-1"
RAY_TEMP_DIR = "/tmp/ray_t"  # Unix socket paths must stay under 107 bytes: never a pytest tmp_path


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server. ``storage`` is the StorageConfig that reaches it (explicit endpoint,
    region and credentials, so the tests do not depend on AWS_* variables)."""

    endpoint_url: str
    storage: StorageConfig

    def boto3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=S3_REGION,
                            aws_access_key_id=S3_CREDENTIALS, aws_secret_access_key=S3_CREDENTIALS)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return ``s3://<name>``."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.boto3_client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 (free port), reached through real HTTP by s3fs, pyarrow and
    Ray workers alike. Yields an :class:`S3Server` (``.endpoint_url``, ``.storage``, ``.create_bucket()``)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield S3Server(endpoint, StorageConfig(endpoint_url=endpoint, region=S3_REGION,
                                               key=S3_CREDENTIALS, secret=S3_CREDENTIALS))
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the module's moto server, as ``s3://<name>``."""
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the module: 4 logical CPUs (so Train workers leave a budget for Ray Data),
    no dashboard, no worker prestart, ordered and quiet Ray Data execution. Shut down with
    ``ray.shutdown()`` at the end of the module (never ``ray stop``, which kills every Ray on the host).
    Start it after ``s3_server`` when both are used (list ``s3_server`` first in the arguments)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=RAY_TEMP_DIR,
             _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session: Ray's workers get their own process groups, not sessions."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def inverter(tmp_path_factory):
    """The tiny model (random weights, seeded by the config) with the ``smile`` direction, on CPU."""
    from helpers import smile_direction, tiny

    from clcae.factory import build_clcae, build_directions
    from clcae.inference import Inverter

    cfg = tiny(*smile_direction(tmp_path_factory.mktemp("dirs")))
    return Inverter(build_clcae(cfg), build_directions(cfg), device="cpu", model_id="tiny-test")


# Fixtures that start a Ray cluster: ours, and test_multinode's several-node ones.
CLUSTER_FIXTURES = {"ray_cluster", "nodes", "small_store"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts Ray (the ``ray_cluster`` fixture, or one of the clusters of
    ``CLUSTER_FIXTURES``) as ``cluster`` for ``make test-fast``."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# ------------------------------------------------------------------------------------------ no silent skips in CI
def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _ci() and terminalreporter.stats.get("skipped"):
        terminalreporter.write_line("CI=true: a skipped test is a failure here (a missing install step in .ci/run?)",
                                    red=True)


def pytest_sessionfinish(session, exitstatus):
    """Under CI every test must run: a skip there means .ci/run forgot an install step, so it fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _ci() and exitstatus == 0 and reporter is not None and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
