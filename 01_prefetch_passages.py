#!/usr/bin/env python
"""Step 1: candidate lists -> candidates parquet (+ first-stage TREC run), and training triples.

Subcommands:
  json     TREC DL candidate lists with passage text (the shared JSON form) -> parquet + run
  trec     official form: top-100 run file + queries TSV + MS MARCO v2 corpus (or v1 collection.tsv)
  triples  judged pools -> MS MARCO triples TSV (query<TAB>positive<TAB>negative)

Examples:
  python 01_prefetch_passages.py json --input ../shared/data/trec-dl/dl20/bm25.json \
      --output data/dl20.bm25.candidates.parquet --run_file data/dl20.bm25.run
  python 01_prefetch_passages.py triples --candidates data/dl21.bm25.candidates.parquet \
      --qrels ../shared/data/trec-dl/dl21/qrels.txt --eval_candidates data/dl20.bm25.candidates.parquet \
      --output data/dl21.judged.triples.tsv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from common import data
from common.evaluation import write_trec_run


def refuse_existing(paths, overwrite: bool) -> None:
    existing = [str(p) for p in paths if p and Path(p).exists()]
    if existing and not overwrite:
        sys.exit(f"error: output exists: {', '.join(existing)} (use --overwrite)")


def write_outputs(df: pd.DataFrame, args) -> None:
    data.write_candidates(df, args.output)
    print(f"wrote {args.output}: {df['qid'].nunique()} queries, {len(df)} candidates")
    if args.run_file:
        write_trec_run(data.candidates_to_run(df), args.run_file, tag=args.tag)
        print(f"wrote {args.run_file} (first-stage ranking)")


def cmd_json(args) -> None:
    refuse_existing([args.output, args.run_file], args.overwrite)
    write_outputs(data.read_candidates_json(args.input), args)


def cmd_trec(args) -> None:
    refuse_existing([args.output, args.run_file], args.overwrite)
    run = data.read_trec_run(args.run)
    queries = data.read_queries_tsv(args.queries)
    if args.corpus_v2:
        corpus = data.MsMarcoV2Corpus(args.corpus_v2, cache_dir=args.cache_dir)
    else:
        corpus = data.TsvCollection(args.collection, needed_ids=set(run["docid"]))
    write_outputs(data.hydrate_run(run, queries, corpus, source=str(args.run)), args)


def cmd_triples(args) -> None:
    refuse_existing([args.output], args.overwrite)
    candidates = pd.concat([data.read_candidates(p) for p in args.candidates], ignore_index=True)
    qrels = data.read_qrels(args.qrels)
    for path in args.eval_candidates:
        data.check_disjoint(set(candidates["qid"]), set(data.read_candidates(path)["qid"]),
                            f"training topics of {args.candidates} vs evaluation topics of {path}")
    triples = data.build_triples_from_qrels(
        candidates, qrels, seed=args.seed, min_positive_grade=args.min_positive_grade,
        negatives_per_positive=args.negatives_per_positive, include_unjudged=args.include_unjudged)
    n = data.write_triples_tsv(triples, args.output)
    queries = len({q for q, _p, _n in triples})
    print(f"wrote {args.output}: {n} triples ({2 * n} pairs) from {queries} queries")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def outputs(p, run=True):
        p.add_argument("--output", required=True, help="candidates parquet (zstd)")
        if run:
            p.add_argument("--run_file", help="also write the first-stage ranking as a TREC run")
            p.add_argument("--tag", default="first-stage", help="run tag")
        p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("json", help="shared JSON candidate list -> parquet")
    p.add_argument("--input", required=True)
    outputs(p)
    p.set_defaults(func=cmd_json)

    p = sub.add_parser("trec", help="run file + queries + corpus -> parquet")
    p.add_argument("--run", required=True, help="qid Q0 docid rank score tag (.gz ok)")
    p.add_argument("--queries", required=True, help="qid<TAB>query")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus_v2", help="dir of msmarco_passage_XX.gz shards (seek by offset)")
    source.add_argument("--collection", help="MS MARCO v1 collection.tsv")
    p.add_argument("--cache_dir", help="where v2 shards are decompressed once (default: beside them)")
    outputs(p)
    p.set_defaults(func=cmd_trec)

    p = sub.add_parser("triples", help="judged pools -> triples TSV")
    p.add_argument("--candidates", nargs="+", required=True, help="parquet(s) of the training topics")
    p.add_argument("--qrels", required=True)
    p.add_argument("--eval_candidates", nargs="*", default=[],
                   help="evaluation topics: refuse if any training query is among them")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min_positive_grade", type=int, default=2)
    p.add_argument("--negatives_per_positive", type=int, default=4)
    p.add_argument("--include_unjudged", action="store_true",
                   help="unjudged first-stage candidates count as negatives too")
    outputs(p, run=False)
    p.set_defaults(func=cmd_triples)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except data.DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
