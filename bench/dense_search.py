#!/usr/bin/env python
"""Where FAISS pays off for the dense first stage: search time of the exact batched matrix
products (``common.data.dense.exact_search``) against FAISS flat inner product and FAISS HNSW
(graph build once, then search) over collections of N unit vectors, and HNSW's recall@k of the
exact top k. Vectors are an index's own when ``--index`` is given (sampled with replacement
up to each N, queries = perturbed passages), else random unit vectors (HNSW's hardest case).

  python bench/dense_search.py --sizes 10000 31766 100000 300000 --queries 54 1000 --k 1000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from common.cli import positive_int
from common.data import dense


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[10000, 31766, 100000, 300000])
    p.add_argument("--queries", type=positive_int, nargs="+", default=[54, 1000])
    p.add_argument("--k", type=positive_int, default=1000)
    p.add_argument("--dim", type=positive_int, default=384)
    p.add_argument("--index", help="take the vectors from this dense index dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_hnsw", action="store_true", help="exact and FAISS flat only (no graph build)")
    a = p.parse_args(argv)
    import faiss

    rng = np.random.default_rng(a.seed)
    source = dense.DenseIndex.load(a.index).embeddings if a.index else None
    dim = source.shape[1] if source is not None else a.dim
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; dim {dim}, k {a.k}; "
          f"vectors: {a.index or 'random unit'}")
    print("| passages | queries | exact s | FAISS flat s (add + search) | HNSW build s | HNSW search s | HNSW recall@k |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in a.sizes:
        if source is not None:
            emb = np.asarray(source[rng.integers(0, len(source), n)], dtype=np.float32)
            emb += 0.01 * rng.standard_normal(emb.shape).astype(np.float32)
        else:
            emb = rng.standard_normal((n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        graph, build = (None, 0.0) if a.no_hnsw else timed(lambda: _hnsw(faiss, emb))
        for nq in a.queries:
            queries = emb[rng.integers(0, n, nq)] + 0.05 * rng.standard_normal((nq, dim)).astype(np.float32)
            (_, exact_ids), exact_s = timed(lambda: dense.exact_search(queries, emb, a.k))

            def flat():
                index = faiss.IndexFlatIP(dim)
                index.add(emb)
                return index.search(queries, a.k)
            _, flat_s = timed(flat)
            if graph is None:
                print(f"| {n} | {nq} | {exact_s:.2f} | {flat_s:.2f} | - | - | - |", flush=True)
                continue
            graph.hnsw.efSearch = max(a.k, dense.HNSW_EF_SEARCH)
            (_, hnsw_ids), hnsw_s = timed(lambda: graph.search(queries, a.k))
            recall = np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(hnsw_ids, exact_ids)])
            print(f"| {n} | {nq} | {exact_s:.2f} | {flat_s:.2f} | {build:.1f} | {hnsw_s:.2f} | {recall:.3f} |",
                  flush=True)


def _hnsw(faiss, emb):
    graph = faiss.IndexHNSWFlat(emb.shape[1], dense.HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = dense.HNSW_EF_CONSTRUCTION
    graph.add(emb)
    return graph


if __name__ == "__main__":
    main()
