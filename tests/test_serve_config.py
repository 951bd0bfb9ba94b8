"""serve/config.yaml started the way `serve run serve/config.yaml` starts it, on a 2-CPU Ray (a laptop)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RAY_TEMP_DIR = "/tmp/ray_t"  # as conftest.py: Unix socket paths must stay short


@pytest.fixture(scope="module")
def two_cpu_ray() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=RAY_TEMP_DIR,
             _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    try:
        yield
    finally:
        ray.shutdown()


def test_shipped_config_becomes_ready_on_two_cpus(two_cpu_ray, monkeypatch):
    """What `serve run serve/config.yaml` does (ray/serve/scripts.py): validate the file, start Serve with its
    http_options, deploy_apps.  Only the port is changed (8000 may be taken).  The YAML's per-deployment
    settings (CPUs, replicas) apply, which `serve.run(build_app(...))` would not show."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.chdir(ROOT)  # `serve run serve/config.yaml` is run from the repository root
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config.http_options.port = port
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location)
    try:
        client.deploy_apps(config, _blocking=False)
        deadline, last = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            try:
                last = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
                if last.status_code == 200:
                    break
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(1)
        status = serve.status().applications.get("clcae")
        assert isinstance(last, httpx.Response) and last.status_code == 200, (last, status)
    finally:
        serve.shutdown()
