"""``pairmill embed INPUT -o OUT``: texts or pairs -> embeddings (parquet), on a Ray actor pool.

Passes: one counts the input's rows; one validates it into ``work/validated`` (parquet, in the
staging folder: not the object store, which would not stay bounded at scale), from which one pass
writes ``rejected/``, one counts truncations, and the last encodes and writes ``kept/``. Output ids
are distinct (``pairmill.groups.read_unique``: a later row with an earlier row's id is rejected as
``duplicate_id``), so the embeddings can be joined back to the input by id.
"""

from __future__ import annotations

import logging
import time

from pairmill.config import EncoderConfig, RayConfig, ReadConfig, encoder_kwargs, read_kwargs
from pairmill.encoder import EncodeBatch, encoder_stage
from pairmill.output import format_summary
from pairmill.groups import write_validated
from pairmill.pairs import REJECT_COLUMNS, Mode, output_columns
from pairmill.read import count_input_rows

log = logging.getLogger(__name__)


def embed(input_path: str, out: str, *, mode: Mode, encoder: EncoderConfig, read: ReadConfig, ray: RayConfig) -> dict:
    """Run the embed job; returns the stats written to ``OUT/stats.json``."""
    import ray as ray_lib
    from ray.data.aggregate import Count, Sum
    from ray.data.expressions import col

    from pairmill.cluster import encoder_pool, init_ray
    from pairmill.output import count_by, open_job, parquet_rows

    init_ray(ray.address, ray.num_cpus)
    started = time.perf_counter()
    with open_job(out) as job:  # a local folder, or a prefix on object storage committed by a manifest
        t0 = time.perf_counter()
        fs = job.filesystem  # None: local
        validated = write_validated(input_path, job.work("validated"), mode, **read_kwargs(read))
        parsed = ray_lib.data.read_parquet(str(validated), filesystem=fs)
        parse_seconds = time.perf_counter() - t0
        kept = parsed.filter(expr=col("reason").is_null()).select_columns(output_columns(mode))
        rejected = parsed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_COLUMNS)

        pool = encoder_pool(ray.actors)
        log.info(f"embed: {pool}")
        embedded = kept.map_batches(
            **encoder_stage(EncodeBatch, {"mode": mode, "encoder_kwargs": encoder_kwargs(encoder)}, pool, encoder.batch_size))
        # The first two passes only read and validate: their time is the validation cost. The
        # encoder pool runs last, so no later pass waits for its actors to release their CPUs.
        t0 = time.perf_counter()
        rejected.write_parquet(job.path("rejected"), filesystem=fs)
        totals = parsed.select_columns(["truncated"]).aggregate(Count(), Sum("truncated"))
        validate_seconds = time.perf_counter() - t0 + parse_seconds
        t0 = time.perf_counter()
        embedded.write_parquet(job.path("kept"), filesystem=fs)
        encode_seconds = time.perf_counter() - t0
        job.remove_work()
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
