"""Flat configuration per concern, loaded from YAML plus ``key=value`` overrides.

Each concern is a dataclass whose fields have defaults and a help string (``metadata["help"]``).
A job's config is a handful of these sections; a YAML file names them as top-level keys
(``encoder: {model: ...}``) and an override names them dotted (``encoder.batch_size=64``).
Components never receive a config object: jobs turn sections into plain arguments.

One source of truth. A field's default is its class attribute (``MineConfig.range_max``): a function
that takes the same setting defaults to it rather than repeating the number. Facts about a field
(``resume_free``: may change when a run resumes; ``search``/``example``: tune's search space) sit
in its metadata, and ``--help`` is generated from the fields (``pairmill.cli.describe``).

Override values are YAML, except a text field's (``pairmill.config_text`` says how values are read).

Dataclasses rather than pydantic: the checks are cross-field rules whose messages name the fix, and
the coercion the sections need is ~100 lines (``pairmill.config_text``), not a second model layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from typing import Literal


# load_config and the text helpers live in config_text; callers take them from here, beside the sections
from pairmill.config_text import ConfigError, config_to_dict, load_config, profile_overrides, valid_keys  # noqa: F401


def _field(default, help: str, **facts):
    """A setting: its default, its help line, and any other facts about it (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, **facts})


def _check(section: str, checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first failed check: sections validate when built."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# Limits mining and its config must agree on (mining.shard / mining.positives import them from here).
FAISS_GPU_MAX_K = 2048  # FAISS GPU's limit on k (and nprobe) in one search
# Distinct passages of one query carried in each of its rows and searched past in a batch; a query
# with more keeps them once in mining's PositiveStore and is searched with them excluded.
INLINE_POSITIVES = 32


@dataclasses.dataclass
class EncoderConfig:
    """What turns text into vectors. Every stage that encodes reads this one section, and its
    fingerprint names cached embeddings, so two stages can never disagree on it silently."""

    model: str | None = _field(None, "local folder, hub name, or empty for the bundled all-MiniLM-L6-v2")
    query_prefix: str = _field("", "text put before every query (E5 uses 'query: ')")
    passage_prefix: str = _field("", "text put before every passage (E5 uses 'passage: ')")
    max_length: int = _field(256, "tokens per text; longer texts are truncated by the tokenizer")
    batch_size: int | None = _field(
        None, "texts per forward pass; default 32 on CPU (fastest measured here), 256 on GPU"
    )
    device: str = _field("auto", "auto (cuda when present), cpu, cuda, cuda:N")
    backend: Literal["torch", "onnx"] = _field(
        "torch", "torch, or onnx: an int8-quantised ONNX export of the model on onnxruntime, CPU only (pip install "
        "'pairmill[onnx]'; exported once and cached; ~2x torch per CPU-second, vectors at cosine ~0.99 to torch's)"
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _field(
        "auto", "auto = fp16 on GPU; on a CPU bf16 where it has AVX512-BF16/AMX and a one-time probe measured bf16 "
        "faster with the same neighbours (1.9-3.1x on a Zen 4 here), else fp32"
    )

    def __post_init__(self):
        _check("encoder", [
            (self.max_length >= 2, f"encoder.max_length={self.max_length}; use >= 2 (room for the special tokens)"),
            (self.batch_size is None or self.batch_size >= 1, f"encoder.batch_size={self.batch_size}; use >= 1, or empty for the default"),
            (bool(str(self.device).strip()), "encoder.device is empty; use auto, cpu, cuda or cuda:N"),
        ])

    def fingerprint(self) -> str:
        """Names outputs that depend on the embedding function (not on speed settings)."""
        from pairmill.encoder import resolve_model

        key = {
            "model": resolve_model(self.model),
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_length": self.max_length,
            "backend": self.backend,  # int8 vectors are not torch's: never mixed in one cache or index
            # every vector is L2-normalised by the encoder (cosine everywhere); embeddings cached
            # before that rule (un-normalised for a model without Normalize) have other fingerprints
            "unit_length": True,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ReadConfig:
    """How input files become pairs."""

    query_field: str = _field("query", "input column holding the query")
    passage_field: str = _field("passage", "input column holding the passage")
    id_field: str = _field("id", "input column holding a row id; a hash of query and passage when absent")
    text_field: str = _field("text", "input column holding the text (embed of plain text files)")
    label_field: str = _field("label", "input column holding a text's class (setfit, classify): a string or an integer")
    max_chars: int = _field(65536, "characters per text before the too_long rule applies")
    too_long: Literal["truncate", "reject"] = _field(
        "truncate", "truncate long texts (counted in stats as 'truncated') or reject the row"
    )

    def __post_init__(self):
        fields = {"read.query_field": self.query_field, "read.passage_field": self.passage_field,
                  "read.id_field": self.id_field, "read.text_field": self.text_field, "read.label_field": self.label_field}
        _check("read", [
            (self.max_chars >= 1, f"read.max_chars={self.max_chars}; use >= 1 characters"),
            *[(bool(v), f"{k} is empty; name the input column") for k, v in fields.items()],
            (self.query_field != self.passage_field,
             f"read.query_field and read.passage_field are both {self.query_field!r}: name two columns"),
        ])


@dataclasses.dataclass
class EvalConfig:
    """Held-out retrieval evaluation."""

    data: str | None = _field(None, "pairs file or BEIR folder; empty in `run` means the bundled held-out split")
    corpus: str | None = _field(None, "extra passages for a pairs file: JSONL/Parquet, texts in the read.text_field column")
    query_batch: int = _field(1024, "queries scored against the corpus at a time (memory: batch x corpus floats)")
    uniformity_sample: int = _field(4096, "embeddings sampled for the uniformity metric")

    def __post_init__(self):
        _check("eval", [
            (self.query_batch >= 1, f"eval.query_batch={self.query_batch}; use >= 1"),
            (self.uniformity_sample >= 2, f"eval.uniformity_sample={self.uniformity_sample}; use >= 2 (it scores pairs)"),
        ])


@dataclasses.dataclass
class RayConfig:
    """Where the work runs."""

    address: str | None = _field(None, "Ray address; empty = RAY_ADDRESS if set, else a local Ray")
    num_cpus: int | None = _field(None, "logical CPUs of a local Ray (default: max(4, 2 x cores), see README)")
    actors: int | None = _field(None, "encoder actors; default: one per GPU, else sized from free CPUs")

    def __post_init__(self):
        _check("ray", [
            (self.num_cpus is None or self.num_cpus >= 1, f"ray.num_cpus={self.num_cpus}; use >= 1 or empty"),
            (self.actors is None or self.actors >= 1, f"ray.actors={self.actors}; use >= 1 or empty"),
        ])


@dataclasses.dataclass
class MineConfig:
    """Hard-negative mining (`pairmill mine`) and the sharded index it builds."""

    num_negatives: int = _field(4, "negatives per pair")
    method: Literal["dense", "bm25", "hybrid"] = _field("dense", "candidates from the dense index, BM25 (DPR), or hybrid "
                                                        "(reciprocal rank fusion of both); scored by cosine in every method")
    range_min: int = _field(0, "first rank (0 = hardest) of the window negatives are taken from, after positives and "
                               "candidates over the margin (margin_ratio, max_score) are removed")
    range_max: int = _field(30, "end of that rank window (exclusive)")
    range_min_final: int | None = _field(None, "curriculum (easy -> hard), applied by refresh rounds: the round at step s of "
                                         "T mines from range_min + (range_min_final - range_min) x s/T; empty = no move")
    range_max_final: int | None = _field(None, "curriculum: the same for range_max; empty = no move")
    margin_ratio: float | None = _field(
        0.95, "drop candidates scoring above this x the positive's score (NV-Retriever TopK-PercPos); empty = off"
    )
    max_score: float | None = _field(None, "drop candidates scoring above this cosine; empty = off")
    min_negative_words: int = _field(
        0, "corpus passages with fewer words never become negatives (web junk such as a bare name or 'coming soon' "
        "ranks high for short queries); they stay in the pairs. Words split on whitespace; in scripts written without "
        "spaces (CJK, Thai) each character counts. 0 = off")
    sampling: Literal["top", "random"] = _field("top", "take the highest-scoring candidates, or sample in the window")
    seed: int = _field(0, "seed of random sampling")
    pad: Literal["none", "random"] = _field(
        "none", "pairs left short of num_negatives: keep them short (counted), or pad with random passages (marked)"
    )
    shards: int | None = _field(None, "index shards (Ray actors); default: one per 2M corpus passages")
    shard_cpus: float | None = _field(
        None, "CPUs per shard actor (FAISS threads follow it); empty = half a node's CPUs, all shards together at "
        "most half the cluster's (a batch search is a multi-threaded GEMM)")
    shard_gpus: float = _field(0.0, "GPUs per shard actor (needs faiss-gpu: pip install 'pairmill[gpu]')")
    index_spec: str = _field("auto", "FAISS factory string, or auto: exact Flat up to 1M 384-d vectors per shard (n x dim <= 384M), else IVF")
    nprobe: int | None = _field(None, "IVF lists visited per search; default nlist/4 (recall@10 >= 0.95 measured)")
    query_batch: int = _field(1024, "queries per search call")

    def __post_init__(self):
        window = self.range_max - self.range_min
        final_min = self.range_min if self.range_min_final is None else self.range_min_final
        final_max = self.range_max if self.range_max_final is None else self.range_max_final
        _check("mine", [
            (self.num_negatives >= 1, f"mine.num_negatives={self.num_negatives}; use >= 1"),
            (0 <= self.range_min < self.range_max,
             f"mine.range_min={self.range_min}, mine.range_max={self.range_max}; use 0 <= range_min < range_max"),
            (window >= self.num_negatives or self.pad == "random",
             f"mine.range_max - mine.range_min = {window} candidates cannot give mine.num_negatives={self.num_negatives}; "
             "widen the window, ask for fewer, or set mine.pad=random"),
            (0 <= final_min < final_max and (final_max - final_min >= self.num_negatives or self.pad == "random"),
             f"mine.range_min_final={final_min}, mine.range_max_final={final_max} (empty = range_min / range_max); use 0 <= "
             f"range_min_final < range_max_final, at least mine.num_negatives={self.num_negatives} apart (or mine.pad=random)"),
            (self.shard_gpus == 0 or max(self.range_max, final_max) + INLINE_POSITIVES <= FAISS_GPU_MAX_K,
             f"mine.range_max={self.range_max} with GPU shards: searches go range_max + {INLINE_POSITIVES} deep and FAISS "
             f"GPU stops at k={FAISS_GPU_MAX_K}; use range_max (and range_max_final) <= {FAISS_GPU_MAX_K - INLINE_POSITIVES}"),
            (self.margin_ratio is None or self.margin_ratio > 0,
             f"mine.margin_ratio={self.margin_ratio}; use > 0 (0.95 in NV-Retriever), or empty to switch it off"),
            (self.max_score is None or -1 <= self.max_score <= 1,
             f"mine.max_score={self.max_score}; scores are cosines: use -1 <= max_score <= 1, or empty"),
            (self.min_negative_words >= 0, f"mine.min_negative_words={self.min_negative_words}; use >= 0 (0 = off)"),
            (self.shards is None or self.shards >= 1, f"mine.shards={self.shards}; use >= 1 or empty"),
            (self.shard_cpus is None or self.shard_cpus > 0,
             f"mine.shard_cpus={self.shard_cpus}; use > 0 (a fraction is fine, e.g. 0.5), or empty for the default"),
            (self.shard_gpus >= 0, f"mine.shard_gpus={self.shard_gpus}; use >= 0"),
            (self.nprobe is None or self.nprobe >= 1, f"mine.nprobe={self.nprobe}; use >= 1 or empty"),
            (self.query_batch >= 1, f"mine.query_batch={self.query_batch}; use >= 1"),
            (bool(self.index_spec.strip()), "mine.index_spec is empty; use auto or a FAISS factory string such as IVF1024,Flat"),
        ])


@dataclasses.dataclass
class FilterConfig:
    """`pairmill filter`: exact dedup, E5 consistency filter, semantic dedup, decontamination, audit."""

    exact_dedup: bool = _field(True, "drop copies of a (query, passage) pair, compared after whitespace/Unicode normalisation")
    consistency: bool = _field(True, "E5 consistency filter: keep a pair when its passage ranks in the top k against a pool")
    k: int | Literal["auto"] = _field(
        2, "consistency filter: the own passage must rank within the top k (E5 uses 2); auto = the largest k "
        "(1-1000) whose kept pairs are at most filter.auto_mismatched mismatched, estimated on a sample of the data"
    )
    auto_mismatched: float = _field(0.02, "k=auto: the share of mismatched pairs the kept ones may hold, as the audit "
                                          "estimates it (an upper bound: 4.9% on the clean bundled sample, where 0.02 keeps "
                                          "94% of it; 23.7% on it with a fifth of its pairs mismatched, k=100)")
    auto_rows: int = _field(20_000, "k=auto: rows of the data the choice is measured on (a corrupted pair is made of 20% of them)")
    near_copy_eps: float = _field(
        0.05, "consistency filter: a pool passage within cosine 1 - eps of the pair's own passage does not count against it; 0 = off"
    )
    pool_size: int = _field(1_000_000, "consistency filter: random passages in the pool (min(N, this))")
    pool_shards: int | None = _field(None, "index shards holding the pool; default one per 500,000 passages")
    semdedup: bool = _field(True, "SemDeDup: drop near-duplicates (cosine > 1 - eps) within k-means clusters")
    eps: float = _field(0.01, "semantic dedup threshold: a pair is a duplicate above cosine 1 - eps")
    on: Literal["passage", "query", "both"] = _field("passage", "semantic dedup on the passage, the query, or both")
    keep: Literal["hard", "easy", "random"] = _field(
        "hard", "which near-duplicate survives: hard = farthest from the centroid (SemDeDup), easy = closest, random"
    )
    n_clusters: int | None = _field(None, "k-means clusters; default about one per 1,000 rows")
    kmeans_sample: int = _field(100_000, "rows k-means is fitted on (on the driver)")
    max_cluster_rows: int = _field(20_000, "warn when a cluster holds more rows (its m x m similarity must fit a worker)")
    decontaminate: list[str] = _field((), "evaluation pair files: drop training pairs whose query or passage duplicates their texts")
    decontaminate_eps: float = _field(0.05, "decontamination: also drop above cosine 1 - eps; 0 = exact matches only")
    audit: float = _field(0.0, "mix in this fraction of corrupted pairs and report how the consistency filter treats them")
    partitions: int | None = _field(None, "shuffle partitions of the dedup groupbys; default one per 128 MiB of input, at least 2")
    seed: int = _field(0, "seed of pool sampling, k-means, random survivors and the audit")

    def __post_init__(self):
        checks = [
            (self.k == "auto" or self.k >= 1, f"filter.k={self.k}; use k >= 1, or auto"),
            (self.k != "auto" or self.consistency, "filter.k=auto chooses the consistency filter's k: set filter.consistency=true"),
            (0 <= self.auto_mismatched < 1, f"filter.auto_mismatched={self.auto_mismatched}; use a share 0 <= x < 1, e.g. 0.01"),
            (self.auto_rows >= 100, f"filter.auto_rows={self.auto_rows}; use >= 100 (the choice needs corrupted pairs to count)"),
            (0 <= self.near_copy_eps < 1, f"filter.near_copy_eps={self.near_copy_eps}; use 0 <= eps < 1 (0 = off)"),
            (self.pool_size >= 1, f"filter.pool_size={self.pool_size}; use pool_size >= 1"),
            (0 < self.eps < 1, f"filter.eps={self.eps}; use 0 < eps < 1 (0.01 in SemDeDup)"),
            (0 <= self.decontaminate_eps < 1, f"filter.decontaminate_eps={self.decontaminate_eps}; use 0 <= eps < 1"),
            (0 <= self.audit < 1, f"filter.audit={self.audit}; use a fraction 0 <= audit < 1, e.g. 0.2"),
            (not self.audit or self.consistency, "filter.audit measures the consistency filter: set filter.consistency=true"),
            (self.n_clusters is None or self.n_clusters >= 1, f"filter.n_clusters={self.n_clusters}; use >= 1 or empty"),
            (self.partitions is None or self.partitions >= 1, f"filter.partitions={self.partitions}; use >= 1 or empty"),
        ]
        _check("filter", checks)


@dataclasses.dataclass
class TrainConfig:
    """`pairmill train`: contrastive fine-tuning on Ray Train (InfoNCE, in-batch + hard negatives + a queue of past
    passages; or SupCon, triplet; or unsupervised SimCSE on plain texts)."""

    epochs: int = _field(1, "passes over the pairs (max_steps, when set, wins)")
    max_steps: int | None = _field(None, "optimizer steps to run; empty = epochs x steps per epoch")
    batch_size: int = _field(32, "global batch: pairs per step over all workers (each worker takes batch_size / num_workers)")
    lr: float = _field(5e-5, "peak learning rate of AdamW")
    shuffle: Literal["global", "local"] = _field(
        "global", "global: the job's validated copy of the pairs is written once in a random order (seed train.seed; "
        "raw input: in the id check's hash shuffle; a pairmill job folder: Ray Data's all-to-all random_shuffle), "
        "so a sorted input (by source, topic or name; `pairmill filter` writes its kept pairs by semantic cluster) "
        "still gives mixed batches; local: only each epoch's shuffle within a buffer of max(1024, 8 x a worker's "
        "batch) rows, for an input already in random order (saves a job folder's shuffle)"
    )
    warmup_ratio: float = _field(0.1, "fraction of the steps the learning rate warms up linearly from 0")
    schedule: Literal["linear", "cosine", "constant"] = _field("linear", "decay after warmup: to 0 linearly, by a cosine, or none")
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    max_grad_norm: float = _field(1.0, "clip the gradient norm to this; 0 = no clipping")
    temperature: float = _field(
        0.05, "InfoNCE temperature (E5 uses 0.01, sentence-transformers 0.05); 0.05 until measured on the sample"
    )
    symmetric: bool = _field(False, "add the passage->query InfoNCE term")
    objective: Literal["infonce", "supcon", "triplet"] = _field(
        "infonce", "infonce: each query against its own passage, in-batch and hard negatives; supcon: rows whose "
        "queries are the same text (after normalisation) are positives of each other, not negatives (SupCon L_out, "
        "Khosla et al. 2020); triplet: a margin loss on each pair's own hard negatives only, no in-batch negatives "
        "(FaceNet, SBERT; pairs without a hard negative contribute nothing, counted in metrics.jsonl)"
    )
    tau_plus: float = _field(
        0.0, "objective=infonce: debiased InfoNCE (Chuang et al. 2020), the expected share of false negatives among "
        "a query's negatives, corrected for in the loss; 0 = off (plain InfoNCE)"
    )
    group_by: Literal["query", "source", "group"] = _field(
        "query", "objective=supcon: rows sharing this are positives of each other: the query text (normalised), "
        "the `source` column (pairmill setfit writes each pair's class label there: SupCon over labels), or the "
        "pairs' optional `group` column; a row without a source or group keeps its query's")
    triplet_margin: float = _field(0.3, "objective=triplet: the margin in cosine distance (1 - cos, in [0, 2]); 0.3 until measured")
    queue_size: int = _field(
        0, "objective=infonce or supcon: the positive passages of the last steps, this many (detached, from all "
        "workers), are extra negatives of every query (cross-batch memory, Wang et al. 2020; MoCo's queue without a "
        "momentum encoder); a queued copy of a query's own positive is masked; their mean age in steps is "
        "queue_staleness in metrics.jsonl; 0 = off. Not checkpointed: a resumed run refills it in "
        "queue_size / batch_size steps. Measured harmful so far: 1024 collapsed the model on registry pairs and "
        "on the bundled sample, 256 on registry pairs (docs/benchmarks.md)"
    )
    simcse: bool = _field(
        False, "unsupervised SimCSE (Gao et al. 2021): the input is plain texts (a .txt file, one text a line, or rows "
        "with a read.text_field column, read as `pairmill embed --text-field` reads them) and each text is its own "
        "positive under two dropout masks (both views get the passage prefix and passage_max_length); in-batch "
        "negatives (and train.queue_size), objective infonce or supcon"
    )
    collapse_sample: int = _field(
        256, "collapse alarm: rank 0 logs collapse_mean_cosine and collapse_uniformity of this many fixed held-out "
        "texts (eval.data's passages, else the first training passages) at every report into metrics.jsonl, and "
        "warns when they move towards collapse; 0 = off", resume_free=True
    )
    collapse_cosine: float = _field(
        0.5, "collapse alarm: warn when the sample's mean pairwise cosine is at least this, has closed a quarter of "
        "its distance to 1 since the start, and uniformity rose too", resume_free=True
    )
    hard_negatives: int = _field(1, "hard negatives per pair taken from the `negatives` column (0 = in-batch only)")
    mini_batch_size: int | None = _field(None, "GradCache mini-batch (texts per forward); empty = no GradCache")
    length_group_overhead: int | None = _field(
        None, "encode each side's texts sorted by length, in the groups that minimise padded tokens + this many "
        "tokens per extra forward (same embeddings, less padding); empty = 128 on CPU (measured fastest on the "
        "sample), 0 on GPU (grouping measured slower there); 0 = one forward per side padded to its longest, as "
        "sentence-transformers"
    )
    query_max_length: int = _field(64, "tokens per query in training (prefix included)")
    passage_max_length: int = _field(256, "tokens per passage or hard negative in training (prefix included)")
    lora_rank: int = _field(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float | None = _field(None, "LoRA alpha; empty = 2 x lora_rank")
    lora_targets: list[str] = _field((), "LoRA target modules, e.g. [query,value]; empty = peft's default for the architecture")
    lora_merge: bool = _field(True, "merge the LoRA adapter into the exported model (false: export the adapter, needs peft to load)")
    wise_alpha: float = _field(
        1.0, "the exported model's weights are base + wise_alpha x (trained - base) (WiSE-FT, Wortsman et al. 2022): "
        "below 1 it gives back a little of the gain on the training data's domain for much of what fine-tuning "
        "cost elsewhere; 1 = the trained weights. Checkpoints, tune's ranking and refresh rounds use the trained ones",
        resume_free=True,
    )
    num_workers: int = _field(1, "Ray Train workers (one process each; one GPU each when use_gpu)")
    use_gpu: bool | None = _field(None, "train on GPUs; empty = when the Ray cluster has GPUs")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _field(
        "PACK", "how Ray places the workers: PACK (fewest nodes, Ray's default), SPREAD (over nodes, best effort), "
        "STRICT_SPREAD (one worker per node; waits until that many nodes have room), STRICT_PACK (one node)",
        resume_free=True,
    )
    checkpoint_every: int = _field(200, "steps between checkpoints (one is always written at the end)", resume_free=True)
    eval_every: int = _field(0, "steps between held-out evaluations (eval.data); 0 = only at the end", resume_free=True)
    log_every: int = _field(10, "steps between progress lines", resume_free=True)
    max_failures: int = _field(3, "worker-group restarts from the last checkpoint before the run fails", resume_free=True)
    seed: int = _field(0, "seed of model init (LoRA), dropout and the per-epoch shuffle")
    refresh_every: int = _field(
        0, "steps between ANCE negative refreshes (re-encode the corpus with the current model, re-mine with the "
        "mine section's selection settings) that run beside training; 0 = off"
    )
    refresh_slices: int = _field(1, "each refresh round re-mines 1/refresh_slices of the queries, in rotation (bounds its cost)")

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"train.epochs={self.epochs}; use epochs >= 1"),
            (self.max_steps is None or self.max_steps >= 1, f"train.max_steps={self.max_steps}; use >= 1 or empty"),
            (self.num_workers >= 1, f"train.num_workers={self.num_workers}; use num_workers >= 1"),
            (self.batch_size >= 1 and self.batch_size % max(1, self.num_workers) == 0,
             f"train.batch_size={self.batch_size} with train.num_workers={self.num_workers}: the global batch must be a "
             f"positive multiple of num_workers (e.g. {max(1, self.batch_size // max(1, self.num_workers)) * max(1, self.num_workers)})"),
            (self.lr > 0, f"train.lr={self.lr}; use a learning rate > 0, e.g. 5e-5"),
            (0 <= self.warmup_ratio < 1, f"train.warmup_ratio={self.warmup_ratio}; use 0 <= warmup_ratio < 1"),
            (self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}; use >= 0"),
            (self.max_grad_norm >= 0, f"train.max_grad_norm={self.max_grad_norm}; use >= 0 (0 = no clipping)"),
            (self.temperature > 0, f"train.temperature={self.temperature}; use > 0 (E5 0.01, sentence-transformers 0.05)"),
            (self.hard_negatives >= 0, f"train.hard_negatives={self.hard_negatives}; use >= 0"),
            (0 <= self.tau_plus < 1,
             f"train.tau_plus={self.tau_plus}; use 0 <= tau_plus < 1, the expected share of false negatives (0 = off; "
             "Chuang et al. use 0.01-0.1)"),
            (self.tau_plus == 0 or self.objective == "infonce",
             f"train.tau_plus={self.tau_plus} with train.objective={self.objective}: tau_plus debiases InfoNCE only; "
             "use objective=infonce, or tau_plus=0"),
            (self.triplet_margin > 0, f"train.triplet_margin={self.triplet_margin}; use a margin > 0 (cosine distance lies in [0, 2])"),
            (self.objective != "triplet" or self.hard_negatives >= 1,
             "train.objective=triplet trains on hard negatives only and train.hard_negatives=0; use hard_negatives >= 1 "
             "(pairs with a `negatives` column: pairmill mine), or another objective"),
            (self.queue_size >= 0, f"train.queue_size={self.queue_size}; use >= 0 passages (0 = no queue), e.g. 4096"),
            (self.queue_size == 0 or self.objective != "triplet",
             f"train.queue_size={self.queue_size} with train.objective=triplet: the triplet loss scores each pair's own "
             "hard negatives only, so queued passages would never be used; use objective=infonce or supcon, or queue_size=0"),
            (not self.simcse or self.objective != "triplet",
             "train.simcse=true with train.objective=triplet: plain texts have no hard negatives to make triplets of; "
             "use objective=infonce (SimCSE's own loss) or supcon"),
            (not self.simcse or self.refresh_every == 0,
             f"train.simcse=true with train.refresh_every={self.refresh_every}: refresh rounds re-mine negatives for "
             "queries against passages, and plain texts have neither; use refresh_every=0"),
            (self.collapse_sample == 0 or self.collapse_sample >= 2,
             f"train.collapse_sample={self.collapse_sample}; use >= 2 texts (it scores pairs), or 0 for no collapse alarm"),
            (-1 <= self.collapse_cosine <= 1,
             f"train.collapse_cosine={self.collapse_cosine}; use a cosine in [-1, 1], e.g. 0.5"),
            (self.mini_batch_size is None or self.mini_batch_size >= 1,
             f"train.mini_batch_size={self.mini_batch_size}; use >= 1, or empty for no GradCache"),
            (self.length_group_overhead is None or self.length_group_overhead >= 0,
             f"train.length_group_overhead={self.length_group_overhead}; use >= 0 tokens (0 = off), or empty for the default"),
            (self.query_max_length >= 2, f"train.query_max_length={self.query_max_length}; use >= 2 (room for special tokens)"),
            (self.passage_max_length >= 2, f"train.passage_max_length={self.passage_max_length}; use >= 2"),
            (self.lora_rank >= 0, f"train.lora_rank={self.lora_rank}; use >= 0 (0 = full fine-tuning)"),
            (self.lora_alpha is None or self.lora_alpha > 0, f"train.lora_alpha={self.lora_alpha}; use > 0 or empty"),
            (0 < self.wise_alpha <= 1, f"train.wise_alpha={self.wise_alpha}; use 0 < wise_alpha <= 1 (1 = the trained weights)"),
            (self.wise_alpha == 1 or self.lora_rank == 0 or self.lora_merge,
             f"train.wise_alpha={self.wise_alpha} with an unmerged LoRA adapter (train.lora_merge=false): the "
             "interpolation is of full weights; use lora_merge=true, or wise_alpha=1"),
            (self.checkpoint_every >= 1, f"train.checkpoint_every={self.checkpoint_every}; use >= 1"),
            (self.eval_every >= 0, f"train.eval_every={self.eval_every}; use >= 0 (0 = only at the end)"),
            (self.log_every >= 1, f"train.log_every={self.log_every}; use >= 1"),
            (self.max_failures >= 0, f"train.max_failures={self.max_failures}; use >= 0"),
            (self.refresh_every >= 0, f"train.refresh_every={self.refresh_every}; use >= 0 steps (0 = no refresh)"),
            (self.refresh_slices >= 1, f"train.refresh_slices={self.refresh_slices}; use >= 1 (1 = all queries every round)"),
        ]
        _check("train", checks)
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets):
            warnings.warn("train.lora_alpha / train.lora_targets have no effect with train.lora_rank=0 (full fine-tuning)")
        if self.objective != "triplet" and self.triplet_margin != TrainConfig.triplet_margin:
            warnings.warn(f"train.triplet_margin={self.triplet_margin} has no effect with train.objective={self.objective}")
        if self.objective == "triplet" and (self.symmetric or self.temperature != TrainConfig.temperature):
            warnings.warn("train.symmetric / train.temperature have no effect with train.objective=triplet (a margin loss)")
        if self.simcse and self.hard_negatives != TrainConfig.hard_negatives:
            warnings.warn(f"train.hard_negatives={self.hard_negatives} has no effect with train.simcse=true (plain texts "
                          "have no hard negatives; the other texts of the batch are the negatives)")
        if self.collapse_sample == 0 and self.collapse_cosine != TrainConfig.collapse_cosine:
            warnings.warn(f"train.collapse_cosine={self.collapse_cosine} has no effect with train.collapse_sample=0 (no alarm)")
        if self.group_by != "query" and self.objective != "supcon":
            warnings.warn(f"train.group_by={self.group_by} has no effect with train.objective={self.objective} (supcon only)")
        if self.refresh_every == 0 and self.refresh_slices != 1:
            warnings.warn(f"train.refresh_slices={self.refresh_slices} has no effect with train.refresh_every=0 (no refresh)")


def _searched(default, what: str, kind: Literal["log", "uniform", "choice"], example: str, **limits):
    """A key of tune's search space: a range [low, high] drawn log-uniform or uniform, or a list of
    choices. ``limits``: ``below`` (a range's high stays under it), ``smallest`` (a choice's least)."""
    shape = "choices" if kind == "choice" else f"a range [low, high] drawn {'log-uniform' if kind == 'log' else 'uniform'}"
    return _field(default, f"{what}: {shape}, e.g. {example}; empty = the train section's value",
                  search=kind, example=example, **limits)


@dataclasses.dataclass
class TuneConfig:
    """`pairmill tune`: Ray Tune over whole train runs. Each search-space key (``search_keys()``)
    names a train setting and holds a range or a list of choices; empty = fixed at the train
    section's value. The train section's values are always the first trial."""

    num_samples: int = _field(4, "trials, the first of them the train section's own settings (the defaults)")
    metric: Literal["ndcg@10", "recall@10", "recall@100", "mrr@10"] = _field(
        "ndcg@10", "held-out metric the trials are ranked and stopped on (higher is better)")
    search: Literal["random", "optuna"] = _field("random", "how trials are drawn: random, or optuna (TPE; pip install optuna)")
    scheduler: Literal["asha", "none"] = _field("asha", "asha: stop trials that trail at a rung (grace_period x reduction_factor^k steps); none: run all to the end")
    grace_period: int = _field(20, "steps a trial trains before ASHA may stop it; also the evaluation interval when train.eval_every is 0")
    reduction_factor: float = _field(2.0, "ASHA: a trial goes on past a rung when it is in the top 1/reduction_factor there")
    max_concurrent: int | None = _field(None, "trials at once; empty = as many as the cluster's CPUs/GPUs fit (always at least one)")
    cpus_per_worker: float = _field(1.0, "CPUs each Train worker of a trial holds (a trial holds train.num_workers x this)")
    seed: int = _field(0, "seed of the search")
    lr: list[float] = _searched((1e-5, 2e-4), "learning rate", "log", "[1e-5,2e-4]")
    temperature: list[float] = _searched((0.01, 0.1), "InfoNCE temperature", "log", "[0.01,0.1]")
    warmup_ratio: list[float] = _searched((), "warmup fraction", "uniform", "[0,0.2]", below=1)
    batch_size: list[int] = _searched((), "global batch size", "choice", "[16,32,64]", smallest=1)
    hard_negatives: list[int] = _searched((), "hard negatives per pair", "choice", "[0,1,3]", smallest=0)
    lora_rank: list[int] = _searched((), "LoRA rank (0 = full fine-tuning)", "choice", "[0,8,16]", smallest=0)

    def __post_init__(self):
        checks = [
            (self.num_samples >= 1, f"tune.num_samples={self.num_samples}; use >= 1"),
            (self.grace_period >= 1, f"tune.grace_period={self.grace_period}; use >= 1 step"),
            (self.reduction_factor > 1, f"tune.reduction_factor={self.reduction_factor}; use > 1 (2 keeps the better half at each rung)"),
            (self.max_concurrent is None or self.max_concurrent >= 1, f"tune.max_concurrent={self.max_concurrent}; use >= 1 or empty"),
            (self.cpus_per_worker > 0, f"tune.cpus_per_worker={self.cpus_per_worker}; use > 0"),
        ]
        for f in _search_fields():
            setattr(self, f.name, tuple(getattr(self, f.name)))
            checks.append(_space_check(f, getattr(self, f.name)))
        _check("tune", checks)

    @staticmethod
    def search_keys() -> list[str]:
        return [f.name for f in _search_fields()]

    def space(self) -> dict[str, tuple[str, list]]:
        """The keys that vary: ``{train key: ("log" | "uniform" | "choice", values)}``."""
        return {f.name: (f.metadata["search"], list(getattr(self, f.name))) for f in _search_fields() if getattr(self, f.name)}


def _search_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TuneConfig) if "search" in f.metadata]


def _space_check(f: dataclasses.Field, values: tuple) -> tuple[bool, str]:
    key, kind, facts = f"tune.{f.name}", f.metadata["search"], f.metadata
    fix = f"e.g. {key}={facts['example']}, or empty to keep train.{f.name}"
    if kind == "choice":
        return all(v >= facts["smallest"] for v in values), f"{key}={list(values)}; use a list of choices >= {facts['smallest']}, {fix}"
    below = facts.get("below", math.inf)
    ok = not values or (len(values) == 2 and (values[0] > 0 if kind == "log" else values[0] >= 0) and values[0] < values[1] < below)
    low = "0 < low" if kind == "log" else "0 <= low"
    return ok, f"{key}={list(values)}; use a range [low, high] with {low} < high{f' < {below}' if below < math.inf else ''}, {fix}"


@dataclasses.dataclass
class DistillConfig:
    """`pairmill distill`: a static-embedding model from a sentence-transformers model (model2vec)."""

    pca_dims: int | None = _field(256, "dimensions the token vectors are reduced to by PCA; empty = the model's own")

    def __post_init__(self):
        _check("distill", [(self.pca_dims is None or self.pca_dims >= 2, f"distill.pca_dims={self.pca_dims}; use >= 2, or empty")])


@dataclasses.dataclass
class SetFitConfig:
    """`pairmill setfit` / `classify`: few-shot classification (pairs from labels, SupCon, a logistic-regression head)."""

    pairs_per_class: int = _field(256, "positive pairs per class (k examples make k(k-1)): sampled down to this, repeated up to it")
    neighbours: int = _field(5, "classify: nearest labelled examples whose agreement with the prediction is reported")

    def __post_init__(self):
        _check("setfit", [(v >= 1, f"setfit.{k}={v}; use >= 1") for k, v in dataclasses.asdict(self).items()])


@dataclasses.dataclass
class ChainConfig:
    """What `pairmill run` chains together."""

    train: str | None = _field(None, "pairs to build the model from; empty = the bundled sample's train split")
    decontaminate: bool = _field(True, "drop training pairs that duplicate a text of the held-out split (eval.data)")
    plain: bool = _field(
        False, "also train plain in-batch InfoNCE on the raw pairs with the chain's step budget and compare (OUT/plain, report.md)"
    )


SECTIONS: dict[str, type] = {
    "run": ChainConfig,
    "encoder": EncoderConfig,
    "read": ReadConfig,
    "filter": FilterConfig,
    "eval": EvalConfig,
    "mine": MineConfig,
    "train": TrainConfig,
    "ray": RayConfig,
    "tune": TuneConfig,
    "distill": DistillConfig,
    "setfit": SetFitConfig,
}


def resume_free_keys(cls: type) -> list[str]:
    """The fields of a section that may change when a run resumes (``metadata["resume_free"]``)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_free")]


def read_kwargs(read: ReadConfig) -> dict:
    """The validation arguments of a ReadConfig."""
    return {
        "query_field": read.query_field,
        "passage_field": read.passage_field,
        "text_field": read.text_field,
        "id_field": read.id_field,
        "max_chars": read.max_chars,
        "too_long": read.too_long,
    }


def encoder_kwargs(encoder: EncoderConfig) -> dict:
    return dataclasses.asdict(encoder)
