"""``pairmill distill -o DIR [--model M]``: a sentence-transformers model -> a static-embedding model
(one vector per token, averaged per text), saved as a sentence-transformers folder every verb
takes as ``--model``.

Design note. model2vec's ``distill`` encodes every token of the model's vocabulary with the model
once, reduces the vectors with PCA (``distill.pca_dims``) and weights them by token frequency
(SIF); sentence-transformers' ``StaticEmbedding.from_model2vec`` turns the result into a module,
so the folder loads and encodes through sentence-transformers (model2vec's own ``encode`` gives a
zero vector for a text made only of unknown tokens; this path gives the unknown token's vector).
pairmill's encoder L2-normalises the averages, as for any model. Cost: one forward per vocabulary
token (30k for MiniLM: ~75-150 s on 2 CPUs), once; encoding is then a lookup and a mean per text.
How good the result is for a job is the filter audit's to say (``pairmill filter --audit``).
The folder is built beside DIR and renamed into place, with ``distill.json`` (what it came from).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def distill_model(model: str | None, out: str, *, pca_dims: int | None, device: str = "cpu") -> dict:
    """Distil ``model`` (a folder, a hub name, or None for the bundled model) into a static model at
    ``out``; returns what ``distill.json`` records."""
    from pairmill.output import refuse_remote

    refuse_remote(out)  # committed by rename: before the minutes of distilling, not after
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise SystemExit(
            "pairmill distill needs model2vec (and skeletoken), which are not installed: "
            "pip install 'pairmill[static]'"
        ) from e
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the modules; older releases have them in .models
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:
        from sentence_transformers.models import StaticEmbedding

    from pairmill.encoder import check_model

    source = check_model(model)
    final = Path(out).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        log.info(f"distill: {source} -> a static model (pca_dims={pca_dims}); one forward per vocabulary token")
        static = distill(model_name=source, pca_dims=pca_dims, device=device)
        static.save_pretrained(str(work / "model2vec"))
        st = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(str(work / "model2vec"))], device="cpu")
        st.save(str(work / "model"))
        record = {
            "source_model": source,
            "pca_dims": pca_dims,
            "dimension": int(st.get_embedding_dimension()),
            "vocabulary": int(st[0].embedding.num_embeddings),
            "seconds": round(time.perf_counter() - started, 1),
            "model2vec_version": _version("model2vec"),
        }
        (work / "model" / "distill.json").write_text(json.dumps(record, indent=2))
        if final.exists():
            shutil.rmtree(final)
        (work / "model").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(args) -> int:
    """``pairmill distill -o DIR [--model M] [distill.pca_dims=N]``."""
    cfg = args.config_sections
    record = distill_model(cfg["encoder"].model, args.output, pca_dims=cfg["distill"].pca_dims)
    print(f"[pairmill] distill: {args.output}: {record['vocabulary']} tokens x {record['dimension']} dims "
          f"in {record['seconds']} s; use it with --model {args.output}")
    return 0
