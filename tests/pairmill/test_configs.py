"""Every shipped config (configs/ and the sample profiles in pairmill/sample/) loads through the real
loader (a mistyped key fails), and `pairmill run` / `pairmill tune` on the sample use those profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pairmill.cli import VERBS
from pairmill.config import SECTIONS, ConfigError, load_config
from pairmill import sample
from pairmill.chain.run import sample_overrides
from pairmill.config import profile_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted(sample.PROFILES.values())
RUN_SECTIONS = {s: SECTIONS[s] for s in VERBS["run"][1]}
TUNE_SECTIONS = {s: SECTIONS[s] for s in VERBS["tune"][1]}
GPUS_PER_INSTANCE = {"g5.12xlarge": 4}  # cluster.yaml's gpu_worker instance type


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"run.yaml", "cluster-1b.yaml", "tune.yaml", "web.yaml"}
    # the sample profiles ship with the package (an installed pairmill has no checkout)
    assert all(p.parent == sample.FOLDER for p in sample.PROFILES.values())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_only_known_keys(path):
    raw = yaml.safe_load(path.read_text())
    verb = next((v for v in ("tune", "setfit") if path.name.startswith(v)), "run")  # the verb the profile is for
    cfg = load_config({s: SECTIONS[s] for s in VERBS[verb][1]}, path)
    for section, values in raw.items():  # every value the file sets arrived, with its type
        for key, value in values.items():
            loaded = getattr(cfg[section], key)
            assert loaded == value or (isinstance(value, int) and loaded == float(value)), f"{section}.{key}"


def test_a_mistyped_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(sample.PROFILES["run"].read_text().replace("max_steps:", "max_step:"))
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'"):
        load_config(RUN_SECTIONS, bad)


def test_run_without_config_uses_the_sample_run_profile():
    from_file = load_config(RUN_SECTIONS, sample.PROFILES["run"])
    built_in = load_config(RUN_SECTIONS, None, sample_overrides(None, []))
    assert built_in == from_file and built_in != load_config(RUN_SECTIONS)
    assert built_in["train"].refresh_every > 0  # the issue: the default run trains with refresh


def test_sample_profile_yields_to_the_user():
    cfg = load_config(RUN_SECTIONS, None, sample_overrides(None, ["train.max_steps=5"]))
    assert cfg["train"].max_steps == 5 and cfg["train"].passage_max_length == sample.profile("run")["train"]["passage_max_length"]
    # a --config file, or pairs of one's own, get the generic defaults instead
    assert sample_overrides("c.yaml", ["a.b=1"]) == ["a.b=1"]
    assert sample_overrides(None, ["run.train=big.jsonl"]) == ["run.train=big.jsonl"]
    assert profile_overrides({"filter": {"decontaminate": ["a", "b,c"], "n_clusters": None}}) == [
        "filter.decontaminate=[a, 'b,c']", "filter.n_clusters=none"]


def test_cluster_config_fits_the_cluster():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    gpu_node = cluster["available_node_types"]["gpu_worker"]
    gpus = gpu_node["max_workers"] * GPUS_PER_INSTANCE[gpu_node["node_config"]["InstanceType"]]
    cfg = load_config(RUN_SECTIONS, ROOT / "configs" / "cluster-1b.yaml")
    train = cfg["train"]
    assert train.num_workers + cfg["ray"].actors <= gpus  # training and refresh encoders side by side
    assert train.use_gpu and train.refresh_every > 0
    assert (train.batch_size // train.num_workers) % train.mini_batch_size == 0  # whole GradCache chunks
    cpu_node = cluster["available_node_types"]["cpu_worker"]
    assert cfg["mine"].shards * cfg["mine"].shard_cpus <= cpu_node["max_workers"] * 32  # r6i.8xlarge: 32 vCPU


def test_tune_without_config_on_the_sample_uses_the_sample_tune_profile():
    from tune.tune import sample_overrides as tune_overrides

    path = sample.PROFILES["tune"]
    assert load_config(TUNE_SECTIONS, path) != load_config(TUNE_SECTIONS)
    assert load_config(TUNE_SECTIONS, None, tune_overrides(None, None, [])) == load_config(TUNE_SECTIONS, path)
    assert load_config(TUNE_SECTIONS, None, tune_overrides(None, str(sample.TRAIN), [])) == load_config(TUNE_SECTIONS, path)
    # the user's settings win; a --config file or pairs of one's own get the generic defaults
    assert load_config(TUNE_SECTIONS, None, tune_overrides(None, None, ["train.max_steps=7"]))["train"].max_steps == 7
    assert tune_overrides("c.yaml", None, ["a.b=1"]) == ["a.b=1"]
    assert tune_overrides(None, "mine.jsonl", []) == []
