"""``pairmill embed INPUT -o OUT``: texts or pairs -> embeddings (parquet), on a Ray actor pool.

Passes: one counts the input's rows; one validates it into ``work/validated`` (parquet, in the
staging folder: not the object store, which would not stay bounded at scale), from which one pass
writes ``rejected/``, one counts truncations, and the last encodes and writes ``kept/``. Output ids
are distinct (``pairmill.pairs.read_unique``: a later row with an earlier row's id is rejected as
``duplicate_id``), so the embeddings can be joined back to the input by id.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from pairmill.config import EncoderConfig, RayConfig, ReadConfig
from pairmill.pairs import REJECT_COLUMNS, Mode, count_input_rows, output_columns, write_validated


def fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> arrow fixed_size_list<float32>[D], the on-disk embedding format."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """arrow fixed_size_list<float32>[D] -> (N, D) float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class EncodeBatch:
    """``map_batches`` callable: one encoder per actor, loaded once.

    Returns ``id`` and the embedding columns, or, with ``keep_columns``, the input batch with the
    embedding columns appended. ``text_kind`` picks the prefix of a text column ("passage" when
    the texts are a retrieval corpus).
    """

    def __init__(self, mode: Mode, encoder_kwargs: dict, keep_columns: bool = False, text_kind: str = "text"):
        from pairmill.cluster import actor_threads
        from pairmill.encoder import Encoder

        self.mode = mode
        self.keep_columns = keep_columns
        self.text_kind = text_kind
        self.encoder = Encoder(**encoder_kwargs, num_threads=actor_threads())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.mode == "pairs":
            queries = self.encoder.encode(batch.column("query").to_pylist(), "query")  # (B, D)
            passages = self.encoder.encode(batch.column("passage").to_pylist(), "passage")  # (B, D)
            columns = {"query_embedding": fixed_size_list(queries), "passage_embedding": fixed_size_list(passages)}
        else:
            texts = self.encoder.encode(batch.column("text").to_pylist(), self.text_kind)
            columns = {"embedding": fixed_size_list(texts)}
        if self.keep_columns:
            for name, column in columns.items():
                batch = batch.append_column(name, column)
            return batch
        return pa.table({"id": batch.column("id"), **columns})


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


def embed(input_path: str, out: str, *, mode: Mode, encoder: EncoderConfig, read: ReadConfig, ray: RayConfig) -> dict:
    """Run the embed job; returns the stats written to ``OUT/stats.json``."""
    import shutil

    import ray as ray_lib
    from ray.data.aggregate import Count, Sum
    from ray.data.expressions import col

    from pairmill.cluster import encoder_pool, init_ray
    from pairmill.output import JobFolder, count_by, parquet_rows

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    with JobFolder(out) as job:
        t0 = time.perf_counter()
        work = job.staging / "work"
        parsed = ray_lib.data.read_parquet(str(write_validated(input_path, work / "validated", mode, **read_kwargs(read))))
        parse_seconds = time.perf_counter() - t0
        kept = parsed.filter(expr=col("reason").is_null()).select_columns(output_columns(mode))
        rejected = parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS)

        pool = encoder_pool(ray.actors)
        print(f"[pairmill] embed: {pool.size} encoder actor(s), {pool.num_cpus} CPU / {pool.num_gpus} GPU each")
        embedded = kept.map_batches(
            EncodeBatch,
            fn_constructor_kwargs={"mode": mode, "encoder_kwargs": encoder_kwargs(encoder)},
            compute=ray_lib.data.ActorPoolStrategy(size=pool.size),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            # Many rows per call: the encoder sorts them by length, so padding shrinks.
            batch_size=max(1024, 8 * (encoder.batch_size or 32)),
            batch_format="pyarrow",
        )
        # The first two passes only read and validate: their time is the validation cost. The
        # encoder pool runs last, so no later pass waits for its actors to release their CPUs.
        t0 = time.perf_counter()
        rejected.write_parquet(job.path("rejected"))
        totals = parsed.select_columns(["truncated"]).aggregate(Count(), Sum("truncated"))
        validate_seconds = time.perf_counter() - t0 + parse_seconds
        t0 = time.perf_counter()
        embedded.write_parquet(job.path("kept"))
        encode_seconds = time.perf_counter() - t0
        shutil.rmtree(work)
        input_rows = count_input_rows(input_path)  # from the input itself: the commit checks the outputs against it
        parsed_rows = int(totals["count()"])
        kept_rows = parquet_rows(job.path("kept"))
        rejected_counts = count_by(job.path("rejected"), "reason")
        valid_rows = parsed_rows - sum(rejected_counts.values())
        job.stage("read+validate", input_rows, valid_rows, validate_seconds)
        job.stage("encode", valid_rows, kept_rows, encode_seconds)
        stats = job.commit(
            {
                "input_rows": input_rows,
                "kept": kept_rows,
                "dropped": {},
                "rejected": rejected_counts,
                "truncated": int(totals["sum(truncated)"] or 0),
                "unique_ids": True,
                "mode": mode,
                "encoder": encoder_kwargs(encoder),
                "encoder_fingerprint": encoder.fingerprint(),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    return stats


def main(args) -> int:
    """``pairmill embed INPUT -o OUT [--text-field F]``."""
    cfg = args.config_sections
    mode: Mode = "text" if args.text_field else "pairs"
    stats = embed(args.input, args.output, mode=mode, encoder=cfg["encoder"], read=cfg["read"], ray=cfg["ray"])
    print(format_summary(stats, args.output))
    return 0


def format_summary(stats: dict, out: str) -> str:
    lines = [f"[pairmill] {out}: {stats['input_rows']} input rows -> {stats['kept']} kept"]
    for part in ("dropped", "rejected"):
        for reason, n in stats[part].items():
            lines.append(f"    {part:<9} {reason:<20} {n}")
    if stats.get("truncated"):
        lines.append(f"    truncated (kept)    {stats['truncated']}")
    for stage in stats["stages"]:
        lines.append(f"    stage {stage['name']:<15} {stage['rows_in']} -> {stage['rows_out']} rows in {stage['seconds']:.1f}s")
    return "\n".join(lines)
