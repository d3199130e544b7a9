"""The train job: batch building and schedules in memory; then the Ray wiring once per behaviour —
2 LoRA workers, one killed, resume from their checkpoint and export a merged plain model; an
interrupted run resumes when rerun, and a finished one reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pairmill.config import EncoderConfig, EvalConfig, ConfigError, RayConfig, ReadConfig, TrainConfig, load_config, SECTIONS
from pairmill.pairs import text_key
from tests.conftest import literal_pairs, write_jsonl
from training.batches import build_batch, hard_negatives, lr_lambda, place_negatives, steps_per_epoch
from training.loop import TestHooks
from training.model import export_model, load_trainable_state, setup_model
from training.train import train

# ----------------------------------------------------------------------------- in memory


def test_hard_negatives_are_capped_ragged_and_keyed_by_text():
    texts, ids = hard_negatives([["a", "b", "c"], None, ["d"]], None, 2)
    assert texts == [["a", "b"], [], ["d"]]
    assert ids == [[text_key("a"), text_key("b")], [], [text_key("d")]]
    # ids given (as mining writes them) are used as they are
    _, ids = hard_negatives([["a", "b"]], [[7, 8]], 2)
    assert ids == [[7, 8]]


def test_build_batch_prefixes_pads_and_masks():
    batch = build_batch(
        {"query": ["q0", "q1"], "passage": ["p0", "p1"], "negatives": [["n0", "p1", "x"], None]},
        hard_negative_count=2, query_prefix="query: ", passage_prefix="passage: ",
    )
    assert batch.queries == ["query: q0", "query: q1"]
    assert batch.passages == ["passage: p0", "passage: p1"]
    assert batch.negatives == ["passage: n0", "passage: p1"]
    assert batch.negative_mask.tolist() == [[True, True], [False, False]]
    # ids are of the unprefixed text, so pair 0's negative "p1" is masked for pair 1's query in the loss
    assert batch.negative_ids[0, 1] == batch.positive_ids[1] == text_key("p1")
    assert batch.negative_ids[1].tolist() == [0, 0]


def test_place_negatives_scatters_rows_and_keeps_gradients():
    mask = torch.tensor([[True, False], [True, True]])
    flat = torch.arange(6, dtype=torch.float32).view(3, 2).requires_grad_()
    query = torch.ones(2, 2, requires_grad=True)
    placed = place_negatives(flat, mask, query)  # (2, 2, 2)
    assert placed.tolist() == [[[0, 1], [0, 0]], [[2, 3], [4, 5]]]
    placed.sum().backward()
    assert flat.grad.tolist() == [[1, 1]] * 3
    assert place_negatives(torch.zeros(0, 5), torch.zeros(3, 0, dtype=torch.bool), torch.ones(3, 5)).shape == (3, 0, 5)
    # no negatives in this batch: zeros that still depend on the queries (the loss's backward collectives run)
    empty = place_negatives(None, torch.zeros(2, 2, dtype=torch.bool), query)
    assert empty.shape == (2, 2, 2) and not empty.any() and empty.requires_grad
    (grad,) = torch.autograd.grad(empty.sum(), query)
    assert grad.abs().sum() == 0


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, "linear") == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_lambda(10, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_lambda(100, 10, 100, "linear") == pytest.approx(0.0)
    assert lr_lambda(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_lambda(99, 10, 100, "constant") == 1.0
    assert lr_lambda(0, 0, 10, "linear") == 1.0


def test_steps_per_epoch_follows_equal_split_and_drop_last():
    assert steps_per_epoch(65, 2, 4) == 8  # 32 rows per worker
    assert steps_per_epoch(7, 2, 4) == 0


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.batch_size=33", "train.batch_size=33"),
        ("train.temperature=0", "train.temperature=0"),
        ("train.lr=-1", "train.lr=-1"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5"),
        ("train.lora_rank=-2", "train.lora_rank=-2"),
        ("train.mini_batch_size=0", "train.mini_batch_size=0"),
        ("train.length_group_overhead=-1", "train.length_group_overhead=-1"),
        ("train.schedule=step", "train.schedule='step'"),
        ("train.epochs=0", "train.epochs=0"),
        ("train.wise_alpha=0", "train.wise_alpha=0"),
        ("train.wise_alpha=1.5", "train.wise_alpha=1.5"),
        ("train.lora_rank=4 train.lora_merge=false train.wise_alpha=0.5", "unmerged LoRA"),
    ],
)
def test_bad_train_config_names_the_value(override, named):
    with pytest.raises(ConfigError) as e:
        load_config({"train": SECTIONS["train"]}, None, [*override.split(), "train.num_workers=2"])
    assert named in str(e.value)


def test_train_verb_maps_flags():
    from pairmill.cli import FLAG_KEYS, VERBS, build_parser

    args = build_parser().parse_args(["train", "pairs.jsonl", "-o", "out", "--eval-data", "held.jsonl", "--model", "m"])
    assert (args.input, args.output, args.eval_data, args.model) == ("pairs.jsonl", "out", "held.jsonl", "m")
    assert FLAG_KEYS["eval_data"] == "eval.data"
    assert VERBS["train"][1] == ("encoder", "read", "train", "eval", "mine", "ray")


def test_unmerged_lora_export_is_a_peft_adapter_that_loads_to_the_training_time_encoder(tiny_model, tmp_path):
    """train.lora_merge=false: OUT/model holds the adapter (not the base weights); SentenceTransformer
    loads it through peft, onto the base model the adapter names, and encodes as the trained model did."""
    from peft.tuners.lora import LoraLayer
    from sentence_transformers import SentenceTransformer

    from training.model import trainable_state

    lora = {"rank": 4, "alpha": 8, "targets": []}
    torch.manual_seed(0)
    trained = setup_model(tiny_model, lora)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make the adapter change the model
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(trainable_state(trained), checkpoint / "model.pt")

    out = export_model(checkpoint, tmp_path / "model", model=tiny_model, lora=lora, merge=False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()  # the base weights stay where the adapter config points
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    loaded = SentenceTransformer(str(out), device="cpu")
    # transformers' peft integration injects the adapter's LoRA layers into the base model
    assert any(isinstance(m, LoraLayer) for m in loaded.modules())
    texts = ["query: cpu memory", "passage: the unix file system 7"]
    trained.eval()
    np.testing.assert_allclose(loaded.encode(texts, convert_to_numpy=True), trained.encode(texts, convert_to_numpy=True), atol=1e-6)
    base = SentenceTransformer(tiny_model, device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(loaded.encode(texts, convert_to_numpy=True) - base).max() > 1e-3


def test_wise_alpha_exports_the_weights_that_far_from_the_base_model(tiny_model, tmp_path):
    """train.wise_alpha: every floating-point weight of the export is base + alpha * (trained - base);
    with LoRA, of the merged weights (base + alpha * the adapter's delta); an unmerged adapter is refused."""
    from sentence_transformers import SentenceTransformer

    from training.model import trainable_state

    base = SentenceTransformer(tiny_model, device="cpu").state_dict()
    for lora in (None, {"rank": 4, "alpha": 8, "targets": []}):
        torch.manual_seed(0)
        trained = setup_model(tiny_model, lora)
        with torch.no_grad():
            for name, p in trained.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        checkpoint = tmp_path / f"checkpoint-{bool(lora)}"
        checkpoint.mkdir()
        torch.save(trainable_state(trained), checkpoint / "model.pt")
        full = SentenceTransformer(str(export_model(checkpoint, tmp_path / "full", model=tiny_model, lora=lora, merge=True)),
                                   device="cpu").state_dict()
        mixed = SentenceTransformer(str(export_model(checkpoint, tmp_path / "mixed", model=tiny_model, lora=lora, merge=True,
                                                     wise_alpha=0.25)), device="cpu").state_dict()
        assert set(mixed) == set(base)
        moved = [name for name in base if base[name].is_floating_point() and not torch.equal(full[name], base[name])]
        assert len(moved) >= 4  # training (here: noise) changed the weights (LoRA: its 4 query and value matrices)
        for name, value in mixed.items():
            expected = base[name] + 0.25 * (full[name] - base[name]) if value.is_floating_point() else base[name]
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="lora_merge"):
        export_model(checkpoint, tmp_path / "adapter", model=tiny_model, lora=lora, merge=False, wise_alpha=0.5)


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_data")
    rows = literal_pairs(64)
    for i, row in enumerate(rows):  # ragged hard negatives: 0, 1 or 2, one equal to the own positive
        row["negatives"] = [rows[(i + k + 1) % len(rows)]["passage"] for k in range(i % 3)]
        # each query asked by 4 rows (objective=supcon's positives; a negative may be one of them, masked)
        row["query"] = rows[i - i % 4]["query"]
    rows[5]["negatives"] = [rows[5]["passage"]]
    bad = ['{"query": "no passage here"}', "not json at all"]
    return {
        "pairs": str(write_jsonl(folder / "pairs.jsonl", rows + bad)),
        "heldout": str(write_jsonl(folder / "heldout.jsonl", literal_pairs(80)[64:])),
        "rows": rows,
    }


def run_train(data, out, tiny_model, hooks=None, **train_kw):
    settings = dict(num_workers=2, batch_size=8, epochs=1, lr=1e-3, checkpoint_every=4, log_every=4, max_failures=0)
    settings.update(train_kw)
    return train(
        data["pairs"], str(out),
        encoder=EncoderConfig(model=tiny_model, query_prefix="query: ", passage_prefix="passage: "),
        read=ReadConfig(), train_cfg=TrainConfig(**settings), eval_cfg=EvalConfig(data=data["heldout"]), ray=RayConfig(),
        hooks=hooks,
    )


def checkpoint_embeddings(checkpoint: Path, tiny_model: str, texts: list[str], lora=None) -> np.ndarray:
    st = setup_model(tiny_model, lora)
    load_trainable_state(st, torch.load(checkpoint / "model.pt"))
    if lora:
        st[0].model = st[0].model.merge_and_unload()
    return st.encode(texts, convert_to_numpy=True)


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_killed_worker_resumes_and_export_matches(ray_session, tiny_model, data, tmp_path):
    """LoRA, objective=supcon (repeated queries), GradCache over length groups (ranks running different
    numbers of forwards under DDP), ragged hard negatives, eval every 4 steps; the last worker fails at
    step 6, after the checkpoint of step 4: Ray restarts the group, which continues from step 4 (not 0)
    and exports a merged plain model."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from pairmill.encoder import Encoder
    from pairmill.evaluate import evaluate_model, load_task

    out = tmp_path / "run"
    stats = run_train(data, out, tiny_model, hooks=TestHooks(fail_at_step=6), mini_batch_size=3, hard_negatives=2,
                      eval_every=4, max_failures=1, objective="supcon", lora_rank=4, length_group_overhead=4)

    assert stats["train"]["resumed_from_step"] == 4
    assert (out / "_SUCCESS").exists() and (out / "config.yaml").exists()
    assert stats["input_rows"] == 66 and stats["kept"] == 64
    assert stats["rejected"] == {"invalid_json": 1, "missing_passage": 1}
    assert len(list((out / "rejected").glob("*.parquet"))) >= 1
    assert stats["train"]["steps"] == 8 and stats["train"]["pairs_trained"] == 64  # 32 rows per worker / 4
    assert stats["train"]["hard_negatives_per_pair"] == 2
    lines = metric_lines(out)
    assert [m["step"] for m in lines] == [4, 8]  # the failed attempt's lines after step 4 were dropped
    assert all("ndcg@10" in m for m in lines)
    assert stats["best_checkpoint"]["step"] in (4, 8)

    # the export is a merged plain model: it loads both ways and holds exactly the final checkpoint's weights
    assert stats["exported_merged"] and not (out / "model" / "adapter_config.json").exists()
    hf = AutoModel.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in hf.named_parameters())
    texts = ["query: the data of a program", "passage: memory and disk 3"]
    exported = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_numpy=True)
    final = out / "checkpoints" / "train" / "step_0000008"
    lora = {"rank": 4, "alpha": 8, "targets": []}
    np.testing.assert_allclose(exported, checkpoint_embeddings(final, tiny_model, texts, lora), atol=1e-6)
    base = SentenceTransformer(tiny_model, device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(exported - base).max() > 1e-4  # training changed the model (its LoRA adapters)

    # the training-time model (rank 0's last eval) and pairmill's encoder on the export agree
    encoder_cfg = EncoderConfig(model=str(out / "model"), query_prefix="query: ", passage_prefix="passage: ")
    after = evaluate_model(encoder_cfg, EvalConfig(), load_task(data["heldout"]))
    for key in ("alignment", "uniformity", "ndcg@10"):
        assert after[key] == pytest.approx(lines[-1][key], abs=1e-4), key
    enc = Encoder(str(out / "model"), max_length=64)
    np.testing.assert_allclose(enc.encode(texts), exported, atol=1e-5)


def test_simcse_texts_with_tau_plus_and_a_queue_train_on_two_ray_train_workers(ray_session, tiny_model, data, tmp_path):
    """The objectives' math is checked against naive loops on 2 gloo processes (test_objectives.py,
    test_queue_simcse.py); here the options run end to end on 2 Ray Train workers, in one run (a Ray
    Train run's start-up is most of a small run's cost): plain texts (train.simcse) under debiased
    InfoNCE (tau_plus, made for random negatives, which in-batch texts are) with a queue of past
    passages. It trains, exports and logs what the options log. SupCon runs on 2 workers in the
    killed-worker test above; the triplet objective end to end in the resumed-run test below (one
    worker) and over 2 ranks with unequal valid triplets in test_objectives.py; the loop's sums over
    ranks run on 2 workers in the refresh test (test_refresh_train.py)."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(row["passage"] + "\n" for row in data["rows"]))
    out = tmp_path / "out"
    stats = run_train({**data, "pairs": str(texts)}, out, tiny_model, max_steps=4, log_every=2, simcse=True, tau_plus=0.05,
                      queue_size=16)

    assert stats["train"]["steps"] == 4 and (out / "model" / "modules.json").exists()
    assert stats["kept"] == len(data["rows"])  # every text, each its own positive
    lines = [m for m in metric_lines(out) if "loss" in m]
    assert lines[-1]["step"] == 4 and all(np.isfinite(m["loss"]) for m in lines)
    # a global batch of 8 a step: the queue is full after 2 steps, the same on both ranks
    assert lines[-1]["queue_entries"] == 16 and lines[-1]["queue_staleness"] > 0


def test_an_interrupted_run_resumes_and_a_finished_one_reruns(ray_session, tiny_model, data, tmp_path, monkeypatch):
    """The job folder is staged: an interrupted run leaves nothing at OUT, only ``.OUT.partial`` with
    its checkpoints, and the same command resumes there and commits; a finished OUT rerun resumes
    too (nothing left to train); other settings are refused. objective=triplet: the pairs without a hard
    negative are counted in every metrics line. One worker: two are the test above's."""
    from sentence_transformers import SentenceTransformer

    from pairmill.evaluate import evaluate_model, load_task
    from pairmill.output import resumable_staging

    out = tmp_path / "resumed"
    settings = dict(num_workers=1, max_steps=3, hard_negatives=1, checkpoint_every=1, objective="triplet")
    with pytest.raises(Exception, match="fail_at_step"):  # max_failures=0: the run dies after step 2's checkpoint
        run_train(data, out, tiny_model, hooks=TestHooks(fail_at_step=2), **settings)
    assert not out.exists() and (resumable_staging(out) / "checkpoints" / "train" / "step_0000002").is_dir()

    stats = run_train(data, out, tiny_model, **settings)
    assert stats["train"]["steps"] == 3 and stats["train"]["resumed_from_step"] == 2
    assert not resumable_staging(out).exists() and (out / "_SUCCESS").exists()
    assert stats == json.loads((out / "stats.json").read_text()) and stats["input_rows"] == 66
    skipped = [m["pairs_without_triplet"] for m in metric_lines(out)]
    assert len(skipped) == 3 and all(0 <= n <= 8 for n in skipped) and sum(skipped) > 0  # a third of the pairs have none
    texts = ["query: cpu memory", "passage: the unix file system 7"]
    exported = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_numpy=True)
    final = out / "checkpoints" / "train" / "step_0000003"
    np.testing.assert_allclose(exported, checkpoint_embeddings(final, tiny_model, texts), atol=1e-6)
    base = SentenceTransformer(tiny_model, device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(exported - base).max() > 1e-4

    # the same command again finds its last checkpoint at the last step and re-exports it without
    # starting Ray Train (nothing left to train), here with train.wise_alpha (an export setting, free
    # to change): the model a quarter of the way from the base, scored as exported, the trained
    # weights' score kept beside it; a changed training setting is refused instead of resuming a run
    # made with another one
    from ray.train.torch import TorchTrainer

    with monkeypatch.context() as m:
        m.setattr(TorchTrainer, "fit", lambda self: pytest.fail("a finished run's rerun started Ray Train"))
        again = run_train(data, out, tiny_model, **settings, wise_alpha=0.25)
    assert again["train"]["resumed_from_step"] == 3 and again["train"]["steps"] == 3
    assert again["train"]["pairs_per_s"] == stats["train"]["pairs_per_s"] and again["refresh"] is None
    assert again["best_checkpoint"] == stats["best_checkpoint"] and again["train"]["pairs_trained"] == stats["train"]["pairs_trained"]
    assert (out / "_SUCCESS").exists() and not resumable_staging(out).exists()
    assert again["trained_metrics"]["ndcg@10"] == stats["final_metrics"]["ndcg@10"] and again["train"]["wise_alpha"] == 0.25
    assert [s["name"] for s in again["stages"]] == ["read+validate", "train", "export", "evaluate_export"]
    mixed = SentenceTransformer(str(out / "model"), device="cpu")
    exported = evaluate_model(EncoderConfig(model=str(out / "model"), query_prefix="query: ", passage_prefix="passage: "),
                              EvalConfig(), load_task(data["heldout"]))
    assert {k: again["final_metrics"][k] for k in exported} == pytest.approx(exported)
    assert exported["ndcg@10"] != again["trained_metrics"]["ndcg@10"] or exported["alignment"] != again["trained_metrics"]["alignment"]
    start, weights = SentenceTransformer(tiny_model, device="cpu").state_dict(), mixed.state_dict()
    trained = setup_model(tiny_model, None)
    load_trainable_state(trained, torch.load(final / "model.pt"))
    name = next(n for n, v in trained.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[n]))
    torch.testing.assert_close(weights[name], start[name] + 0.25 * (trained.state_dict()[name] - start[name]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="train.lr"):
        run_train(data, out, tiny_model, **settings, lr=5e-4)
    assert (out / "_SUCCESS").exists()  # a refused rerun leaves the finished folder as it was


class _RunsCode:
    """A pickle that runs code when loaded (what a hostile checkpoint file holds)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_are_read_as_tensors_only(tiny_model, tmp_path, monkeypatch):
    """Checkpoint files load with weights_only=True: a file that unpickles to code is refused, on any
    torch the project allows (torch < 2.6 unpickled fully by default)."""
    import pickle

    import training.model as model_module

    calls = []
    real_load = torch.load
    monkeypatch.setattr(model_module.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    marker = tmp_path / "code-ran"
    (tmp_path / "bad").mkdir()
    torch.save({"0.auto_model.embeddings.word_embeddings.weight": _RunsCode(str(marker))}, tmp_path / "bad" / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        export_model(tmp_path / "bad", tmp_path / "out", model=tiny_model, lora=None, merge=True)
    assert not marker.exists() and calls and all(k.get("weights_only") is True for k in calls)
