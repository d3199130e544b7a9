"""Length grouping: one training step's forward and backward, one padded forward per side vs
``training.encoding.encode_by_length`` at several ``train.length_group_overhead`` values.

    HF_HUB_OFFLINE=1 python benchmarks/length_groups.py [--steps 12] [--overheads 64 128 256 384] [--max-length 128]

The bundled model in train mode, batches of --batch-size sample pairs (the raw train split,
shuffled with seed 0), queries and passages tokenised as ``pairmill train`` does, InfoNCE at
temperature 0.05 on in-batch negatives, ``backward()``; no optimizer step (the same for every
arm). All arms run on the same batches in this one process, interleaved per batch (order
alternating), so a drifting machine slows them alike; the first 2 batches are left out.
Prints each arm's median step time, its speed-up over one padded forward, the groups per passage
batch and the passage tokens encoded relative to one padded forward.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="batches (the first 2 are not timed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per query and per passage")
    parser.add_argument("--overheads", type=int, nargs="+", default=[64, 128, 256, 384])
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3")

    import torch
    import torch.nn.functional as F

    from pairmill import sample
    from pairmill.encoder import load_sentence_transformer
    from train import valid_pairs  # benchmarks/train.py: the rows `pairmill train` trains on
    from training.encoding import encode_by_length, length_groups

    queries, passages = valid_pairs(str(sample.TRAIN))
    st = load_sentence_transformer(None, "cpu")
    st.train()
    tokenizer = st.tokenizer
    encode = lambda model, features: model(features)["sentence_embedding"]  # noqa: E731
    order = list(range(len(queries)))
    random.Random(0).shuffle(order)
    arms = [0, *args.overheads]
    seconds: dict[int, list[float]] = {a: [] for a in arms}
    groups: dict[int, list[int]] = {a: [] for a in arms}
    tokens: dict[int, list[float]] = {a: [] for a in arms}
    print(f"[bench] {args.steps} batches of {args.batch_size} of {len(queries)} pairs, max length {args.max_length}, "
          f"torch threads {torch.get_num_threads()}")
    for step in range(args.steps):
        rows = order[step * args.batch_size:(step + 1) * args.batch_size]
        features = [tokenizer([texts[i] for i in rows], truncation=True, max_length=args.max_length, padding=True,
                              return_tensors="pt") for texts in (queries, passages)]
        lengths = sorted(features[1]["attention_mask"].sum(1).tolist(), reverse=True)  # passages, right-padded
        for arm in arms if step % 2 else arms[::-1]:
            spans = length_groups(lengths, arm) if arm else [(0, len(lengths))]
            groups[arm].append(len(spans))
            tokens[arm].append(sum((b - a) * lengths[a] for a, b in spans) / (len(lengths) * lengths[0]))
            t0 = time.perf_counter()
            q, p = (encode_by_length(st, f, arm, encode) for f in features)
            scores = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / 0.05
            F.cross_entropy(scores, torch.arange(len(rows))).backward()
            st.zero_grad(set_to_none=True)
            if step >= 2:
                seconds[arm].append(time.perf_counter() - t0)
    base = statistics.median(seconds[0])
    print(f"{'length_group_overhead':>22} {'median step s':>13} {'speed-up':>8} {'groups':>6} {'passage tokens':>14}")
    for arm in arms:
        median = statistics.median(seconds[arm])
        print(f"{arm if arm else '0 (one forward)':>22} {median:>13.3f} {base / median:>7.2f}x "
              f"{statistics.mean(groups[arm]):>6.1f} {statistics.mean(tokens[arm]):>14.3f}")


if __name__ == "__main__":
    main()
