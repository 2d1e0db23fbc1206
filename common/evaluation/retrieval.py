"""Retrieval over a collection (not re-ranking): first-stage quality at depth 1000, index cost.

* :func:`retrieval_measures`: NDCG@10 and R@100 as ``common.data.trec.evaluate_run``
  computes them, and R@1000 with the same conventions (trec_eval ``-c -l 2 -m recall.1000`` on the
  run in trec_eval's order): a passage nobody judged is not relevant, a judged relevant passage
  missing from the collection is a miss, a judged query missing from the run scores 0.
* :func:`embedded_collection`: the embedded retrieval task: every distinct passage of the shared
  first-stage lists (DL20, DL21, DL22: 31,766 passages) as one collection, and each year's topics
  (the study's queries: DL20's, never trained on).
* :func:`dense_study`: rows of BM25 (pyserini, when installed) and of bi-encoders
  (``common.data.dense``) over that collection: quality, index build time, speed-up, size.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytrec_eval

from common.data import formats as data
from common.data.trec import BINARY_RELEVANCE_LEVEL, SCORE_DECIMALS, _str_keys, _truncate, evaluate_run
from common.io import atomic_write_text

RETRIEVAL_MEASURES = ("ndcg@10", "recall@100", "recall@1000")
YEARS = ("dl20", "dl21", "dl22")


def retrieval_measures(run, qrels) -> dict:
    """Means over the judged queries of :data:`RETRIEVAL_MEASURES` (+ ``num_queries``)."""
    means, _ = evaluate_run(run, qrels)
    judged = {q: {str(d): int(g) for d, g in docs.items()} for q, docs in _str_keys(qrels, "qrels").items() if docs}
    deep = _truncate({q: {str(d): s for d, s in docs.items()} for q, docs in _str_keys(run, "run").items()
                      if q in judged and docs}, 1000, SCORE_DECIMALS)
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"recall.1000"}, relevance_level=BINARY_RELEVANCE_LEVEL
                                               ).evaluate(deep)
    recall = sum(per_query.get(q, {}).get("recall_1000", 0.0) for q in judged) / len(judged)
    return {"ndcg@10": means["ndcg@10"], "recall@100": means["recall@100"], "recall@1000": recall,
            "num_queries": means["num_queries"]}


def embedded_collection(shared: str | Path, out_dir: str | Path) -> tuple[Path, dict[str, Path], int]:
    """Write ``out_dir/collection.tsv`` (every distinct passage of the shared lists of
    :data:`YEARS`, in order of first appearance, files sorted by name) and each year's topics,
    ``out_dir/{year}.queries.tsv``; returns the collection's path, the topic files by year and the
    passage count. A docid with two texts is refused."""
    shared, out_dir = Path(shared), Path(out_dir)
    passages: dict[str, str] = {}
    queries: dict[str, dict[str, str]] = {year: {} for year in YEARS}
    for year in YEARS:
        files = sorted((shared / year).glob("*.json"))
        if not files:
            raise data.DataError(f"{shared / year}: no first-stage lists (*.json)")
        for file in files:
            frame = data.read_candidates_json(file)
            for qid, query, docid, passage in zip(frame["qid"], frame["query"], frame["docid"], frame["passage"]):
                if passages.setdefault(docid, passage) != passage:
                    raise data.DataError(f"{file}: docid {docid!r} has another text in an earlier list")
                queries[year].setdefault(qid, query)
    clean = re.compile(r"[\t\r\n]")
    collection = atomic_write_text(out_dir / "collection.tsv", "".join(
        f"{d}\t{clean.sub(' ', t)}\n" for d, t in passages.items()))
    topics = {year: atomic_write_text(out_dir / f"{year}.queries.tsv", "".join(
        f"{q}\t{clean.sub(' ', t)}\n" for q, t in queries[year].items())) for year in YEARS}
    return collection, topics, len(passages)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_")[-80:] or "encoder"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def dense_study(shared: str | Path, work_dir: str | Path, encoders: list[str], *,
                asymmetric: list[tuple[str, str]] = (), bm25: bool = True, k: int = 1000,
                max_length: int = 256, batch_size: int = 64, threads: int = 2,
                report: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Rows of the retrieval study over :func:`embedded_collection` with DL20's queries and qrels:
    BM25 (when ``bm25``), each of ``encoders``, and each ``(passage encoder, query encoder)`` of
    ``asymmetric``. Indexes are kept under ``work_dir/index/`` and reused by a rerun (their build
    time is the first build's). Returns the rows and the setting."""
    from common.data import dense

    work_dir = Path(work_dir)
    collection, topics, n = embedded_collection(shared, work_dir)
    queries = topics["dl20"]
    qrels = data.read_qrels(Path(shared) / "dl20" / "qrels.txt")
    rows = []

    def save(complete: bool) -> dict:  # after every row: an interrupted study keeps what it measured
        setting = {"passages": n, "queries": len(data.read_queries_tsv(queries)), "k": k, "max_length": max_length,
                   "threads": threads, "judged_queries": rows[0]["num_queries"] if rows else None,
                   "complete": complete}
        atomic_write_text(work_dir / "study.json", json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
        return setting

    if bm25:
        from common.data.first_stage import bm25_search, build_bm25_index

        stats = build_bm25_index(collection, work_dir / "bm25_index", threads=threads, overwrite=True)
        started = time.perf_counter()
        frame = bm25_search(work_dir / "bm25_index", data.read_queries_tsv(queries), k=k, threads=threads)
        rows.append({"first_stage": "BM25 (pyserini, k1=0.9, b=0.4)", "query_encoder": "-",
                     **retrieval_measures(data.candidates_to_run(frame), qrels),
                     "index_seconds": stats["seconds"], "passages_per_s": stats["passages_per_s"],
                     "index_mib": _dir_bytes(work_dir / "bm25_index") / 2**20,
                     "search_seconds": time.perf_counter() - started})
        save(False)
    for encoder, query_encoder in [(e, None) for e in encoders] + list(asymmetric):
        slug = _slug(encoder)
        label = slug + (f"+q_{_slug(query_encoder)}" if query_encoder else "")
        output = work_dir / f"{label}.parquet"
        stats = dense.from_dense(encoder, collection, queries, work_dir / "index" / slug, output,
                                 run_file=work_dir / f"{label}.run", tag=label[:60], k=k,
                                 max_length=max_length, batch_size=batch_size, query_encoder=query_encoder,
                                 threads=threads, overwrite=True, report=report)
        meta = dense.read_meta(work_dir / "index" / slug)
        rows.append({"first_stage": encoder, "query_encoder": query_encoder or "",
                     **retrieval_measures(data.candidates_to_run(data.read_candidates(output)), qrels),
                     "index_seconds": meta["encode_seconds"], "passages_per_s": meta["passages_per_s"],
                     "index_mib": meta["bytes"] / 2**20, "search_seconds": stats["search_seconds"],
                     "candidates": str(output)})
        save(False)
    reference = next((r["index_seconds"] for r in rows if r["query_encoder"] == "" and
                      not r["first_stage"].startswith("BM25")), None)
    for row in rows:
        row["build_speedup"] = (reference / row["index_seconds"]) if reference and row["index_seconds"] else None
    return rows, save(True)


def study_table(rows: list[dict], setting: dict, command: str) -> str:
    """The markdown table of :func:`dense_study`'s rows, with its conventions."""
    lines = [
        f"Retrieval over the embedded collection: {setting['passages']:,} distinct passages of the shared "
        f"DL20/DL21/DL22 first-stage lists; DL20's {setting['queries']} topics as queries "
        f"({setting['judged_queries']} judged), top {setting['k']} retrieved, max_length {setting['max_length']}, "
        f"{setting['threads']} threads.",
        "Unjudged passages count as not relevant; R@k counts grade >= 2 as relevant, and a judged relevant "
        "passage outside the collection is a miss (trec_eval -c -l 2 -m recall.k); NDCG@10 gains every grade.",
        "Index build: BM25 = Anserini indexing; dense = encoding every passage (fp32 torch, CPU); "
        "speed-up relative to the first dense row; size = Lucene index dir / embeddings.npy + docids.txt.",
        "",
        "| first stage | query encoder | NDCG@10 | R@100 | R@1000 | index build s | passages/s | build speed-up "
        "| index MiB | search s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = f"{r['build_speedup']:.2f}x" if r.get("build_speedup") else ""
        lines.append(f"| {r['first_stage']} | {r['query_encoder'] or '(itself)'} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@100']:.4f} | {r['recall@1000']:.4f} | {r['index_seconds']:.1f} | "
                     f"{r['passages_per_s'] or 0:.0f} | {speedup} | {r['index_mib']:.1f} | {r['search_seconds']:.2f} |")
    return "\n".join(lines + ["", f"Command: `{command}`", ""])
