#!/usr/bin/env python
"""Step 1: candidate lists -> candidates parquet (+ first-stage TREC run), and training triples.

Subcommands:
  json     TREC DL candidate lists with passage text (the shared JSON form) -> parquet + run
  trec     official form: top-100 run file + queries TSV + MS MARCO v2 corpus (or v1 collection.tsv)
  triples  judged pools -> MS MARCO triples TSV (query<TAB>positive<TAB>negative)
  bm25     BM25 with pyserini: index a JSONL/TSV collection, search a queries TSV -> parquet + run
  mine     hard negatives from a first-stage run (ranks a-b, judged passages excluded) -> triples
  teacher  score triples with any checkpoint -> teacher scores parquet beside them (distillation)
  distill  the embedded default distillation set: dev-subset + DL21/DL22 queries, BM25 over the
           DL21/DL22 passages, bi-encoder teacher scores (never a DL20 query)

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
import time
from pathlib import Path

import pandas as pd

from common import data
from common.cli import nonneg_int, positive_float, positive_int, unit_float
from common.evaluation import write_trec_run


DL20_QRELS = "../shared/data/trec-dl/dl20/qrels.txt"


def refuse_existing(paths, overwrite: bool) -> None:
    existing = [str(p) for p in paths if p and Path(p).exists()]
    if existing and not overwrite:
        sys.exit(f"error: output exists: {', '.join(existing)} (use --overwrite)")


def write_outputs(df: pd.DataFrame, args) -> None:
    """The candidates parquet and (optionally) its run file appear together or not at all:
    both are written to temporary names first and renamed only when both are complete."""
    try:
        if args.run_file:
            with data.atomic_output(args.output) as parquet_tmp, \
                    data.atomic_output(args.run_file) as run_tmp:
                data.write_candidates(df, parquet_tmp)
                write_trec_run(data.candidates_to_run(df), run_tmp, tag=args.tag)
        else:
            data.write_candidates(df, args.output)
    except (data.DataError, ValueError) as err:
        names = args.output + (f" and {args.run_file}" if args.run_file else "")
        sys.exit(f"error: nothing written to {names}: {' '.join(str(err).split())}")
    print(f"wrote {args.output}: {df['qid'].nunique()} queries, {len(df)} candidates")
    if args.run_file:
        print(f"wrote {args.run_file} (first-stage ranking)")


def cmd_json(args) -> None:
    refuse_existing([args.output, args.run_file], args.overwrite)
    df = data.read_candidates_json(args.input)
    if args.max_queries:
        df = df[df["qid"].isin(df["qid"].unique()[:args.max_queries])].reset_index(drop=True)
    write_outputs(df, args)


def cmd_trec(args) -> None:
    refuse_existing([args.output, args.run_file], args.overwrite)
    run = data.read_trec_run(args.run)
    queries = data.read_queries_tsv(args.queries)
    if args.corpus_v2:
        corpus = data.MsMarcoV2Corpus(args.corpus_v2, cache_dir=args.cache_dir)
    else:
        corpus = data.TsvCollection(args.collection, needed_ids=set(run["docid"]))
    write_outputs(data.hydrate_run(run, queries, corpus, source=str(args.run)), args)


def check_eval_topics(train_qids: set, args) -> None:
    """Training topics never overlap the evaluation topics: those of --eval_candidates and the
    judged qids of --eval_qrels (default: DL20, the evaluation set), unless --allow_eval_overlap."""
    if args.allow_eval_overlap:
        return
    for path in args.eval_candidates:
        data.check_disjoint(train_qids, set(data.read_candidates(path)["qid"]),
                            f"training topics of {args.candidates} vs evaluation topics of {path} "
                            "(--allow_eval_overlap to train on them anyway)")
    if args.eval_qrels and Path(args.eval_qrels).is_file():
        data.check_disjoint(train_qids, set(data.read_qrels(args.eval_qrels)),
                            f"training topics of {args.candidates} vs judged topics of {args.eval_qrels} "
                            "(--allow_eval_overlap to train on them anyway)")


def cmd_triples(args) -> None:
    refuse_existing([args.output], args.overwrite)
    candidates = pd.concat([data.read_candidates(p) for p in args.candidates], ignore_index=True)
    qrels = data.read_qrels(args.qrels)
    check_eval_topics(set(candidates["qid"]), args)
    triples = data.build_triples_from_qrels(
        candidates, qrels, seed=args.seed, min_positive_grade=args.min_positive_grade,
        negatives_per_positive=args.negatives_per_positive, include_unjudged=args.include_unjudged)
    n = data.write_triples_tsv(triples, args.output)
    queries = len({q for q, _p, _n in triples})
    print(f"wrote {args.output}: {n} triples ({2 * n} pairs) from {queries} queries")


def cmd_bm25(args) -> None:
    from common.first_stage import bm25_search, build_bm25_index

    refuse_existing([args.output, args.run_file], args.overwrite)
    if args.collection:
        stats = build_bm25_index(args.collection, args.index, threads=args.threads,
                                 overwrite=args.overwrite)
        print(f"indexed {stats}")
    queries = data.read_queries_tsv(args.queries)
    started = time.time()
    df = bm25_search(args.index, queries, k=args.k, k1=args.k1, b=args.b, threads=args.threads)
    print(f"searched {len(queries)} queries in {time.time() - started:.1f}s "
          f"(k={args.k}, k1={args.k1}, b={args.b})")
    write_outputs(df, args)


def cmd_mine(args) -> None:
    from common.first_stage import mine_hard_negatives

    refuse_existing([args.output], args.overwrite)
    candidates = data.read_candidates(args.candidates)
    check_eval_topics(set(candidates["qid"]), args)
    a, b = (int(x) for x in args.range_for_sampling.split("-"))
    triples, stats = mine_hard_negatives(candidates, data.read_qrels(args.qrels), args.negative_number,
                                         (a, b), args.seed, args.min_positive_grade)
    n = data.write_triples_tsv(triples, args.output)
    print(f"wrote {args.output}: {n} triples; {stats}")


def cmd_teacher(args) -> None:
    from common.modeling import load_model, score_pairs

    refuse_existing([args.output], args.overwrite)
    triples = list(data.TriplesStream(args.triples))
    loaded = load_model(args.checkpoint)
    queries = [q for q, _p, _n in triples]
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, progress=True)
    pos = score_pairs(loaded.model, loaded.tokenizer, queries, [p for _q, p, _n in triples], **kw)
    neg = score_pairs(loaded.model, loaded.tokenizer, queries, [n for _q, _p, n in triples], **kw)
    with data.atomic_output(args.output) as tmp:
        pd.DataFrame({"teacher_pos": pos, "teacher_neg": neg}).to_parquet(tmp, compression="zstd")
    print(f"wrote {args.output}: {len(triples)} rows (row i = triple i of {args.triples})")


def cmd_distill(args) -> None:
    from common.distill import build_distillation_set, embedded_default_sources, fuse_distillation_set

    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()) and not args.overwrite:
        sys.exit(f"error: {args.output_dir} is not empty (use --overwrite)")
    if args.from_set:
        if args.fusion_weight is None:
            sys.exit("error: --from_set re-derives a set with --fusion_weight; give one")
        stats = fuse_distillation_set(args.from_set, args.output_dir, args.fusion_weight,
                                      pairs_per_query=args.pairs_per_query, seed=args.seed)
        print(f"wrote {args.output_dir}: {stats}")
        return
    queries, collection, forbidden = embedded_default_sources(args.shared)
    if args.max_passages:  # a miniature set: the first passages, the queries that reach them
        collection = dict(list(collection.items())[:args.max_passages])
    if args.max_queries:  # the DL21/DL22 topics first (on-topic for this collection), then dev
        dev = set(data.read_queries_tsv(Path(args.shared) / "msmarco-dev-subset" / "queries.tsv"))
        ordered = [q for q in queries if q not in dev] + [q for q in queries if q in dev]
        queries = {q: queries[q] for q in ordered[:args.max_queries]}
    if args.holdout:
        from common.distill import write_holdout

        for qid in write_holdout(args.shared, args.holdout, args.output_dir):
            queries.pop(qid, None)
    stats = build_distillation_set(queries, collection, args.output_dir, k=args.k,
                                   pairs_per_query=args.pairs_per_query, seed=args.seed,
                                   teacher=args.teacher, forbidden_qids=forbidden,
                                   fusion_weight=args.fusion_weight)
    print(f"wrote {args.output_dir}: {stats}")


def cmd_groups(args) -> None:
    from common.distill import build_listwise_groups

    out = Path(args.output_dir)
    if (out / "groups.tsv").exists() and not args.overwrite:
        sys.exit(f"error: {out / 'groups.tsv'} exists (use --overwrite)")
    forbidden = set(data.read_qrels(args.forbid_qrels)) if args.forbid_qrels else set()
    stats = build_listwise_groups(args.candidates, out, group_size=args.group_size,
                                  groups_per_query=args.groups_per_query, seed=args.seed,
                                  forbidden_qids=forbidden)
    print(f"wrote {out / 'groups.tsv'}: {stats}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def eval_guard(p):  # training topics vs evaluation topics (check_eval_topics)
        p.add_argument("--eval_candidates", nargs="*", default=[],
                       help="evaluation topics: refuse if any training query is among them")
        p.add_argument("--eval_qrels", default=DL20_QRELS,
                       help="judged evaluation topics training may not use (default: DL20; '' for none)")
        p.add_argument("--allow_eval_overlap", action="store_true",
                       help="train on evaluation topics anyway (the numbers are then not held out)")

    def outputs(p, run=True):
        p.add_argument("--output", required=True, help="candidates parquet (zstd)")
        if run:
            p.add_argument("--run_file", help="also write the first-stage ranking as a TREC run")
            p.add_argument("--tag", default="first-stage", help="run tag")
        p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("json", help="shared JSON candidate list -> parquet")
    p.add_argument("--input", required=True)
    p.add_argument("--max_queries", type=positive_int, help="keep the first N queries (miniature runs)")
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
    eval_guard(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min_positive_grade", type=nonneg_int, default=2)
    p.add_argument("--negatives_per_positive", type=positive_int, default=4)
    p.add_argument("--include_unjudged", action="store_true",
                   help="unjudged first-stage candidates count as negatives too")
    outputs(p, run=False)
    p.set_defaults(func=cmd_triples)

    p = sub.add_parser("bm25", help="BM25 (pyserini) over a collection -> parquet + run")
    p.add_argument("--collection", help="JSONL {id, contents} or TSV id<TAB>text to index first")
    p.add_argument("--index", required=True, help="Lucene index dir (built here with --collection)")
    p.add_argument("--queries", required=True, help="qid<TAB>query")
    p.add_argument("--k", type=positive_int, default=100)
    p.add_argument("--k1", type=positive_float, default=0.9)
    p.add_argument("--b", type=unit_float, default=0.4)
    p.add_argument("--threads", type=positive_int, default=2)
    outputs(p)
    p.set_defaults(func=cmd_bm25)

    p = sub.add_parser("mine", help="hard negatives from a first-stage candidates parquet -> triples")
    p.add_argument("--candidates", required=True)
    p.add_argument("--qrels", required=True)
    eval_guard(p)
    p.add_argument("--negative_number", type=positive_int, default=7)
    p.add_argument("--range_for_sampling", default="10-100", help="ranks a-b (1-based, inclusive)")
    p.add_argument("--min_positive_grade", type=nonneg_int, default=2)
    p.add_argument("--seed", type=int, default=42)
    outputs(p, run=False)
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("teacher", help="teacher scores for a triples file (margin-MSE distillation)")
    p.add_argument("--triples", required=True)
    p.add_argument("--checkpoint", required=True, help="any checkpoint, tag or model dir")
    p.add_argument("--max_length", type=positive_int, default=256)
    p.add_argument("--batch_size", type=positive_int, default=64)
    outputs(p, run=False)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("distill", help="the embedded default distillation set")
    p.add_argument("--output_dir", default="data/distill")
    p.add_argument("--shared", default="../shared/data/trec-dl")
    p.add_argument("--k", type=positive_int, default=100)
    p.add_argument("--pairs_per_query", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--teacher", default="all-MiniLM-L6-v2")
    p.add_argument("--max_queries", type=positive_int, help="miniature set: at most N training "
                   "queries (DL21/DL22 topics first)")
    p.add_argument("--max_passages", type=positive_int, help="miniature set: the first N passages")
    p.add_argument("--holdout", type=nonneg_int, default=0, metavar="N",
                   help="leave the first N judged DL21 topics out of training: their BM25 lists and "
                        "qrels go to OUTPUT_DIR/holdout.{candidates.parquet,qrels.txt} (monitoring)")
    p.add_argument("--fusion_weight", type=unit_float, help="teacher = w*minmax(cosine) + (1-w)*minmax(BM25) "
                   "per query (default: the plain cosine)")
    p.add_argument("--from_set", help="re-derive from this set's candidates.parquet (no encoding); "
                   "needs --fusion_weight")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("groups", help="listwise groups (query + n passages, teacher scores) "
                                      "from a distillation set's candidates")
    p.add_argument("--candidates", default="data/distill/candidates.parquet")
    p.add_argument("--output_dir", default="data/distill")
    p.add_argument("--group_size", type=positive_int, default=8)
    p.add_argument("--groups_per_query", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--forbid_qrels", default="../shared/data/trec-dl/dl20/qrels.txt",
                   help="refuse candidates of these (evaluation) queries")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_groups)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except data.DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
