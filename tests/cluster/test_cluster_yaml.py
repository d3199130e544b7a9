"""cluster.yaml against the launcher schema shipped inside the installed ray package."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
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


# --- Ray token auth (Ray 2.60) -------------------------------------------------------------------
# `ray start --head` turns token auth on only with RAY_AUTH_MODE=token or an existing token
# (ray/_private/authentication/authentication_token_setup.py, maybe_enable_token_auth_if_token_available),
# and a joining worker's `ray start --address` never does, so every `ray start` must carry the mode.

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def _ray_start_gets_token_mode(command: str) -> bool:
    """True if `command` runs `ray start` at least once and every time with RAY_AUTH_MODE=token in its
    environment: as a prefix assignment (`RAY_AUTH_MODE=token ray start ...`) or exported earlier in
    the same command (`export RAY_AUTH_MODE=token; ... ray start ...`)."""
    exported = None
    found = False
    for part in re.split(r";|&&|\|\||\n", command):
        words = shlex.split(part)
        if words[:1] == ["export"]:
            for word in words[1:]:
                if word.startswith("RAY_AUTH_MODE="):
                    exported = word.split("=", 1)[1]
            continue
        env = {}
        while words and _ASSIGNMENT.fullmatch(words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[:2] == ["ray", "start"]:
            found = True
            if env.get("RAY_AUTH_MODE", exported) != "token":
                return False
    return found


@pytest.mark.parametrize(
    "command, expected",
    [
        ("ulimit -n 65536; ray start --head --port=6379", False),  # cluster.yaml before token auth
        ("ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --port=6379", True),
        ("export RAY_AUTH_MODE=token; ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379", True),
        ("RAY_AUTH_MODE=disabled ray start --head", False),
        ("RAY_AUTH_MODE=token true; ray start --head", False),  # a prefix applies to its own command only
        ("export RAY_AUTH_MODE=token; export RAY_AUTH_MODE=disabled; ray start --head", False),
        ("ray stop", False),
    ],
)
def test_token_mode_check(command, expected):
    assert _ray_start_gets_token_mode(command) is expected


def test_every_ray_start_enables_token_auth(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if re.search(r"\bray\s+start\b", c)]
        assert starts, f"{key} has no `ray start`"
        for command in starts:
            assert _ray_start_gets_token_mode(command), f"{key}: token auth off in {command!r}"
    # The token itself never appears in the config (it would sit in ~/ray_bootstrap_config.yaml and `ps`).
    commands = [c for key, v in config.items() if key.endswith("_commands") for c in v]
    assert not any("RAY_AUTH_TOKEN=" in c for c in commands)


def test_token_file_reaches_every_node_from_outside_the_repo(config):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    # Top-level file_mounts go to the head and, through the head's autoscaler, to every worker.
    remote = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()  # ~/.ray/auth_token
    mounts = config["file_mounts"]
    assert remote in mounts, f"no file_mounts entry for {remote}"
    local = Path(os.path.expanduser(mounts[remote]))
    assert local.is_absolute(), "a relative source is resolved from the repo folder `ray up` runs in"
    for dst, src in mounts.items():
        if dst == remote:
            continue
        src_dir = Path(os.path.abspath(ROOT / os.path.expanduser(src)))
        assert local != src_dir and src_dir not in local.parents, f"token source inside {src!r}, synced to {dst}"
        assert not remote.startswith(dst.rstrip("/") + "/")
    assert local != ROOT and ROOT not in local.parents
    # rsync_exclude applies to every file mount: it must not drop the token file itself.
    assert not any(fnmatch.fnmatch(local.name, pattern) for pattern in config.get("rsync_exclude", []))
    # Readable by the node's user only, on every node (setup_commands run on head and workers).
    assert any(re.fullmatch(r"chmod (0?600|u=rw,go=) " + re.escape(remote), c.strip()) for c in config["setup_commands"])


def test_every_ray_start_sets_the_worker_allocators(config):
    """Workers inherit the raylet's environment: cluster.yaml's `ray start` lines carry WORKER_ENV."""
    from pairmill.cluster import WORKER_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            for part in re.split(r";|&&|\|\||\n", command):
                words = shlex.split(part)
                env = {}
                while words and _ASSIGNMENT.fullmatch(words[0]):
                    name, value = words.pop(0).split("=", 1)
                    env[name] = value
                if words[:2] == ["ray", "start"]:
                    assert {name: env.get(name) for name in WORKER_ENV} == WORKER_ENV, command
