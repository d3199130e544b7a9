"""cluster.yaml against the launcher schema shipped inside the installed ray package."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates(schema, config):
    jsonschema.validate(config, schema)


def test_the_schema_check_catches_mistakes(schema, config):
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["min_worker"] = typo["available_node_types"]["gpu_worker"].pop("min_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    missing = copy.deepcopy(config)
    del missing["available_node_types"]["cpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, schema)


def test_cluster_shape_and_exposure(config):
    nodes = config["available_node_types"]
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in nodes
    assert "train" in nodes["gpu_worker"]["resources"] and "data" in nodes["cpu_worker"]["resources"]
    assert all(0 <= n.get("min_workers", 0) <= n.get("max_workers", config["max_workers"]) for n in nodes.values())
    assert any("pairmill[gpu]" in cmd for cmd in config["setup_commands"])
    # Nothing open to the internet: SSH from one CIDR only, dashboard on localhost.
    ranges = [r["CidrIp"] for p in config["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert ranges and "0.0.0.0/0" not in ranges
    assert all(p["FromPort"] == p["ToPort"] == 22 for p in config["provider"]["security_group"]["IpPermissions"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
