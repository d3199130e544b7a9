"""Embedding columns: arrow ``fixed_size_list<float32>[D]`` on disk and in Ray Data's arrow
batches, ``(N, D)`` float32 matrices in numpy (one conversion each way, for every job), and the
exact top-k search over such matrices that evaluation uses and the indexes are tested against."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> arrow fixed_size_list<float32>[D], the on-disk embedding format."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def to_matrix(column) -> np.ndarray:
    """An embedding column -> (N, D) float32, C-contiguous.

    Takes an arrow fixed_size_list (chunked or not), or what Ray's numpy batches give: a 2-D array
    for a fixed_size_list / tensor column, an object array of 1-D arrays for a variable list column.
    """
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        dim = column.type.list_size
        return np.ascontiguousarray(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)
    array = np.asarray(column)
    if array.dtype == object:
        array = np.stack(list(array)) if len(array) else np.empty((0, 0), dtype=np.float32)
    return np.ascontiguousarray(array, dtype=np.float32)


def exact_search(corpus: np.ndarray, queries: np.ndarray, k: int, query_batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k rows of ``corpus`` (N, D) for ``queries`` (Q, D) by inner product:
    (scores (Q, k) float32, descending; ids (Q, k) int64 row numbers), ties to the smaller id,
    padded with -inf / -1 when the corpus has fewer than k rows (as a FAISS index answers).

    Scores ``query_batch`` queries at a time (memory: query_batch x N floats). FAISS's IndexFlatIP
    computes the same products; this stays because evaluation needs the smaller-id tie rule (FAISS
    breaks ties by insertion order) and tests need a reference that is not FAISS.
    """
    corpus = np.asarray(corpus, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    take = min(k, len(corpus))
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if take == 0:
        return out_scores, out_ids
    for start in range(0, len(queries), query_batch):
        scores = queries[start : start + query_batch] @ corpus.T  # (B, N)
        if take < scores.shape[1]:
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]  # (B, take), unordered
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)  # by score desc, then id asc
        out_ids[start : start + len(scores), :take] = np.take_along_axis(top, order, axis=1)
        out_scores[start : start + len(scores), :take] = np.take_along_axis(top_scores, order, axis=1)
    return out_scores, out_ids
