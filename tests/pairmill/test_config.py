import dataclasses
import json

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
        # values that are not the field's type: the key, what was given and what it takes
        ("tune.lr=[1e-5,", "tune.lr='[1e-5,' is not a YAML value"),
        ("tune.batch_size=[16,x]", "tune.batch_size: 'x' is not an integer; write e.g. tune.batch_size=[16,32,64]"),
        ("tune.lr=[a,b]", "tune.lr: 'a' is not a number"),
        ("train.batch_size=32.5", "train.batch_size=32.5 is not an integer"),  # refused, not rounded
        ("train.lr=[1e-5]", "train.lr=['1e-5'] is not a number"),
        ("train.use_gpu=maybe", "train.use_gpu='maybe' is not true or false, or empty"),
        ("filter.k=x", "filter.k='x' is not an integer or one of ['auto']"),
        ("filter.consistency=2", "filter.consistency=2 is not true or false"),
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


# ----------------------------------------------------------------------------- override values are YAML


def test_override_values_parse_as_yaml_and_text_fields_keep_their_text():
    cfg = load_config(SECTIONS, None, [
        "tune.lr=[1e-5,1e-4]",  # YAML 1.1 reads 1e-5 (no dot) as a string: still a number here
        "tune.batch_size=[16,32]",
        "tune.temperature=0.02,0.2",  # a plain comma list
        "train.lora_targets=[query, value]",
        "train.lora_rank=8",
        "filter.decontaminate=['/data/held,out.jsonl', b.jsonl]",  # an element holding a comma, quoted
        "run.train=/data/a,b.jsonl",  # a text field: the text as written, one path
        "encoder.query_prefix=query: ",
        "filter.pool_size=1e6",
        "train.use_gpu=true",
        "mine.shards=null",
        "filter.k=auto",
    ])
    assert cfg["tune"].lr == (1e-5, 1e-4) and all(type(v) is float for v in cfg["tune"].lr)
    assert cfg["tune"].batch_size == (16, 32) and cfg["tune"].temperature == (0.02, 0.2)
    assert cfg["train"].lora_targets == ["query", "value"]
    assert cfg["filter"].decontaminate == ["/data/held,out.jsonl", "b.jsonl"]
    assert cfg["run"].train == "/data/a,b.jsonl"
    assert cfg["encoder"].query_prefix == "query: "
    assert cfg["filter"].pool_size == 1_000_000 and type(cfg["filter"].pool_size) is int
    assert cfg["train"].use_gpu is True and cfg["mine"].shards is None and cfg["filter"].k == "auto"
    # a comma list without brackets still means a list for a list field (configs and docs use it)
    assert load_config(SECTIONS, None, ["train.lora_targets=query,value", "train.lora_rank=8"])["train"].lora_targets == [
        "query", "value"]
    assert load_config(SECTIONS, None, ["tune.lr="])["tune"].lr == ()  # empty = fixed at train.lr


def test_tune_lr_range_from_the_command_line(tmp_path):
    from pairmill.cli import parse

    args = parse(["tune", "-o", str(tmp_path / "out"), "tune.lr=[1e-5,1e-4]", "tune.batch_size=[16,32]"])
    assert args.input is None and args.config_sections["tune"].space() == {
        "lr": ("log", [1e-5, 1e-4]), "temperature": ("log", [0.01, 0.1]), "batch_size": ("choice", [16, 32])}
    args = parse(["filter", "in.jsonl", "-o", "out", "--decontaminate", "/data/held,out.jsonl", "b.jsonl"])
    assert args.config_sections["filter"].decontaminate == ["/data/held,out.jsonl", "b.jsonl"]
    assert parse(["run", "run.train=/data/a,b.jsonl"]).config_sections["run"].train == "/data/a,b.jsonl"
    with pytest.raises(ConfigError, match=r"pairmill tune: tune.lr=\[0.0001\]; use a range"):
        parse(["tune", "-o", "out", "tune.lr=[1e-4]"])


def test_profile_overrides_round_trip_exactly():
    from pairmill.config import config_to_dict, profile_overrides

    profile = {
        "run": {"train": "/data/a,b.jsonl"},
        "encoder": {"query_prefix": "query: ", "batch_size": None, "model": "org/name"},
        "filter": {"decontaminate": ["/data/held,out.jsonl", "it's.jsonl", "1", "a#b: c", "true"], "audit": 0.2, "k": "auto"},
        "train": {"lr": 3e-05, "lora_targets": ["query", "value"], "lora_rank": 8, "use_gpu": False, "lora_alpha": 1e-7},
        "tune": {"lr": [1e-05, 0.0002], "batch_size": [16, 32], "warmup_ratio": []},
    }
    cfg = load_config(SECTIONS, None, profile_overrides(profile))
    for section, values in profile.items():
        for key, value in values.items():
            got = getattr(cfg[section], key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    defaults = json.loads(json.dumps(config_to_dict(load_config(SECTIONS))))  # every default, as a job saves it
    assert json.loads(json.dumps(config_to_dict(load_config(SECTIONS, None, profile_overrides(defaults))))) == defaults


# ----------------------------------------------------------------------------- one table per fact


def test_field_facts_are_read_from_the_fields():
    from pairmill.cli import describe
    from pairmill.config import TrainConfig, TuneConfig, resume_free_keys

    assert resume_free_keys(TrainConfig) == ["collapse_sample", "collapse_cosine", "wise_alpha", "placement_strategy", "checkpoint_every", "eval_every",
                                             "log_every", "max_failures"]
    assert TuneConfig.search_keys() == ["lr", "temperature", "warmup_ratio", "batch_size", "hard_negatives", "lora_rank"]
    assert TuneConfig(warmup_ratio=[0, 0.2]).space()["warmup_ratio"] == ("uniform", [0, 0.2])
    with pytest.raises(ConfigError, match=r"tune.warmup_ratio=\[0, 1\]; use a range \[low, high\] with 0 <= low < high < 1"):
        TuneConfig(warmup_ratio=[0, 1])
    text = describe({"train": TrainConfig, "tune": TuneConfig})
    assert "tune.lr (default [1e-05, 0.0002]): learning rate: a range [low, high] drawn log-uniform, e.g. [1e-5,2e-4]" in text
    assert "train.max_failures (default 3): " in text and "(may change when a run resumes)" in text


def test_help_and_flags_come_from_the_fields(capsys):
    from pairmill.cli import main

    with pytest.raises(SystemExit):
        main(["filter", "--help"])
    out = capsys.readouterr().out
    assert "filter.decontaminate (default [])" in out
    assert "evaluation pair files: drop training pairs" in out and "(filter.decontaminate)" in out  # the flag's help


def test_functions_default_to_the_config():
    import inspect

    from mining.negatives import select_negatives
    from pairmill.config import EvalConfig, MineConfig, ReadConfig
    from pairmill.evaluate import evaluate
    from pairmill.pairs import validate_records

    for fn, cls in ((select_negatives, MineConfig), (validate_records, ReadConfig), (evaluate, EvalConfig)):
        params = inspect.signature(fn).parameters
        shared = [f for f in dataclasses.fields(cls) if f.name in params]
        assert shared and all(params[f.name].default == f.default for f in shared), fn.__name__


def test_a_setting_missing_from_a_saved_run_is_unchanged_at_its_default():
    from pairmill.output import changed_settings

    saved = {"train": {"lr": 5e-5}}  # saved by a pairmill that had no train.objective yet
    assert changed_settings(saved, {"train": {"lr": 5e-5, "objective": "infonce", "lora_targets": []}}) == []
    assert changed_settings(saved, {"train": {"lr": 5e-5, "objective": "supcon"}}) == ["train.objective"]
    assert changed_settings(saved, {"train": {"lr": 1e-4}}) == ["train.lr"]
    assert changed_settings({"train": {"lr": 5e-5, "gone": 1}}, {"train": {"lr": 5e-5}}) == ["train.gone"]
    assert changed_settings({}, {"nosuch": {"key": None}}) == []  # no default known: empty
