"""The model a Train worker trains: its setup (sentence-transformers, LoRA), tokenizer, optimizer,
checkpoint files, evaluation on rank 0 and the export to a sentence-transformers folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn


def setup_model(model: str | None, lora: dict | None, device: torch.device | str = "cpu"):
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


def freeze_unused(st: nn.Module, tokenize, device) -> list[str]:
    """Freeze parameters that never reach the sentence embedding (BERT's pooler), found by one probe
    backward: DDP without ``find_unused_parameters`` would otherwise wait for their gradients forever."""
    features = to_device(tokenize(["probe text", "x"], 16), device)
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


def to_device(features, device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in features.items()}


def setup_optimizer(st: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
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


def restore_checkpoint(checkpoint, st: nn.Module, optimizer, scheduler) -> dict:
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


def evaluate_on_rank0(st: nn.Module, task, cfg, device) -> dict[str, float]:
    """The held-out metrics of the live model, encoded by ``pairmill.encoder.Encoder`` as `pairmill
    eval` encodes (length-sorted batches, unit vectors; bf16 on GPU as the steps run), so a
    checkpoint's score is the score its exported model gets. ``cfg`` is the loop's ``LoopConfig``."""
    from pairmill.encoder import Encoder
    from pairmill.evaluate import evaluate_embeddings

    was_training = st.training
    try:
        encoder = Encoder(st, query_prefix=cfg.query_prefix, passage_prefix=cfg.passage_prefix,
                          max_length=cfg.eval_max_length, precision="bf16" if device.type == "cuda" else "fp32")
        q, c = encoder.encode(task.queries, kind="query"), encoder.encode(task.corpus, kind="passage")
    finally:
        st.train(was_training)
    return evaluate_embeddings(task, q, c, query_batch=cfg.eval_query_batch, uniformity_sample=cfg.eval_uniformity_sample)


def encode_on_rank0(st: nn.Module, texts: Sequence[str], cfg, device) -> Tensor:
    """(len(texts), D) unit embeddings of passages by the live model, encoded as ``evaluate_on_rank0``
    encodes (dropout off meanwhile); for the collapse alarm's fixed sample."""
    from pairmill.encoder import Encoder

    was_training = st.training
    try:
        encoder = Encoder(st, query_prefix=cfg.query_prefix, passage_prefix=cfg.passage_prefix,
                          max_length=cfg.eval_max_length, precision="bf16" if device.type == "cuda" else "fp32")
        return torch.as_tensor(encoder.encode(list(texts), kind="passage"))
    finally:
        st.train(was_training)


def embed_features(model: nn.Module, features: dict[str, Tensor], autocast) -> Tensor:
    with autocast():
        return model(features)["sentence_embedding"]  # (rows, D)


def export_model(checkpoint_dir: str | Path, out: str | Path, *, model: str | None, lora: dict | None, merge: bool,
                 wise_alpha: float = 1.0) -> Path:
    """Write the checkpoint's model as a sentence-transformers folder at ``out`` (atomically); with
    ``wise_alpha`` < 1, its weights moved back towards the base model's (``interpolate_with_base``)."""
    st = setup_model(model, lora, "cpu")
    load_trainable_state(st, load_tensors(Path(checkpoint_dir) / "model.pt"))
    if lora and merge:
        st[0].model = st[0].model.merge_and_unload()
    if wise_alpha < 1:
        if lora and not merge:
            raise ValueError("train.wise_alpha < 1 interpolates full weights; export the LoRA adapter merged (train.lora_merge=true)")
        interpolate_with_base(st, setup_model(model, None, "cpu"), wise_alpha)
    return _save_atomically(st, Path(out))


def interpolate_with_base(st: nn.Module, base: nn.Module, alpha: float) -> None:
    """WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): every floating-point
    weight becomes ``base + alpha * (trained - base)``, in place. Fine-tuning on one domain costs the
    model some of what it did elsewhere; part of the way back keeps most of the gain and most of the
    rest. A lerp over two state dicts of one architecture, so written here rather than taken from a
    model-merging library."""
    trained, start = st.state_dict(), base.state_dict()
    if set(trained) != set(start):
        raise ValueError(f"the trained and the base model differ in their weights ({sorted(set(trained) ^ set(start))[:5]}); "
                         "train.wise_alpha needs the model the run started from")
    with torch.no_grad():
        for name, value in trained.items():
            if value.is_floating_point():
                value.copy_(torch.lerp(start[name].to(value.dtype), value, alpha))


def save_live_model(st: nn.Module, out: str | Path, *, model: str | None, lora: dict | None) -> Path:
    """The model being trained (unwrapped from DDP) as a plain sentence-transformers folder at ``out``,
    for a refresh round to encode with. LoRA: merged into a CPU copy, the training model is untouched."""
    if lora:
        with torch.random.fork_rng(devices=[]):  # the copy's LoRA init must not move the dropout RNG
            copy = setup_model(model, lora, "cpu")
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
