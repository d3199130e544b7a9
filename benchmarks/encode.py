"""Encode throughput: pairmill's encoder vs SentenceTransformer.encode vs a naive HF loop.

    python benchmarks/encode.py [--n 1000] [--rounds 3] [--with-ray]

The same N real passages from the bundled sample, the same model (the bundled all-MiniLM-L6-v2
unless --model), the same max length. Methods run interleaved, round after round, so machine
noise hits all of them alike; the median texts/s of the rounds is reported with the ratios.
- pairmill: ``Encoder.encode``, the code each ``pairmill embed`` actor runs (default batch size);
- sentence-transformers: ``SentenceTransformer.encode`` at its default batch size (32) and at
  pairmill's batch size;
- naive HF: AutoModel + AutoTokenizer, batches of 64 in input order, mean pooling, normalise.
--with-ray also times the whole ``pairmill embed`` job (Ray start, read, actor pool, write) once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="passages to encode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--with-ray", action="store_true", help="also time the whole `pairmill embed` job")
    args = parser.parse_args()

    from pairmill import sample
    from pairmill.encoder import Encoder, resolve_model

    with gzip.open(sample.TRAIN, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["passage"] for line in f][: args.n]
    encoder = Encoder(args.model)
    st = encoder.model  # the very same SentenceTransformer object: only the encode path differs
    methods = {
        f"pairmill Encoder (batch {encoder.batch_size})": lambda t: encoder.encode(t, "passage"),
        "SentenceTransformer.encode (batch 32)": lambda t: st.encode(t, batch_size=32),
    }
    if encoder.batch_size != 32:  # on GPU pairmill's default differs from ST's: compare at both
        methods[f"SentenceTransformer.encode (batch {encoder.batch_size})"] = (
            lambda t: st.encode(t, batch_size=encoder.batch_size)
        )
    methods["naive HF loop (batch 64, unsorted)"] = naive_hf(resolve_model(args.model), encoder.max_length)
    print(f"{len(texts)} passages, mean {np.mean([len(t) for t in texts]):.0f} chars; model {resolve_model(args.model)}; "
          f"max_length {encoder.max_length}; torch threads {torch.get_num_threads()}")
    outputs = {name: fn(texts[:64]) for name, fn in methods.items()}  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            outputs[name] = fn(texts)
            rates[name].append(len(texts) / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{rates[n][-1]:.1f}" for n in methods) + " texts/s")

    ours = next(iter(methods))
    base = statistics.median(rates[ours])
    print(f"\n{'method':<42} {'texts/s':>9} {'pairmill / this':>16} {'max |diff| vs pairmill':>24}")
    for name in methods:
        rate = statistics.median(rates[name])
        diff = float(np.abs(outputs[name] - outputs[ours]).max())
        print(f"{name:<42} {rate:>9.1f} {base / rate:>16.2f} {diff:>24.2e}")

    if args.with_ray:
        from pairmill.config import EncoderConfig, RayConfig, ReadConfig
        from pairmill.embed import embed

        with tempfile.TemporaryDirectory() as tmp:
            src = f"{tmp}/texts.jsonl"
            with open(src, "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            t0 = time.perf_counter()
            stats = embed(src, f"{tmp}/out", mode="text", encoder=EncoderConfig(model=args.model),
                          read=ReadConfig(), ray=RayConfig())
            total = time.perf_counter() - t0
        encode_s = next(s["seconds"] for s in stats["stages"] if s["name"] == "encode")
        print(f"\npairmill embed job: {len(texts) / total:.1f} texts/s end to end ({total:.1f}s with Ray start-up), "
              f"{len(texts) / encode_s:.1f} texts/s in its encode pass")


if __name__ == "__main__":
    main()
