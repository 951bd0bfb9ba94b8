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
