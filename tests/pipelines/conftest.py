"""A bag-of-words test model: the shared ``tiny_model`` maps every word to [UNK] under
transformers 5 (``BertTokenizerFast(vocab_file=...)`` ignores the file), so all its texts embed
alike and no similarity threshold can be tested with it. This one is a 0-layer BERT whose
embedding is the normalised mean of random per-word vectors: texts sharing words are similar,
case variants are identical, unrelated texts are near-orthogonal."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import WORDS


def write_bow_model(folder: Path, dim: int = 64, seed: int = 0) -> str:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + [str(d) for d in range(10)]
    vocab += list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(hf / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=0, num_attention_heads=1,
        intermediate_size=dim, max_position_embeddings=256,
    )
    bert = BertModel(config)
    with torch.no_grad():  # words only: no position or segment signal, no weight on special tokens
        bert.embeddings.word_embeddings.weight.normal_(0, 1)
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
        for token in ("[PAD]", "[CLS]", "[SEP]"):
            bert.embeddings.word_embeddings.weight[vocab.index(token)] = 0
    bert.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=256)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return str(folder / "st")


@pytest.fixture(scope="session")
def bow_model(tmp_path_factory) -> str:
    return write_bow_model(tmp_path_factory.mktemp("bow_model"))


def topical_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose query is a few words of its passage (so most are consistent), with ids."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        passage = [rng.choice(WORDS) for _ in range(rng.randint(10, 24))]
        query = rng.sample(passage, 3)
        rows.append({"id": f"t{i}", "query": " ".join(query), "passage": " ".join(passage) + f" {i}", "source": "test"})
    return rows
