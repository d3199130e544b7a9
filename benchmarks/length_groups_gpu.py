"""GPU: forward + backward of a training step, one padded forward per side vs ``encode_by_length`` at
several overheads. all-MiniLM-L6-v2's architecture with random weights (speed only: its 90 MB of
weights need not travel to a GPU machine), bf16 autocast as pairmill trains on GPU, the sample's
raw train split tokenised by the bundled model's tokenizer. Needs CUDA, torch and transformers.

    mkdir -p bench-out/gpu/tok && cp BUNDLED/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} bench-out/gpu/tok/
    python benchmarks/length_groups_gpu.py     # BUNDLED: python -c "from pairmill.encoder import bundled_model_path as b; print(b())"

Batches (32, 128), (256, 128), (256, 256), (1024, 256) of (pairs, max length), 14 steps each, the
first 3 untimed, every arm on the same batches, interleaved; prints median ms per step, speed-up,
groups per passage batch and passage tokens relative to one padded forward.
"""
import gzip, json, os, random, statistics, sys, time
sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, BertModel
from training.encoding import encode_by_length, length_groups
tok = AutoTokenizer.from_pretrained("bench-out/gpu/tok")
rows = [json.loads(l) for l in gzip.open("pairmill/sample/train.jsonl.gz", "rt")]
rows = [r for r in rows if isinstance(r.get("query"), str) and isinstance(r.get("passage"), str)]
print(torch.__version__, torch.cuda.get_device_name(), len(rows), "pairs")
model = BertModel(BertConfig.from_pretrained("bench-out/gpu/tok")).cuda().train()
def encode(m, f):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = m(**f).last_hidden_state
    mask = f["attention_mask"][..., None].float()
    return (h.float() * mask).sum(1) / mask.sum(1)
for batch, max_len in ((32, 128), (256, 128), (256, 256), (1024, 256)):
    arms = [0, 128, 512, 2048, 8192]
    times = {a: [] for a in arms}; groups = {a: [] for a in arms}; toks = {a: [] for a in arms}
    order = list(range(len(rows))); random.Random(0).shuffle(order)
    steps = 14
    for s in range(steps):
        b = [rows[order[(s * batch + i) % len(rows)]] for i in range(batch)]
        feats = [{k: v.cuda() for k, v in tok([r[c] for r in b], truncation=True, max_length=max_len, padding=True, return_tensors="pt").items()} for c in ("query", "passage")]
        L = sorted(feats[1]["attention_mask"].sum(1).tolist(), reverse=True)
        for a in (arms if s % 2 else arms[::-1]):
            spans = length_groups(L, a) if a else [(0, len(L))]
            groups[a].append(len(spans)); toks[a].append(sum((y - x) * L[x] for x, y in spans) / (len(L) * L[0]))
            torch.cuda.synchronize(); t = time.perf_counter()
            q, p = (encode_by_length(model, f, a, encode) for f in feats)
            F.cross_entropy(F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / 0.05, torch.arange(batch, device="cuda")).backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if s >= 3: times[a].append(time.perf_counter() - t)
    base = statistics.median(times[0])
    print(f"batch {batch} max_length {max_len}: " + "; ".join(
        f"overhead {a}: {statistics.median(times[a])*1000:.1f} ms {base/statistics.median(times[a]):.2f}x groups {statistics.mean(groups[a]):.1f} tokens {statistics.mean(toks[a]):.3f}" for a in arms), flush=True)
