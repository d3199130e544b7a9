"""``pairmill train PAIRS -o OUT``: contrastive fine-tuning of a sentence-transformers model on Ray Train.

Design note
-----------
What. A ``TorchTrainer`` runs ``train_loop_per_worker`` on ``train.num_workers`` workers (DDP via
``ray.train.torch.prepare_model``). Each worker streams its shard of the validated pairs
(``get_dataset_shard("train").iter_batches``, the same per-worker batch on every rank, drop_last),
tokenises queries, passages and hard negatives itself with the model's tokenizer (E5 prefixes from
the encoder section, a max length per side), and minimises ``InfoNCELoss`` over the global batch
(all-gather across workers, false negatives masked by ``text_key``), through ``GradCache`` when
``train.mini_batch_size`` is set. On CPU each side's texts are encoded sorted by length, in groups
padded to their own longest (``encode_by_length``, ``train.length_group_overhead``): the same
embeddings for less padding (off on GPU, where it measured slower). AdamW, warmup + linear/cosine
decay, gradient clipping, bf16 autocast on GPU and fp32 on CPU; LoRA (peft) optional and merged on
export.

Checkpoints. Every ``checkpoint_every`` steps and at the end, rank 0 hands ``ray.train.report`` a
folder holding ``model.pt`` (the *trainable* parameters by name: everything else is the base model,
which is reloaded from ``encoder.model``), ``optimizer.pt``, ``scheduler.pt`` and ``state.json``
(step, epoch, step_in_epoch, pairs seen). Ray keeps the latest and the best by ``ndcg@10``.
A killed worker group restarts from the latest checkpoint (``FailureConfig``); rerunning the same
command into the same OUT resumes too: the job is staged in ``.OUT.partial`` (``RunConfig(name=
"train", storage_path=.OUT.partial/checkpoints)``), renamed to OUT when it is done; the validated
input is written there once (``work/validated``), so a resumed run reads the same rows in the same
order. Checkpoint files are read with ``weights_only=True`` (``load_tensors``).

Data position. The order of an epoch is a function of (input, world size, seed, epoch): Ray Data
runs with ``preserve_order`` so the equal split hands every worker the same rows each time, and
each worker shuffles locally with seed ``seed * 1000 + epoch``. A resumed run re-opens the
checkpoint's epoch and skips the first ``step_in_epoch`` batches on every rank (read, not
tokenised or encoded), so it continues with the batches it would have trained on. The rule is
exact only for the same input and ``num_workers`` (enforced: a rerun with a different train/encoder/
read config or input is refused); dropout noise after a resume is reseeded, not replayed.

Evaluation runs on rank 0 at the steps of ``eval_every`` and at the end (the other ranks wait in
``ray.train.report``, which every rank calls at the same steps); its metrics go into that report.
Rank 0 appends a line to ``OUT/metrics.jsonl`` every ``log_every`` steps and at every report: loss,
lr, pairs/s, the wall ``seconds`` since the previous line (data wait included) and the worker's
``cpu_seconds`` meanwhile; with ``log_every=1`` these are per-step timings (``benchmarks/train.py``).
The export is built on the driver from the final checkpoint, so the exported folder holds exactly
the checkpointed weights.

Refresh (``train.refresh_every`` > 0, ANCE). Every batch takes its negatives through
``mining.refresh.current_negatives``: rows a round re-mined (in the ``NegativeStore``) win, others
keep the batch's own (step 0 = the mine job); the mean staleness (steps behind) is a metric. Rank 0
(``RefreshRounds``) saves the live model to ``OUT/refresh/step-N/model`` every ``refresh_every``
steps and starts a round as a Ray task on a slice of the queries; training never waits for it. One
round in flight at most (a due round is skipped and counted); a round still running at the end is
cancelled. Its encoder actors and shards take fractions of a CPU so they fit beside the workers.

Cost per step and worker: 2 + H encoder forwards and backwards of B/W texts (H = hard negatives),
the all-gather of the embeddings, DDP's all-reduce of the gradients; GradCache adds one forward.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mining.refresh import NegativeStore, current_negatives
from pairmill.pairs import text_key
from training.losses import GradCache, InfoNCELoss, encode_by_length

RUN_NAME = "train"
FAIL_AT_STEP_ENV = "PAIRMILL_TRAIN_FAIL_AT_STEP"  # test hook: the last rank raises once at this step
# test hook: while a refresh round is in flight, every step also sleeps this long, as a step on an
# accelerator leaves the CPUs to the round; steps with no round in flight run at full speed
STEP_SLEEP_ENV = "PAIRMILL_TRAIN_STEP_SLEEP_S"
BATCH_COLUMNS = ["id", "query", "passage", "negatives"]
# train.length_group_overhead when empty, on CPU: tokens one extra forward is worth. 64-128 were
# fastest on the sample (benchmarks/length_groups.py: 1.13-1.14x one padded forward per side, 256:
# 1.12x, 384: 1.09x). Elsewhere length grouping (and GradCache's length-sorted chunks) is off: on an
# H100 (MiniLM shapes, bf16, batches 32-1024) every split was 2-30x slower than one padded forward
# (36 ms -> 160-360 ms at batch 32), though it cut tokens by 20-55%; not yet understood (widths
# rounded up to a multiple of 8 helped only a little).
LENGTH_GROUP_OVERHEAD_CPU = 128
# A refresh round runs beside the Train workers: its encoder actors and index shards take a fraction
# of a CPU each so they never hold the slots the workers' data ingest needs (RAY_NOTES: deadlock).
REFRESH_ACTOR_CPUS = 0.5
REFRESH_SHARD_CPUS = 0.25
PAIRS_PER_STORE_SHARD = 1_000_000  # NegativeStore actors: each holds its pairs' refreshed negative texts
# The score of a checkpoint reported without an evaluation (Ray ranks every checkpoint by ndcg@10).
# NaN served until a worker failed: Ray 2.60's checkpoint manager keeps its state as JSON, which
# turns NaN into null, and then multiplies null by the score order (_get_checkpoint_score), so the
# controller crashed instead of restarting the workers. nDCG lies in [0, 1]: -1 ranks below every
# evaluated checkpoint and survives JSON.
UNEVALUATED = -1.0


# ----------------------------------------------------------------------------- batches (in memory)


def hard_negatives(
    negatives: Sequence[Sequence[str] | None], negative_ids: Sequence[Sequence[int] | None] | None, k: int
) -> tuple[list[list[str]], list[list[int]]]:
    """Up to ``k`` hard negatives per pair and their text ids (``negative_ids`` when given, else
    ``text_key``). The one place a batch's negatives are chosen: a refresher that supplies fresher
    negatives by pair id replaces the two lists this returns."""
    texts, ids = [], []
    for i, row in enumerate(negatives):
        row = list(row or [])[:k]
        given = negative_ids[i] if negative_ids is not None and negative_ids[i] is not None else None
        texts.append(row)
        ids.append(list(given)[: len(row)] if given is not None else [text_key(t) for t in row])
    return texts, ids


@dataclass
class PairBatch:
    """One worker's batch as texts and ids; the negatives are flat, ``negative_mask`` places them."""

    queries: list[str]  # (B,) with the query prefix
    passages: list[str]  # (B,) with the passage prefix
    negatives: list[str]  # (M,) with the passage prefix, row-major over the valid slots of negative_mask
    negative_mask: Tensor  # (B, H) bool, True = a real negative
    positive_ids: Tensor  # (B,) int64 text_key of each passage
    negative_ids: Tensor  # (B, H) int64 text_key of each negative, 0 in padded slots


def build_batch(columns: dict[str, list], *, hard_negative_count: int, query_prefix: str, passage_prefix: str) -> PairBatch:
    """Columns of validated pairs (``query``, ``passage``, optional ``negatives`` / ``negative_ids``)
    -> a ``PairBatch`` with ``hard_negative_count`` slots per pair (ragged rows padded, masked)."""
    B, H = len(columns["query"]), hard_negative_count
    texts, ids = hard_negatives(columns.get("negatives") or [None] * B, columns.get("negative_ids"), H)
    mask = torch.zeros(B, H, dtype=torch.bool)
    negative_ids = torch.zeros(B, H, dtype=torch.int64)
    for i, row in enumerate(ids):
        mask[i, : len(row)] = True
        negative_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return PairBatch(
        queries=[query_prefix + q for q in columns["query"]],
        passages=[passage_prefix + p for p in columns["passage"]],
        negatives=[passage_prefix + t for row in texts for t in row],
        negative_mask=mask,
        positive_ids=torch.tensor([text_key(p) for p in columns["passage"]], dtype=torch.int64),
        negative_ids=negative_ids,
    )


def place_negatives(flat: Tensor | None, mask: Tensor, query: Tensor) -> Tensor:
    """(M, D) embeddings of the valid slots -> (B, H, D), zeros in padded slots (masked in the loss).

    A batch without negatives (``flat`` None) takes a 0-row slice of ``query`` (B, D), so its zeros
    still hang off the graph: the loss all-gathers the negatives and all-reduces their gradient in
    backward, and a rank whose batch happens to have no negatives must run that all-reduce too, or
    the ranks' collectives no longer match (gloo aborts the step; NCCL hangs)."""
    if flat is None:
        flat = query[:0]
    B, H = mask.shape
    slots = mask.reshape(-1).nonzero().squeeze(1)  # (M,)
    out = flat.new_zeros(B * H, flat.shape[-1]).index_copy(0, slots, flat)  # differentiable
    return out.view(B, H, flat.shape[-1])


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate factor at ``step``: linear warmup from 0, then linear/cosine decay to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def steps_per_epoch(valid_rows: int, num_workers: int, per_worker_batch: int) -> int:
    """Ray's equal split gives every worker floor(N / W) rows; drop_last keeps whole batches."""
    return (valid_rows // num_workers) // per_worker_batch


# ----------------------------------------------------------------------------- model


def _setup_model(model: str | None, lora: dict | None, device: torch.device | str = "cpu"):
    """The sentence-transformers model, with a LoRA adapter on its transformer when ``lora`` is given.
    A static-embedding model trains its token table itself, in float32 (model2vec saves float16)."""
    from pairmill.encoder import is_static, load_sentence_transformer

    st = load_sentence_transformer(model, device)
    if is_static(st):
        if lora:
            raise ValueError(f"{model} is a static-embedding model: LoRA needs a transformer. Train its token vectors "
                             "directly with train.lora_rank=0")
        return st.float()
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            target_modules=list(lora["targets"]) or None,  # None = peft's default for the architecture
            task_type="FEATURE_EXTRACTION",
        )
        st[0].model = get_peft_model(st[0].model, config)
    return st


def make_tokenize(st) -> Callable[[Sequence[str], int], dict[str, Tensor]]:
    """``tokenize(texts, max_length)`` -> the model's input: a padded (B, T) batch from a
    transformer's tokenizer, or flat token ids and offsets for a static-embedding model."""
    from pairmill.encoder import is_static, static_features

    if is_static(st):
        return lambda texts, max_length: static_features(st.tokenizer, texts, max_length)
    return lambda texts, max_length: st.tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                                                  return_tensors="pt")


def _freeze_unused(st: nn.Module, tokenize, device) -> list[str]:
    """Freeze parameters that never reach the sentence embedding (BERT's pooler), found by one probe
    backward: DDP without ``find_unused_parameters`` would otherwise wait for their gradients forever."""
    features = _to_device(tokenize(["probe text", "x"], 16), device)
    st(features)["sentence_embedding"].sum().backward()
    unused = [name for name, p in st.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in st.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def trainable_state(st: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().cpu() for name, p in st.named_parameters() if p.requires_grad}


def load_trainable_state(st: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(st.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks: {missing[:5]}; was it made with another model or LoRA setting?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _to_device(features, device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in features.items()}


def _setup_optimizer(st: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on biases and LayerNorm weights (1-d parameters)."""
    params = [p for p in st.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # The fused kernel (what transformers' Trainer picks by default): one pass over all parameters
    # instead of a loop of ops per tensor. Measured on 2 CPUs with all-MiniLM-L6-v2: 18 ms a step
    # against 91-97 ms for foreach/for-loop, ~3% of a training step at batch 32.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        **({"fused": True} if fused else {}),
    )


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, st: nn.Module, optimizer, scheduler, state: dict) -> None:
    torch.save(trainable_state(st), folder / "model.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "state.json").write_text(json.dumps(state))


def load_tensors(path: Path) -> Any:
    """A checkpoint file read as tensors and plain containers only (``weights_only=True``): a
    checkpoint folder may come from anywhere (a shared bucket, a colleague), and a full unpickle
    runs whatever code it names. torch < 2.6 (which ``torch>=2.4`` allows) unpickled fully by default."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _restore(checkpoint, st: nn.Module, optimizer, scheduler) -> dict:
    """Load a Ray checkpoint into the (unwrapped) model, optimizer and scheduler; its state.json."""
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "step_in_epoch": 0, "pairs": 0}
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        load_trainable_state(st, load_tensors(folder / "model.pt"))
        optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(folder / "scheduler.pt"))
        return json.loads((folder / "state.json").read_text())


# ----------------------------------------------------------------------------- evaluation on rank 0


@torch.no_grad()
def encode_texts(st: nn.Module, tokenize, texts: Sequence[str], max_length: int, device, autocast, batch_size: int = 32):
    """(N, D) float32 numpy embeddings, batches sorted by length as ``pairmill.encoder.Encoder`` does."""
    import numpy as np

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), _embedding_dim(st)), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        features = tokenize([texts[i] for i in rows], max_length)
        with autocast():
            out[rows] = st(_to_device(features, device))["sentence_embedding"].float().cpu().numpy()
    return out


def _embedding_dim(st) -> int:
    return int(st.get_embedding_dimension() if hasattr(st, "get_embedding_dimension") else st.get_sentence_embedding_dimension())


def _evaluate(st: nn.Module, tokenize, task, cfg: dict, device, autocast) -> dict[str, float]:
    from pairmill.evaluate import evaluate_embeddings

    was_training = st.training
    st.eval()
    max_length = min(cfg["eval_max_length"], st.max_seq_length or cfg["eval_max_length"])
    q = encode_texts(st, tokenize, [cfg["query_prefix"] + t for t in task.queries], max_length, device, autocast)
    c = encode_texts(st, tokenize, [cfg["passage_prefix"] + t for t in task.corpus], max_length, device, autocast)
    st.train(was_training)
    return evaluate_embeddings(task, q, c, query_batch=cfg["eval_query_batch"], uniformity_sample=cfg["eval_uniformity_sample"])


# ----------------------------------------------------------------------------- refresh rounds (rank 0)


def _say(message: str) -> None:
    """A progress line from a Train worker, shown once on the driver. Ray Train V2 patches ``print``
    in its workers to send a line both to the worker's stdout and to a logger with a console
    handler, so every ``print`` there reached the driver twice (Ray 2.60); writing to the process's
    own stdout skips the patch (Ray's log monitor still forwards it)."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


class RefreshRounds:
    """Rank 0's bookkeeping of ANCE refresh rounds (``mining.refresh``). Every ``every`` steps it
    saves the live model and starts a round as a Ray task; it never waits for one: at most one
    round is in flight, a due round finds the previous one still running is skipped (counted),
    and a finished round is noticed by a zero-timeout ``ray.wait`` at the next step. Its counters
    travel in the checkpoint's state.json, so a resumed run continues the slice rotation."""

    def __init__(self, cfg: dict, save_model):
        self.cfg = cfg
        self.folder = Path(cfg["folder"])
        self.save_model = save_model  # folder -> the live model saved there as a ST folder
        self.inflight: dict | None = None  # {"ref", "step", "t0", "save_seconds"}
        self.started = self.skipped = self.late_skipped = 0
        self.finished: list[dict] = []
        self.staleness_sum = self.staleness_rows = self.refreshed_used = 0.0
        self.step_seconds = self.steps_timed = 0.0
        self.cancelled: dict | None = None

    def state(self) -> dict:
        keys = ("started", "skipped", "late_skipped", "finished", "staleness_sum", "staleness_rows", "refreshed_used",
                "step_seconds", "steps_timed")
        return {k: getattr(self, k) for k in keys}

    def restore(self, state: dict | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg["every"] == 0 and not last  # a round started at the end could never be used

    def start(self, step: int, total: int) -> None:
        from mining.refresh import start_refresh

        if self.inflight is not None:  # one round at a time: this one is skipped, training goes on
            self.skipped += 1
            self.inflight["skipped"] += 1
            return
        if self.finished and step + self.finished[-1]["steps_trained_meanwhile"] >= total:
            # the last round took that many steps: this one would land after the last step and its
            # negatives could never be used, while it slows every step left (measured on 2 CPUs: 6 s
            # -> 10 s a step while a round ran)
            self.skipped += 1
            self.late_skipped += 1
            _say(f"[pairmill] train: refresh round due at step {step} skipped: the last one took "
                 f"{self.finished[-1]['steps_trained_meanwhile']} steps, so it would land after step {total}")
            return
        t0 = time.perf_counter()
        out = self.folder / f"step-{step}"
        model = self.save_model(out / "model")
        save_seconds = time.perf_counter() - t0
        slices = self.cfg["slices"]
        ref = start_refresh(
            str(model), step, pairs=self.cfg["pairs"], index_folder=self.cfg["index_folder"], out=str(out),
            encoder_kwargs=self.cfg["encoder_kwargs"], mine_cfg=self.cfg["mine_cfg"],
            slice_=(self.started % slices, slices), store=self.cfg["store"], pool=self.cfg["pool"],
        )
        self.inflight = {"ref": ref, "step": step, "t0": time.perf_counter(), "save_seconds": save_seconds, "skipped": 0}
        self.started += 1
        _say(f"[pairmill] train: refresh round {self.started} started at step {step} "
             f"(slice {(self.started - 1) % slices + 1}/{slices}; model saved in {save_seconds:.1f}s)")

    def poll(self, step: int) -> dict | None:
        """The round's record when it finished since the last poll, else None. A failed round raises."""
        import ray

        if self.inflight is None or not ray.wait([self.inflight["ref"]], timeout=0)[0]:
            return None
        round_, self.inflight = self.inflight, None
        try:
            stats = ray.get(round_["ref"])
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"the negative refresh round started at step {round_['step']} failed: {e}") from e
        record = {**stats, "finished_by_step": step, "steps_trained_meanwhile": step - round_["step"],
                  "rounds_skipped_meanwhile": round_["skipped"], "wall_seconds": round(time.perf_counter() - round_["t0"], 3),
                  "save_seconds": round(round_["save_seconds"], 3)}
        self.finished.append(record)
        with open(self.folder / "rounds.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for older in self.finished[:-1]:  # the newest finished round holds the live index; older ones are spent
            shutil.rmtree(self.folder / f"step-{older['step']}", ignore_errors=True)
        _say(f"[pairmill] train: refresh round of step {record['step']} finished at step {step}: "
             f"{record['refreshed']} pairs re-mined in {record['seconds']:.1f}s ({record['rounds_skipped_meanwhile']} due "
             "round(s) skipped meanwhile)")
        return record

    def metrics(self) -> dict:
        out = {"refresh_rounds_started": self.started, "refresh_rounds_finished": len(self.finished),
               "refresh_rounds_skipped": self.skipped}
        if self.finished:
            last = self.finished[-1]
            out.update({"refresh_last_step": last["step"], "refresh_last_seconds": last["seconds"],
                        "refresh_last_pairs": last["refreshed"]})
        return out

    def close(self, step: int) -> None:
        """End of training: a round still running could never be used, so it is cancelled, not awaited."""
        import ray

        if self.inflight is None or self.poll(step) is not None:
            return
        ray.cancel(self.inflight["ref"], force=True)  # kills its worker; the round's actors go with it
        self.cancelled = {"step": self.inflight["step"], "action": "cancelled", "at_step": step}
        _say(f"[pairmill] train: refresh round of step {self.inflight['step']} cancelled at the end of training")
        self.inflight = None

    def summary(self) -> dict:
        rounds = self.finished
        per_round = sum(r["seconds"] for r in rounds) / len(rounds) if rounds else None
        per_step = self.step_seconds / self.steps_timed if self.steps_timed else None
        return {
            "every": self.cfg["every"],
            "slices": self.cfg["slices"],
            "rounds_started": self.started,
            "rounds_finished": len(rounds),
            "rounds_skipped": self.skipped,
            "rounds_skipped_as_too_late": self.late_skipped,  # of rounds_skipped: would have landed after the last step
            "unfinished_at_end": self.cancelled,  # {"action": "cancelled", ...} or None
            "mean_staleness": round(self.staleness_sum / self.staleness_rows, 3) if self.staleness_rows else None,
            "refreshed_pairs_used": int(self.refreshed_used),
            "seconds_per_round": round(per_round, 3) if per_round is not None else None,
            "seconds_per_step": round(per_step, 4) if per_step is not None else None,
            "round_cost_in_steps": round(per_round / per_step, 1) if per_round and per_step else None,
            "model_save_seconds_per_round": round(sum(r["save_seconds"] for r in rounds) / len(rounds), 3) if rounds else None,
            "rounds": rounds,
        }


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(cfg: dict) -> dict:
    import contextlib

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pairmill.cluster import model_malloc

    model_malloc()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray CPUs are logical slots: use this worker's share of the node's cores
        share = max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
        # ... less one when refresh rounds encode beside the steps: with every core taken, torch's
        # threads wait on each other at every op (measured: steps 10x slower while a round ran, 2 cores)
        torch.set_num_threads(max(1, share - 1) if cfg["refresh"] else share)
    # bf16 autocast on GPU (the loss itself runs in fp32), plain fp32 on CPU
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    torch.manual_seed(cfg["seed"])  # same LoRA init on every rank
    st = _setup_model(cfg["model"], cfg["lora"], device)
    tokenize = make_tokenize(st)
    # The model's own limit wins: a 128-position model given max_length 256 indexes past its embeddings.
    query_max = min(cfg["query_max_length"], st.max_seq_length or cfg["query_max_length"])
    passage_max = min(cfg["passage_max_length"], st.max_seq_length or cfg["passage_max_length"])
    st.train()
    frozen = _freeze_unused(st, tokenize, device)
    optimizer = _setup_optimizer(st, cfg["lr"], cfg["weight_decay"])
    total = cfg["total_steps"]
    warmup = int(cfg["warmup_ratio"] * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total, cfg["schedule"]))
    state = _restore(ray.train.get_checkpoint(), st, optimizer, scheduler)
    refresh = cfg["refresh"]
    store = refresh["store"] if refresh else None  # pair id -> refreshed negatives; every rank reads it
    rounds = None
    if refresh and rank == 0:
        rounds = RefreshRounds(refresh, lambda folder: save_live_model(st, folder, model=cfg["model"], lora=cfg["lora"]))
        rounds.restore(state.get("refresh"))
    start_step = step = state["step"]
    epoch, skip, pairs = state["epoch"], state["step_in_epoch"], state["pairs"]
    torch.manual_seed(cfg["seed"] + 1_000_003 * start_step + rank)  # dropout differs per rank and per resume
    if rank == 0:
        _truncate_metrics(Path(cfg["metrics_path"]), start_step)
        _say(f"[pairmill] train: {world} worker(s) on {device}, {total} steps, starting at step {step} "
             f"(epoch {epoch}, batch {skip}); {len(frozen)} unused parameter(s) frozen")
    # Embedding buffers (position ids) are constants, so DDP need not broadcast them every forward;
    # that also lets ranks run different numbers of forwards (ragged hard negatives, GradCache chunks).
    model = ray.train.torch.prepare_model(st, parallel_strategy_kwargs={"broadcast_buffers": False})
    loss_fn = InfoNCELoss(cfg["temperature"], cfg["symmetric"])
    encode = lambda m, features: _encode(m, features, autocast)  # noqa: E731
    by_length = device.type == "cpu"  # measured faster on CPU, slower on GPU (LENGTH_GROUP_OVERHEAD_CPU)
    from pairmill.encoder import is_static

    if cfg["mini_batch_size"] and is_static(st):
        raise ValueError("train.mini_batch_size (GradCache) splits a padded batch by rows; a static-embedding model's "
                         "input is not one. Leave train.mini_batch_size empty: a static model's step is cheap anyway")
    grad_cache = GradCache(model, cfg["mini_batch_size"], encode, by_length=by_length) if cfg["mini_batch_size"] else None
    overhead = cfg["length_group_overhead"]
    if overhead is None:
        overhead = LENGTH_GROUP_OVERHEAD_CPU if by_length else 0
    task = ray.get(cfg["eval_task"]) if cfg["eval_task"] is not None and rank == 0 else None
    trainable = [p for p in st.parameters() if p.requires_grad]
    shard = ray.train.get_dataset_shard("train")

    loss_sum, loss_steps, t_last, steps_last = 0.0, 0, time.perf_counter(), step
    cpu_last = time.process_time()  # this worker's CPU seconds: a load-independent cost next to the wall time
    stale_sum, stale_rows, fresh_rows = 0, 0, 0  # since the last log line: staleness of the negatives used
    while step < total:
        batches = shard.iter_batches(
            batch_size=cfg["per_worker_batch"], batch_format="pyarrow", drop_last=True,
            local_shuffle_buffer_size=cfg["shuffle_buffer"], local_shuffle_seed=cfg["seed"] * 1000 + epoch,
        )
        for i, table in enumerate(batches):
            if i < skip:  # resume: these batches were trained on before the checkpoint
                continue
            if cfg["step_sleep"] and rounds is not None and rounds.inflight is not None:
                time.sleep(cfg["step_sleep"])
            t_step = time.perf_counter()
            columns = {c: table.column(c).to_pylist() for c in table.column_names}
            # The store's refreshed negatives win over the batch's own (mined at step 0 by the mine job)
            columns["negatives"], columns["negative_ids"], mined_at = current_negatives(
                columns["id"], columns["negatives"], columns.get("negative_ids") or [None] * len(columns["id"]), store)
            stale_sum += sum(step - s for s in mined_at)
            stale_rows += len(mined_at)
            fresh_rows += sum(s > 0 for s in mined_at)
            batch = build_batch(
                columns,
                hard_negative_count=cfg["hard_negatives"], query_prefix=cfg["query_prefix"],
                passage_prefix=cfg["passage_prefix"],
            )
            q_features = _to_device(tokenize(batch.queries, query_max), device)
            p_features = _to_device(tokenize(batch.passages, passage_max), device)
            n_features = _to_device(tokenize(batch.negatives, passage_max), device) if batch.negatives else None
            mask, pos_ids, neg_ids = batch.negative_mask.to(device), batch.positive_ids.to(device), batch.negative_ids.to(device)

            def loss_of(q: Tensor, p: Tensor, n_flat: Tensor | None = None) -> Tensor:
                # q, p: (B, D); n_flat: (M, D) -> negatives (B, H, D)
                negatives = place_negatives(n_flat, mask, q)
                return loss_fn(q, p, negatives, mask, pos_ids, neg_ids)

            groups = [q_features, p_features] + ([n_features] if n_features is not None else [])
            optimizer.zero_grad(set_to_none=True)
            if grad_cache is not None:
                loss = grad_cache.forward_backward(groups, loss_of)
            else:
                loss = loss_of(*[encode_by_length(model, g, overhead, encode) for g in groups])
                loss.backward()
            if cfg["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            step += 1
            skip = 0
            pairs += cfg["global_batch"]
            loss_sum += loss.item()
            loss_steps += 1

            last = step >= total
            if rounds is not None:
                rounds.step_seconds += time.perf_counter() - t_step  # compute only: no data wait, eval or checkpoint
                rounds.steps_timed += 1
                rounds.poll(step)
                if rounds.due(step, last):
                    rounds.start(step, total)  # saves the model, starts the round, returns: training goes on
            do_eval = task is not None and (last or (cfg["eval_every"] and step % cfg["eval_every"] == 0))
            do_checkpoint = last or step % cfg["checkpoint_every"] == 0
            do_report = do_checkpoint or (cfg["eval_every"] and step % cfg["eval_every"] == 0)
            if step % cfg["log_every"] == 0 or do_report:
                elapsed = time.perf_counter() - t_last
                metrics = {
                    "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                    "loss": _mean_over_ranks(loss_sum / max(1, loss_steps), device, world),
                    "pairs_per_s": round((step - steps_last) * cfg["global_batch"] / max(elapsed, 1e-9), 2),
                    "seconds": round(elapsed, 4),  # wall time of the steps since the last line (data wait included)
                    "cpu_seconds": round(time.process_time() - cpu_last, 4),  # this worker process, all its threads
                    "pairs": pairs,
                }
                if refresh:
                    stale, rows, fresh = _sum_over_ranks([stale_sum, stale_rows, fresh_rows], device, world)
                    metrics["negative_staleness"] = round(stale / max(1, rows), 3)  # steps behind, mean over pairs
                    metrics["refreshed_pairs_used"] = int(fresh)
                    stale_sum, stale_rows, fresh_rows = 0, 0, 0
                    if rounds is not None:
                        rounds.staleness_sum += stale
                        rounds.staleness_rows += rows
                        rounds.refreshed_used += fresh
                        metrics.update(rounds.metrics())
                loss_sum, loss_steps, t_last, steps_last = 0.0, 0, time.perf_counter(), step
                cpu_last = time.process_time()
                if rank == 0:
                    _say(f"[pairmill] train: step {step}/{total} epoch {epoch} loss {metrics['loss']:.4f} "
                         f"lr {metrics['lr']:.2e} {metrics['pairs_per_s']:.1f} pairs/s")
            if rank == 0 and step % cfg["log_every"] == 0 and not do_report:  # a report step's line is written below
                _append_metrics(Path(cfg["metrics_path"]), metrics)
            if do_report:
                if do_eval:
                    t0 = time.perf_counter()
                    metrics.update(_evaluate(st, tokenize, task, cfg, device, autocast))
                    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
                    _say(f"[pairmill] train: step {step} eval ndcg@10 {metrics['ndcg@10']:.4f} "
                         f"recall@10 {metrics['recall@10']:.4f} mrr@10 {metrics['mrr@10']:.4f}")
                reported = dict(metrics)
                if cfg["eval_task"] is not None and "ndcg@10" not in reported:
                    reported["ndcg@10"] = UNEVALUATED  # ranks below every evaluated checkpoint
                if rank == 0:
                    _append_metrics(Path(cfg["metrics_path"]), metrics)
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if do_checkpoint and rank == 0:
                        state = {"step": step, "epoch": epoch + (i + 1 == cfg["steps_per_epoch"]),
                                 "step_in_epoch": 0 if i + 1 == cfg["steps_per_epoch"] else i + 1, "pairs": pairs}
                        if rounds is not None:
                            state["refresh"] = rounds.state()
                        save_checkpoint(Path(tmp), st, optimizer, scheduler, state)
                        checkpoint = Checkpoint.from_directory(tmp)
                    ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:07d}" if do_checkpoint else None)
            if cfg["fail_at_step"] == step and start_step == 0 and rank == world - 1:
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={step}: test hook, this worker fails once")
            if last:
                break
        if step < total:
            epoch += 1
    if rounds is not None:
        rounds.close(step)
    return {"step": step, "start_step": start_step, "epoch": epoch, "pairs": pairs,
            "refresh": rounds.summary() if rounds is not None else None}


def _encode(model: nn.Module, features: dict[str, Tensor], autocast) -> Tensor:
    with autocast():
        return model(features)["sentence_embedding"]  # (rows, D)


def _mean_over_ranks(value: float, device, world: int) -> float:
    if world == 1:
        return round(value, 6)
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return round(float(t) / world, 6)


def _sum_over_ranks(values: list[float], device, world: int) -> list[float]:
    if world == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _append_metrics(path: Path, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines up to the checkpoint we resume from: later ones are reported again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- export


def export_model(checkpoint_dir: str | Path, out: str | Path, *, model: str | None, lora: dict | None, merge: bool) -> Path:
    """Write the checkpoint's model as a sentence-transformers folder at ``out`` (atomically)."""
    st = _setup_model(model, lora, "cpu")
    load_trainable_state(st, load_tensors(Path(checkpoint_dir) / "model.pt"))
    if lora and merge:
        st[0].model = st[0].model.merge_and_unload()
    return _save_atomically(st, Path(out))


def save_live_model(st: nn.Module, out: str | Path, *, model: str | None, lora: dict | None) -> Path:
    """The model being trained (unwrapped from DDP) as a plain sentence-transformers folder at ``out``,
    for a refresh round to encode with. LoRA: merged into a CPU copy, the training model is untouched."""
    if lora:
        with torch.random.fork_rng(devices=[]):  # the copy's LoRA init must not move the dropout RNG
            copy = _setup_model(model, lora, "cpu")
        load_trainable_state(copy, trainable_state(st))
        copy[0].model = copy[0].model.merge_and_unload()
        st = copy
    return _save_atomically(st, Path(out))


def _save_atomically(st: nn.Module, out: Path) -> Path:
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    st.save(str(partial))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(partial, out)
    return out


# ----------------------------------------------------------------------------- the job


def lora_settings(train_cfg) -> dict | None:
    """The train section's LoRA settings as the loop and ``export_model`` take them (None: full fine-tuning)."""
    if not train_cfg.lora_rank:
        return None
    alpha = train_cfg.lora_alpha if train_cfg.lora_alpha is not None else 2 * train_cfg.lora_rank
    return {"rank": train_cfg.lora_rank, "alpha": alpha, "targets": list(train_cfg.lora_targets)}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_same_run(folder: Path, run: dict, run_name: str = RUN_NAME) -> None:
    """A rerun resumes the checkpoints in ``folder``: refuse when what they were made from differs."""
    changed = _changed_run(folder, run, run_name)
    if changed:
        raise ValueError(
            f"{folder} holds checkpoints of a run with different settings ({', '.join(changed)}); a rerun into "
            "the same folder resumes that run. Use a new -o folder, or delete this one to start over."
        )
    saved_path = folder / "checkpoints" / "run.json"
    saved_path.parent.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(run, indent=2))


def _changed_run(folder: Path, run: dict, run_name: str) -> list[str]:
    """The settings (and "input") that differ from the run whose checkpoints ``folder`` holds; [] if none."""
    from pairmill.config import changed_settings

    saved_path = folder / "checkpoints" / "run.json"
    if not saved_path.exists() or not any((folder / "checkpoints" / run_name).glob("step_*")):
        return []
    saved = json.loads(saved_path.read_text())
    return changed_settings(saved, run) + (["input"] if saved.get("input") != run["input"] else [])


def _reopen_finished(out: Path, run: dict, run_name: str) -> None:
    """A finished OUT rerun with the same settings continues from its last checkpoint (so nothing
    is trained again: the model is exported again): it moves back into its staging folder, where
    its checkpoints were written, until the rerun commits. Other settings are refused, OUT kept."""
    from pairmill.output import resumable_staging

    staging = resumable_staging(out)
    if staging.exists() or not (out / "_SUCCESS").exists() or not (out / "checkpoints").is_dir():
        return
    changed = _changed_run(out, run, run_name)
    if changed:
        raise ValueError(
            f"{out} holds a finished run with different settings ({', '.join(changed)}); rerunning the same "
            "command resumes it. Use a new -o folder, or delete this one to start over."
        )
    os.rename(out, staging)


def train(pairs_path: str, out: str, *, encoder, read, train_cfg, eval_cfg, ray, mine_cfg=None,
          run_name: str = RUN_NAME, callbacks: list | None = None, resources_per_worker: dict | None = None,
          in_place: bool = False) -> dict:
    """Run the train job; returns the stats written to ``OUT/stats.json``. ``mine_cfg`` (the mine
    section) holds the selection rules of refresh rounds (``train.refresh_every``). ``run_name``,
    ``callbacks`` and ``resources_per_worker`` go to Ray Train as they are (the tune job names each
    trial's run, passes ``TuneReportCallback`` and sizes the workers).

    The job folder is built in ``.OUT.partial`` beside OUT (checkpoints, metrics, refresh rounds,
    the model) and renamed into place after its counts are checked: an interrupted run leaves the
    staging folder, and rerunning the same command resumes there. ``in_place`` writes OUT itself
    (a tune trial, whose folder is inside the tune job's own staging folder)."""
    import dataclasses

    import ray as ray_lib
    import yaml
    from ray.data.aggregate import Count, Sum
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pairmill.cluster import init_ray
    from pairmill.config import MineConfig, config_to_dict
    from pairmill.embed import read_kwargs
    from pairmill.encoder import resolve_model
    from pairmill.evaluate import load_task
    from pairmill.output import JobFolder, count_by
    from pairmill.pairs import REJECT_COLUMNS, count_input_rows, write_validated

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    final_dir = Path(out).expanduser().resolve()
    mine_cfg = mine_cfg or MineConfig()
    refreshing = train_cfg.refresh_every > 0
    sections = {"encoder": encoder, "read": read, "train": train_cfg, "eval": eval_cfg, "ray": ray,
                **({"mine": mine_cfg} if refreshing else {})}
    run = {"input": str(Path(pairs_path).resolve()),
           **{s: dataclasses.asdict(sections[s]) for s in ("encoder", "read", "train") + (("mine",) if refreshing else ())}}
    for key in ("max_failures", "log_every", "eval_every", "checkpoint_every", "placement_strategy"):  # free to change on a resume
        run["train"].pop(key)
    if not in_place:
        _reopen_finished(final_dir, _plain(run), run_name)
    job = JobFolder(final_dir, parts=(), resume=not in_place, in_place=in_place)
    out_dir = job.staging  # everything is written here; commit renames it to OUT
    _check_same_run(out_dir, _plain(run), run_name)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(_plain(config_to_dict(sections)), sort_keys=False))

    # -- read and validate: rejects to OUT/rejected, counts for the step plan -------------------
    t0 = time.perf_counter()
    validated = out_dir / "work" / "validated"
    if not (validated / "_DONE").exists():  # a resumed run reads the rows, in the order, the first one did
        shutil.rmtree(validated, ignore_errors=True)
        write_validated(pairs_path, validated, "pairs", **read_kwargs(read))
        (validated / "_DONE").write_text("")
    parsed = ray_lib.data.read_parquet(str(validated), file_extensions=["parquet"])
    shutil.rmtree(out_dir / "rejected", ignore_errors=True)
    (out_dir / "rejected").mkdir()
    parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS).write_parquet(str(out_dir / "rejected"))
    valid = parsed.filter(expr=col("reason").is_null()).select_columns(BATCH_COLUMNS)
    totals = valid.map_batches(_negative_counts, batch_format="pyarrow").aggregate(Count(), Sum("has_negatives"))
    valid_rows, with_negatives = int(totals["count()"]), int(totals["sum(has_negatives)"] or 0)
    rejected = count_by(out_dir / "rejected", "reason")
    input_rows = count_input_rows(pairs_path)  # from the input itself: the commit checks the counts against it
    read_seconds = time.perf_counter() - t0

    per_worker = train_cfg.batch_size // train_cfg.num_workers
    per_epoch = steps_per_epoch(valid_rows, train_cfg.num_workers, per_worker)
    if per_epoch == 0:
        raise ValueError(
            f"{pairs_path}: {valid_rows} valid pairs make no full batch of train.batch_size={train_cfg.batch_size} "
            f"over train.num_workers={train_cfg.num_workers}; use a smaller batch_size or more pairs"
        )
    total_steps = train_cfg.max_steps or train_cfg.epochs * per_epoch
    hard = train_cfg.hard_negatives if with_negatives or refreshing else 0
    if train_cfg.hard_negatives and not with_negatives:
        print(f"[pairmill] train: {pairs_path} has no `negatives`; training on in-batch negatives only"
              + (" until the first refresh round" if refreshing else ""))
    if refreshing and train_cfg.refresh_every >= total_steps:
        print(f"[pairmill] train: train.refresh_every={train_cfg.refresh_every} >= {total_steps} steps: no refresh round will run")
    use_gpu = train_cfg.use_gpu if train_cfg.use_gpu is not None else bool(ray_lib.cluster_resources().get("GPU"))
    store = NegativeStore.create(max(1, math.ceil(valid_rows / PAIRS_PER_STORE_SHARD))) if refreshing else None
    task = load_task(eval_cfg.data, eval_cfg.corpus, read_kwargs(read)) if eval_cfg.data else None

    loop_config = {
        "model": resolve_model(encoder.model),
        "query_prefix": encoder.query_prefix,
        "passage_prefix": encoder.passage_prefix,
        "eval_max_length": encoder.max_length,
        "eval_query_batch": eval_cfg.query_batch,
        "eval_uniformity_sample": eval_cfg.uniformity_sample,
        "eval_task": ray_lib.put(task) if task is not None else None,
        "lora": lora_settings(train_cfg),
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
        "per_worker_batch": per_worker,
        "global_batch": train_cfg.batch_size,
        "shuffle_buffer": max(1024, 8 * per_worker),
        "hard_negatives": hard,
        "metrics_path": str(out_dir / "metrics.jsonl"),
        "fail_at_step": int(os.environ.get(FAIL_AT_STEP_ENV, "0")),
        "step_sleep": float(os.environ.get(STEP_SLEEP_ENV, "0")),
        "refresh": _refresh_config(pairs_path, valid, out_dir, store, encoder, train_cfg, mine_cfg, ray.actors,
                                   train_gpus=train_cfg.num_workers if use_gpu else 0) if refreshing else None,
        **{k: getattr(train_cfg, k) for k in (
            "lr", "warmup_ratio", "schedule", "weight_decay", "max_grad_norm", "temperature", "symmetric",
            "mini_batch_size", "length_group_overhead", "query_max_length", "passage_max_length", "checkpoint_every", "eval_every",
            "log_every", "seed")},
    }
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker every epoch (see the data-position rule)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker,
                                     placement_strategy=train_cfg.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            callbacks=callbacks,
            storage_path=str(out_dir / "checkpoints"),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,  # the best and the latest
                checkpoint_score_attribute="ndcg@10" if task is not None else None,
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": valid},
        dataset_config=DataConfig(execution_options=ingest),
    )
    print(f"[pairmill] train: {valid_rows} pairs ({with_negatives} with negatives, {hard} used per pair), "
          f"{train_cfg.num_workers} worker(s) x {per_worker}, {per_epoch} steps/epoch, {total_steps} steps, "
          f"{'GPU' if use_gpu else 'CPU'}")
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if store is not None:
            store.close()
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    with result.checkpoint.as_directory() as folder:
        final_state = json.loads((Path(folder) / "state.json").read_text())
        export_model(folder, out_dir / "model", model=encoder.model, lora=lora_settings(train_cfg), merge=train_cfg.lora_merge)
    export_seconds = time.perf_counter() - t0
    best = None
    if task is not None and result.best_checkpoints:
        checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: _score(cm[1]))
        # where the checkpoint will be once the staging folder is OUT
        path = str(final_dir / Path(checkpoint.path).relative_to(out_dir))
        best = {"step": metrics.get("step"), "ndcg@10": metrics.get("ndcg@10"), "path": path}
    shutil.rmtree(out_dir / "work")
    job.stage("read+validate", input_rows, valid_rows, read_seconds)
    job.stage("train", valid_rows, final_state["pairs"], train_seconds)
    job.stage("export", 1, 1, export_seconds)
    stats = {
        "input_rows": input_rows,
        "kept": valid_rows,
        "dropped": {},
        "rejected": rejected,
        "unique_ids": True,
        "train": {
            "steps": final_state["step"],
            "epochs_started": final_state["epoch"] + (final_state["step_in_epoch"] > 0),
            "pairs_trained": final_state["pairs"],  # pair-steps, repeats across epochs counted
            "pairs_unused_per_epoch": valid_rows - per_epoch * train_cfg.batch_size,  # equal split + drop_last
            "pairs_with_negatives": with_negatives,
            "hard_negatives_per_pair": hard,
            "steps_per_epoch": per_epoch,
            "resumed_from_step": (result.return_value or {}).get("start_step"),
            "pairs_per_s": round(final_state["pairs"] / max(train_seconds, 1e-9), 2),
        },
        "refresh": (result.return_value or {}).get("refresh"),
        "final_metrics": {k: v for k, v in (result.metrics or {}).items()
                          if not _is_nan(v) and not (k == "ndcg@10" and v == UNEVALUATED)},
        "best_checkpoint": best,
        "base_model": resolve_model(encoder.model),
        "lora": lora_settings(train_cfg),
        "exported_merged": bool(lora_settings(train_cfg) is None or train_cfg.lora_merge),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return job.commit(stats)


def _refresh_config(pairs_path, valid, out_dir: Path, store, encoder, train_cfg, mine_cfg, actors, train_gpus: int) -> dict:
    """What a refresh round needs, sized to run beside the Train workers without taking the CPUs or
    GPUs they and the data ingest need (RAY_NOTES: small-machine deadlock)."""
    import dataclasses

    import ray

    from pairmill.cluster import PoolSize
    from pairmill.embed import encoder_kwargs

    source = Path(pairs_path)
    folder = out_dir / "refresh"
    if (source / "_SUCCESS").exists() and (source / "kept").is_dir():
        pairs = source / "kept"  # a job folder's rows are already validated, with the same ids
    else:
        pairs = folder / "pairs"
        shutil.rmtree(pairs, ignore_errors=True)
        valid.write_parquet(str(pairs))
    index = source / "index"
    index_folder = str(index) if any(index.glob("*.texts.parquet")) else None  # else: the pairs' own passages
    free_gpus = int(ray.cluster_resources().get("GPU", 0)) - train_gpus
    if free_gpus >= 1:
        pool = PoolSize(size=min(actors or 1, free_gpus), num_cpus=1, num_gpus=1)
    else:
        if train_gpus:
            print("[pairmill] train: the Train workers hold every GPU; refresh rounds encode on CPU")
        pool = PoolSize(size=actors or 1, num_cpus=REFRESH_ACTOR_CPUS, num_gpus=0)
    if mine_cfg.shard_gpus:
        print(f"[pairmill] train: mine.shard_gpus={mine_cfg.shard_gpus} has no effect on refresh rounds (CPU shards beside training)")
    return {
        "every": train_cfg.refresh_every,
        "slices": train_cfg.refresh_slices,
        "folder": str(folder),
        "store": store,
        "pairs": str(pairs),
        "index_folder": index_folder,
        "encoder_kwargs": {**encoder_kwargs(encoder), **({} if pool.num_gpus else {"device": "cpu"})},
        "mine_cfg": dataclasses.replace(mine_cfg, shard_cpus=min(mine_cfg.shard_cpus or REFRESH_SHARD_CPUS, REFRESH_SHARD_CPUS),
                                        shard_gpus=0.0),
        "pool": pool,
    }


def _negative_counts(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(batch.column("negatives")), 0)
    return pa.table({"has_negatives": pc.cast(pc.greater(lengths, 0), pa.int64())})


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _score(metrics: dict) -> float:
    value = metrics.get("ndcg@10")
    return float("-inf") if _is_nan(value) or value == UNEVALUATED else value


def format_summary(stats: dict, out: str) -> str:
    from pairmill.embed import format_summary as job_summary

    t = stats["train"]
    lines = [
        job_summary(stats, out),
        f"    trained             {t['steps']} steps, {t['pairs_trained']} pairs, {t['pairs_per_s']} pairs/s "
        f"(resumed from step {t['resumed_from_step']})",
    ]
    m = stats["final_metrics"]
    if "ndcg@10" in m:
        lines.append(f"    held-out            ndcg@10 {m['ndcg@10']:.4f}  recall@10 {m['recall@10']:.4f}  mrr@10 {m['mrr@10']:.4f}")
    if stats["best_checkpoint"]:
        lines.append(f"    best checkpoint     step {stats['best_checkpoint']['step']} ndcg@10 {stats['best_checkpoint']['ndcg@10']:.4f}")
    lines.append(f"    model               {Path(out) / 'model'}")
    return "\n".join(lines)


def main(args) -> int:
    """``pairmill train PAIRS -o OUT [--eval-data D] [--model M]``."""
    cfg = args.config_sections
    stats = train(args.input, args.output, encoder=cfg["encoder"], read=cfg["read"], train_cfg=cfg["train"],
                  eval_cfg=cfg["eval"], ray=cfg["ray"], mine_cfg=cfg["mine"])
    print(format_summary(stats, args.output))
    return 0
