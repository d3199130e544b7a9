"""Encode throughput and quality of every encoder pairmill offers, side by side in one run.

    pairmill distill -o /tmp/static-minilm
    python scripts/make_registry_pairs.py ../shared/data/pypi_summaries.tsv.gz /tmp/registry.jsonl.gz
    HF_HUB_OFFLINE=1 python benchmarks/encode.py --static /tmp/static-minilm --audit /tmp/registry.jsonl.gz

Speed: the first ``--n`` passages of the bundled sample, encoded by each method in interleaved
rounds (each round a new chunk of the texts, every method on it, the order rotating), with
``--threads`` torch/onnxruntime threads: texts/s and texts per CPU-second (this process's CPU time:
on a busy machine one thread can beat two), each round's ratio to pairmill's torch fp32, medians.
Methods: pairmill's ``Encoder`` with torch fp32, torch bf16, the int8 ONNX backend and (``--static``)
a static-embedding model; ``SentenceTransformer.encode`` (batch 32) as the reference users know; and
(``--naive``) a plain HF loop.
Agreement with torch fp32 on those texts: mean/min cosine of the vectors (not for the static model:
another vector space) and the share of top-10 neighbours (the rows' queries against the passages).
Audit (``--audit PAIRS``): ``--audit-n`` pairs with a non-empty passage, encoded by each method; 20%
of them corrupted (``pipelines.audit.corrupt_rows``, the filter's own); every pair's passage ranked
against all the sample's passages (the filter's pool, exact search); corrupted pairs removed and
clean pairs kept at k = 1, 2, 5, 10, as ``pairmill filter --audit`` reports them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # CPU time of the encoders, not of Rust's thread pool

import numpy as np
import torch


def naive_hf(model_dir: str, max_length: int, batch_size: int = 64):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def encode(texts):
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out).numpy()

    return encode


def methods_for(args) -> dict:
    """name -> (encode(texts, kind) -> unit vectors (N, D), same vector space as torch fp32?)."""
    from pairmill.encoder import Encoder, resolve_model

    threads = args.threads
    fp32 = Encoder(args.model, precision="fp32", num_threads=threads)
    out = {
        "pairmill torch fp32": (lambda t, k: fp32.encode(t, k), True),
        "pairmill torch bf16": (lambda t, k, e=Encoder(args.model, precision="bf16", num_threads=threads): e.encode(t, k), True),
        "pairmill onnx int8": (lambda t, k, e=Encoder(args.model, backend="onnx", num_threads=threads): e.encode(t, k), True),
    }
    if args.static:
        static = Encoder(args.static, num_threads=threads)
        out["pairmill static (distilled)"] = (lambda t, k: static.encode(t, k), False)
    st = fp32.model  # the same SentenceTransformer: only the encode path differs

    def st_encode(texts, kind):
        vectors = st.encode(list(texts), batch_size=32, convert_to_numpy=True)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    out["SentenceTransformer.encode fp32 (batch 32)"] = (st_encode, True)
    if args.naive:
        out["naive HF loop (batch 64, unsorted)"] = (lambda t, k, f=naive_hf(resolve_model(args.model), fp32.max_length): f(t), True)
    return out


def speed(methods: dict, texts: list[str], rounds: int) -> dict:
    """Interleaved rounds; returns {name: {"rates": [...], "cpu_rates": [...]}}."""
    chunks = np.array_split(np.arange(len(texts)), rounds)
    names = list(methods)
    result = {name: {"rates": [], "cpu_rates": []} for name in names}
    for r, chunk in enumerate(chunks):
        part = [texts[i] for i in chunk]
        for name in names[r % len(names):] + names[: r % len(names)]:
            encode, _ = methods[name]
            wall, cpu = time.perf_counter(), time.process_time()
            encode(part, "passage")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            result[name]["rates"].append(len(part) / wall)
            result[name]["cpu_rates"].append(len(part) / max(cpu, 1e-9))
        print(f"round {r + 1}: " + ", ".join(f"{n}: {result[n]['rates'][-1]:.1f}" for n in names) + " texts/s", flush=True)
    return result


def top10(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ passages.T), axis=1, kind="stable")[:, :10]


def agreement(methods: dict, queries: list[str], passages: list[str]) -> dict:
    reference = methods["pairmill torch fp32"][0]
    ref_q, ref_p = reference(queries, "query"), reference(passages, "passage")
    ref_top = top10(ref_q, ref_p)
    out = {}
    for name, (encode, same_space) in methods.items():
        q, p = encode(queries, "query"), encode(passages, "passage")
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(q, p), ref_top)]))
        cos = (p * ref_p).sum(axis=1) if same_space else None
        out[name] = {"top10_shared": round(overlap, 4),
                     "mean_cosine": round(float(cos.mean()), 5) if cos is not None else None,
                     "min_cosine": round(float(cos.min()), 5) if cos is not None else None}
    return out


def audit(methods: dict, path: str, n: int, seed: int = 0) -> dict:
    """The filter audit (see the module docstring) of each method on ``n`` pairs of ``path``."""
    from pipelines.audit import audit_summary, corrupt_rows
    from pipelines.consistency import consistency_ranks, exact_pool_search, rank_depth

    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r["passage"].strip() and r["query"].strip()]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    queries, passages = [r["query"] for r in rows], [r["passage"] for r in rows]
    query_rows, passage_rows = corrupt_rows(ids, passages, 0.2, seed)
    out = {}
    for name, (encode, _) in methods.items():
        t0 = time.perf_counter()
        q, p = encode(queries, "query"), encode(passages, "passage")
        search = exact_pool_search(p)  # the pool: every passage of the sample, as the filter's min(N, pool_size)
        clean = consistency_ranks(q, p, search, rank_depth(10))
        corrupted = consistency_ranks(q[query_rows], p[passage_rows], search, rank_depth(10))
        out[name] = {**audit_summary(clean, corrupted, 2, len(p), 0.2)["curve"], "seconds": round(time.perf_counter() - t0, 1)}
        print(f"audit {name}: {json.dumps(out[name])}", flush=True)
    return {"pairs": len(rows), "corrupted": len(query_rows), "curves": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=600, help="sample passages for the speed rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--static", help="a `pairmill distill` folder, measured beside the others")
    parser.add_argument("--naive", action="store_true", help="also a plain HF loop")
    parser.add_argument("--audit", help="pairs (JSONL) for the filter audit of each encoder, e.g. registry pairs")
    parser.add_argument("--audit-n", type=int, default=3000)
    parser.add_argument("--json", help="write everything measured here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pairmill import sample
    from pairmill.encoder import cpu_flags

    with gzip.open(sample.TRAIN, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][: args.n]
    texts = [r["passage"] for r in rows]
    methods = methods_for(args)
    bf16 = sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())
    print(f"{len(texts)} sample passages, mean {np.mean([len(t) for t in texts]):.0f} chars; {args.threads} thread(s); "
          f"CPU bf16 instructions: {bf16 or 'none'}", flush=True)
    for encode, _ in methods.values():  # warm-up (and the ONNX export, cached)
        encode(texts[:32], "passage")
    rates = speed(methods, texts, args.rounds)
    agree = agreement(methods, [r["query"] for r in rows], texts)
    ours = "pairmill torch fp32"
    print("\n| method | texts/s | texts per CPU-s | x torch fp32 (CPU-s, per round) | top-10 shared with torch fp32 | cosine to torch fp32 (mean / min) |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        per_round = [a / b for a, b in zip(rates[name]["cpu_rates"], rates[ours]["cpu_rates"])]
        a = agree[name]
        cosine = f"{a['mean_cosine']:.4f} / {a['min_cosine']:.4f}" if a["mean_cosine"] is not None else "(another space)"
        print(f"| {name} | {statistics.median(rates[name]['rates']):,.1f} | {statistics.median(rates[name]['cpu_rates']):,.1f} | "
              f"**{statistics.median(per_round):.2f}** ({', '.join(f'{x:.2f}' for x in per_round)}) | {a['top10_shared']:.3f} | {cosine} |")
    result = {"speed": rates, "agreement": agree, "threads": args.threads, "n": len(texts)}
    if args.audit:
        result["audit"] = audit(methods, args.audit, args.audit_n)
        curves = result["audit"]["curves"]
        print(f"\nfilter audit on {result['audit']['pairs']} pairs of {args.audit} ({result['audit']['corrupted']} corrupted; "
              "pool = all their passages): corrupted removed / clean kept")
        print("| method | k=1 | k=2 | k=5 | k=10 |")
        print("|---|---|---|---|---|")
        for name, curve in curves.items():
            print(f"| {name} | " + " | ".join(f"{curve[k]['corrupted_removed']:.3f} / {curve[k]['clean_kept']:.3f}"
                                                for k in ("1", "2", "5", "10")) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
