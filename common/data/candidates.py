"""First-stage candidates: a candidate list (shared JSON, a TREC run + corpus, or BM25 search)
-> the candidates parquet of ``common.data.formats`` and, optionally, its first-stage TREC run.

The subcommands ``json``, ``trec`` and ``bm25`` of ``01_prefetch_passages.py``. The parquet and
the run file appear together or not at all; existing outputs are refused unless
``overwrite`` (``common.io``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import pandas as pd

from common.data import formats as data
from common.data.trec import read_trec_run, write_trec_run
from common.data.first_stage import bm25_search, build_bm25_index
from common.io import atomic_output, refuse_existing

Path_ = str | os.PathLike
Report = Callable[[str], None]


def write_candidates_and_run(df: pd.DataFrame, output: Path_, run_file: Path_ | None = None,
                             tag: str = "first-stage", report: Report = print) -> None:
    """The candidates parquet and (optionally) its run file, both written to temporary names
    first and renamed only when both are complete. A failure raises ``DataError`` naming
    both outputs ("nothing written to ...")."""
    try:
        if run_file:
            with atomic_output(output) as parquet_tmp, atomic_output(run_file) as run_tmp:
                data.write_candidates(df, parquet_tmp)
                write_trec_run(data.candidates_to_run(df), run_tmp, tag=tag)
        else:
            data.write_candidates(df, output)
    except (data.DataError, ValueError) as err:
        names = f"{output}" + (f" and {run_file}" if run_file else "")
        raise data.DataError(f"nothing written to {names}: {' '.join(str(err).split())}") from None
    report(f"wrote {output}: {df['qid'].nunique()} queries, {len(df)} candidates")
    if run_file:
        report(f"wrote {run_file} (first-stage ranking)")


def from_json(input: Path_, output: Path_, run_file: Path_ | None = None, tag: str = "first-stage",
              max_queries: int | None = None, overwrite: bool = False, report: Report = print) -> None:
    """A shared JSON candidate list; ``max_queries``: keep its first N queries."""
    refuse_existing([output, run_file], overwrite, inputs=[input])
    df = data.read_candidates_json(input)
    if max_queries:
        df = df[df["qid"].isin(df["qid"].unique()[:max_queries])].reset_index(drop=True)
    write_candidates_and_run(df, output, run_file, tag, report)


def from_trec(run: Path_, queries: Path_, output: Path_, corpus_v2: Path_ | None = None,
              collection: Path_ | None = None, cache_dir: Path_ | None = None,
              run_file: Path_ | None = None, tag: str = "first-stage", overwrite: bool = False,
              report: Report = print) -> None:
    """A TREC run hydrated with query text and passages from the MS MARCO v2 corpus
    (``corpus_v2``) or a v1 ``collection.tsv``."""
    refuse_existing([output, run_file], overwrite, inputs=[run, queries, corpus_v2, collection])
    ranking = read_trec_run(run)
    texts = data.read_queries_tsv(queries)
    if corpus_v2:
        corpus = data.MsMarcoV2Corpus(corpus_v2, cache_dir=cache_dir)
    else:
        corpus = data.TsvCollection(collection, needed_ids=set(ranking["docid"]))
    df = data.hydrate_run(ranking, texts, corpus, source=str(run))
    write_candidates_and_run(df, output, run_file, tag, report)


def from_bm25(index: Path_, queries: Path_, output: Path_, collection: Path_ | None = None,
              k: int = 100, k1: float = 0.9, b: float = 0.4, threads: int = 2,
              run_file: Path_ | None = None, tag: str = "first-stage", overwrite: bool = False,
              report: Report = print) -> None:
    """BM25 over ``index`` (built first from ``collection`` when given)."""
    refuse_existing([output, run_file], overwrite, inputs=[queries, collection, index])
    if collection:
        stats = build_bm25_index(collection, index, threads=threads, overwrite=overwrite)
        report(f"indexed {stats}")
    texts = data.read_queries_tsv(queries)
    started = time.time()
    df = bm25_search(index, texts, k=k, k1=k1, b=b, threads=threads)
    report(f"searched {len(texts)} queries in {time.time() - started:.1f}s (k={k}, k1={k1}, b={b})")
    write_candidates_and_run(df, output, run_file, tag, report)
