"""cluster.yaml is valid for the autoscaler that ships in the installed ray wheel."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_the_autoscaler_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_catches_a_typo(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_train"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(bad))


def test_cluster_layout(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing heavy is scheduled on the head
    gpu_types = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert {"gpu_train", "gpu_serve"} <= set(gpu_types)
    for t in types.values():  # S3 access on every node, not only the head (ray issue #3115)
        assert "IamInstanceProfile" in t["node_config"]
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert not any("ray-ml" in str(v) for v in cluster.values())
    assert any("pip install" in c and "clcae" in c for c in cluster["setup_commands"])


def _spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_spot_where_checkpoints_make_preemption_cheap(cluster):
    """Training workers are spot (checkpoints to S3 + Ray Train's restarts make a reclaimed node cost the steps since
    the last checkpoint); Serve's nodes and the head are on-demand (live requests, the Serve controller)."""
    types = cluster["available_node_types"]
    assert _spot(types["gpu_train"])
    spot = types["gpu_train"]["node_config"]["InstanceMarketOptions"]
    # a one-time request the launcher replaces (persistent spot requests cannot be terminated by the launcher)
    assert spot.get("SpotOptions", {}).get("SpotInstanceType", "one-time") == "one-time"
    assert not _spot(types["gpu_serve"]) and not _spot(types[cluster["head_node_type"]])
    # stopped nodes are not reused: a one-time spot instance cannot be stopped and restarted
    assert cluster["provider"]["cache_stopped_nodes"] is False


def test_gpu_workers_scale_from_zero_within_the_cluster_limit(cluster):
    types = cluster["available_node_types"]
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} runs GPUs while idle"
        assert t["max_workers"] >= 1
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert "min_workers" not in types[cluster["head_node_type"]] or types[cluster["head_node_type"]]["min_workers"] == 0


def test_serve_cluster_config_fits_the_serving_nodes(cluster):
    """serve/config.cluster.yaml's model replicas ask for one GPU each, and gpu_serve has room for all of them at
    full scale (its g5.xlarge: 1 GPU)."""
    app = yaml.safe_load((CLUSTER.parent / "serve" / "config.cluster.yaml").read_text())["applications"][0]
    models = [d for d in app["deployments"] if d["name"] in ("InvertModel", "EditModel")]
    assert app["args"]["serve.use_gpu"] == "true"
    gpus = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"] for d in models)
    assert all(d["ray_actor_options"]["num_gpus"] == 1 for d in models)
    assert gpus <= cluster["available_node_types"]["gpu_serve"]["max_workers"]


def test_every_node_gets_the_auth_token(cluster):
    """Ray 2.60's token authentication: `ray start` turns it on when a token is present, on every node alike."""
    assert cluster["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
