import pytest

from pairmill.config import SECTIONS, ConfigError, EncoderConfig, load_config, valid_keys


def test_defaults_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("encoder:\n  batch_size: 16\n  query_prefix: 'query: '\nread:\n  too_long: reject\n")
    cfg = load_config(SECTIONS, cfg_file, ["encoder.batch_size=8", "read.max_chars=100", "encoder.model=none"])
    assert cfg["encoder"].batch_size == 8  # override beats the file
    assert cfg["encoder"].query_prefix == "query: "
    assert cfg["encoder"].model is None
    assert cfg["read"].too_long == "reject" and cfg["read"].max_chars == 100
    assert cfg["eval"].query_batch == 1024  # untouched default


def test_unknown_key_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(SECTIONS, None, ["encoder.batchsize=8"])
    assert "encoder.batchsize" in str(e.value) and "encoder.batch_size" in str(e.value)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'.*encoder.model"):
        load_config(SECTIONS, cfg_file)
    assert "read.query_field" in valid_keys(SECTIONS)


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="read.too_long='drop' is not one of"):
        load_config(SECTIONS, None, ["read.too_long=drop"])
    with pytest.raises(ConfigError, match="encoder.max_length='long'"):
        load_config(SECTIONS, None, ["encoder.max_length=long"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(SECTIONS, None, ["batch_size"])


def test_fingerprint_tracks_the_embedding_function_only(tiny_model):
    a = EncoderConfig(model=tiny_model)
    assert a.fingerprint() == EncoderConfig(model=tiny_model, batch_size=7, device="cpu").fingerprint()
    assert a.fingerprint() != EncoderConfig(model=tiny_model, query_prefix="query: ").fingerprint()
    assert a.fingerprint() != EncoderConfig().fingerprint()


@pytest.mark.parametrize(
    "override, named",
    [
        ("mine.range_min=40", "mine.range_min=40, mine.range_max=30"),  # used to fail only inside map_batches
        ("mine.num_negatives=0", "mine.num_negatives=0"),
        ("mine.num_negatives=40", "cannot give mine.num_negatives=40"),
        ("mine.margin_ratio=0", "mine.margin_ratio=0"),
        ("mine.max_score=2", "mine.max_score=2"),
        ("mine.shard_cpus=0", "mine.shard_cpus=0"),
        ("mine.query_batch=0", "mine.query_batch=0"),
        ("mine.nprobe=0", "mine.nprobe=0"),
        ("encoder.max_length=1", "encoder.max_length=1"),
        ("encoder.batch_size=0", "encoder.batch_size=0"),
        ("read.max_chars=0", "read.max_chars=0"),
        ("read.passage_field=query", "both 'query'"),
        ("eval.query_batch=0", "eval.query_batch=0"),
        ("ray.actors=0", "ray.actors=0"),
    ],
)
def test_every_section_validates_when_the_config_is_built(override, named):
    """Before any Ray work: a bad value in any section fails while the config is loaded."""
    from pairmill.config import SECTIONS

    with pytest.raises(ConfigError) as e:
        load_config(SECTIONS, None, [override])
    assert named in str(e.value)


def test_gpu_shards_bound_the_search_depth():
    from pairmill.config import SECTIONS

    load_config(SECTIONS, None, ["mine.range_max=3000"])  # CPU shards take any depth
    with pytest.raises(ConfigError, match="FAISS GPU stops at k=2048"):
        load_config(SECTIONS, None, ["mine.range_max=3000", "mine.shard_gpus=1"])
