#!/usr/bin/env python
"""Step 1: candidate lists -> candidates parquet (+ first-stage TREC run), and training triples.

Only the command line lives here; each subcommand is one call into common/: ``json``, ``trec``,
``bm25`` -> common.data.candidates; ``triples``, ``mine`` -> common.data.triples; ``teacher``,
``distill``, ``groups`` -> common.data.distill; ``augment``, ``mix`` -> common.data.augment. Existing outputs are refused unless --overwrite.

Subcommands:
  json     TREC DL candidate lists with passage text (the shared JSON form) -> parquet + run
  trec     official form: top-100 run file + queries TSV + MS MARCO v2 corpus (or v1 collection.tsv)
  triples  judged pools -> MS MARCO triples TSV (query<TAB>positive<TAB>negative)
  bm25     BM25 with pyserini: index a JSONL/TSV collection, search a queries TSV -> parquet + run
  dense    a bi-encoder's embeddings of a JSONL/TSV collection (a saved, resumable index), exact
           or FAISS search of a queries TSV -> parquet + run (common.data.dense)
  mine     hard negatives from a first-stage run (ranks a-b, judged passages excluded) -> triples
  teacher  score triples with any checkpoint -> teacher scores parquet beside them (distillation)
  distill  the embedded default distillation set: dev-subset + DL21/DL22 queries, BM25 over the
           DL21/DL22 passages, bi-encoder teacher scores (never a DL20 query)
  augment  pseudo-queries (crops, inverse-cloze sentences, keywords, or a doc2query model) from a
           distillation set's passages, run through the same path: a set 02/03* read unchanged
  mix      several distillation sets (same teacher scale) shuffled into one training stream

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

from common.data import candidates
from common.data import dense
from common.data import augment
from common.data import distill
from common.data import triples as training_data
from common.training.argtypes import nonneg_int, parse_args, positive_float, positive_int, unit_float
from common.data.formats import DataError
from common.serving.rank import AUTO
from common.serving.runners import BACKENDS
from common.data.triples import DL20_QRELS

BACKEND_CHOICES = (AUTO, *BACKENDS)
BACKEND_HELP = ("the teacher's backend (common.serving.rank); auto: for a dir shipped by 04_reshape.py --onnx "
                "or --openvino the backend measured fastest on this host class (common.serving.choose), "
                "else torch fp32")


def cmd_json(a) -> None:
    candidates.from_json(a.input, a.output, a.run_file, a.tag, a.max_queries, a.overwrite)


def cmd_trec(a) -> None:
    candidates.from_trec(a.run, a.queries, a.output, corpus_v2=a.corpus_v2, collection=a.collection,
                         cache_dir=a.cache_dir, run_file=a.run_file, tag=a.tag, overwrite=a.overwrite)


def cmd_bm25(a) -> None:
    candidates.from_bm25(a.index, a.queries, a.output, collection=a.collection, k=a.k, k1=a.k1,
                         b=a.b, threads=a.threads, run_file=a.run_file, tag=a.tag,
                         overwrite=a.overwrite)


def cmd_dense(a) -> None:
    dense.from_dense(a.encoder, a.collection, a.queries, a.index, a.output, run_file=a.run_file,
                     tag=a.tag, k=a.k, how=a.search, backend=a.backend, max_length=a.max_length,
                     batch_size=a.batch_size, shard_size=a.shard_size, query_encoder=a.query_encoder,
                     device=a.device, threads=a.threads, overwrite=a.overwrite)


def _eval_guard(a) -> dict:
    return dict(eval_candidates=a.eval_candidates, eval_qrels=a.eval_qrels,
                allow_eval_overlap=a.allow_eval_overlap, overwrite=a.overwrite)


def cmd_triples(a) -> None:
    training_data.triples_from_qrels(a.candidates, a.qrels, a.output, seed=a.seed,
                                     min_positive_grade=a.min_positive_grade,
                                     negatives_per_positive=a.negatives_per_positive,
                                     include_unjudged=a.include_unjudged, **_eval_guard(a))


def cmd_mine(a) -> None:
    training_data.mined_triples(a.candidates, a.qrels, a.output, negative_number=a.negative_number,
                                range_for_sampling=a.range_for_sampling,
                                min_positive_grade=a.min_positive_grade, seed=a.seed, **_eval_guard(a))


def cmd_teacher(a) -> None:
    n = distill.score_triples(a.triples, a.checkpoint, a.output, batch_size=a.batch_size,
                              max_length=a.max_length, overwrite=a.overwrite, backend=a.backend)
    print(f"wrote {a.output}: {n} rows (row i = triple i of {a.triples})")


def cmd_distill(a) -> None:
    stats = distill.build_default_set(a.output_dir, shared=a.shared, k=a.k,
                                      pairs_per_query=a.pairs_per_query, seed=a.seed,
                                      teacher=a.teacher, max_queries=a.max_queries,
                                      max_passages=a.max_passages, holdout=a.holdout,
                                      fusion_weight=a.fusion_weight, from_set=a.from_set,
                                      overwrite=a.overwrite, teacher_backend=a.teacher_backend)
    print(f"wrote {a.output_dir}: {stats}")


def cmd_augment(a) -> None:
    stats = augment.build_augmented_set(a.from_set, a.output_dir, num_queries=a.num_queries, methods=a.methods,
                                        seed=a.seed, generator=a.generator, shared=a.shared,
                                        fusion_weight=a.fusion_weight, overwrite=a.overwrite)
    print(f"wrote {a.output_dir}: {stats['augment']['made']} pseudo-queries ({stats['augment']['per_method']}), "
          f"{stats['pairs']} triples")


def cmd_mix(a) -> None:
    stats = augment.mix_sets(a.sets, a.output_dir, a.take, a.seed, a.overwrite)
    print(f"wrote {a.output_dir}: {stats['pairs']} triples ({' + '.join(map(str, stats['take']))})")


def cmd_groups(a) -> None:
    stats = distill.build_groups_file(a.candidates, a.output_dir, group_size=a.group_size,
                                      groups_per_query=a.groups_per_query, seed=a.seed,
                                      forbid_qrels=a.forbid_qrels, overwrite=a.overwrite)
    print(f"wrote {Path(a.output_dir) / 'groups.tsv'}: {stats}")


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

    def outputs(p, run=True, tag="first-stage"):
        p.add_argument("--output", required=True, help="candidates parquet (zstd)")
        if run:
            p.add_argument("--run_file", help="also write the first-stage ranking as a TREC run")
            p.add_argument("--tag", default=tag, help="run tag")
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

    p = sub.add_parser("dense", help="dense retrieval with a bi-encoder over a collection -> parquet + run")
    p.add_argument("--encoder", required=True, help="any bi-encoder: packaged tag, model dir, checkpoint "
                   "(masked or reshaped) or shipped dir")
    p.add_argument("--collection", required=True, help="JSONL {id, contents} or TSV id<TAB>text")
    p.add_argument("--queries", required=True, help="qid<TAB>query")
    p.add_argument("--index", required=True, help="index dir: built here on the first run (resumed if "
                   "interrupted), reused by later runs with the same encoder and collection")
    p.add_argument("--k", type=positive_int, default=100)
    p.add_argument("--search", choices=dense.SEARCHES, default="exact",
                   help="exact: batched matrix products (default); flat: FAISS IndexFlatIP (exact); "
                        "hnsw: FAISS HNSW graph (approximate; built once, saved in the index dir)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=AUTO, help="the encoder's backend "
                   "(common.serving.rank); auto: a shipped dir's fastest backend here, else torch fp32")
    p.add_argument("--max_length", type=positive_int, default=256, help="tokens per passage and query")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--shard_size", type=positive_int, default=dense.SHARD_SIZE,
                   help="passages per saved shard of the index build (the unit a rerun resumes from)")
    p.add_argument("--query_encoder", help="embed the queries with this bi-encoder (an asymmetric pair: "
                   "a pruned passage encoder beside its unpruned teacher); default: the model's own")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    outputs(p, tag="dense")
    p.set_defaults(func=cmd_dense)

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
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=AUTO, help=BACKEND_HELP)
    outputs(p, run=False)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("distill", help="the embedded default distillation set")
    p.add_argument("--output_dir", default="data/distill")
    p.add_argument("--shared", default=distill.DEFAULT_SHARED)
    p.add_argument("--k", type=positive_int, default=100)
    p.add_argument("--pairs_per_query", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--teacher", default="all-MiniLM-L6-v2")
    p.add_argument("--teacher_backend", choices=BACKEND_CHOICES, default=AUTO, help=BACKEND_HELP)
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

    p = sub.add_parser("augment", help="pseudo-queries from a distillation set's passages -> a distillation set")
    p.add_argument("--from_set", default="data/distill",
                   help="the set whose collection, BM25 index, teacher, k and pairs per query are used")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_queries", type=positive_int, required=True, help="pseudo-queries to make")
    p.add_argument("--methods", nargs="+", default=["crop", "ict", "keywords"], choices=augment.METHODS,
                   help="one per query, in turn (generator: needs --generator)")
    p.add_argument("--generator", metavar="MODEL", help="a seq2seq doc2query model (dir or hub name)")
    p.add_argument("--fusion_weight", type=unit_float, help="fuse the teacher with BM25 as `distill` does")
    p.add_argument("--shared", default=distill.DEFAULT_SHARED, help="for the DL20 lists (never a source)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("mix", help="distillation sets shuffled into one training stream")
    p.add_argument("--sets", nargs="+", required=True, help="distillation set dirs (same teacher and fusion)")
    p.add_argument("--take", nargs="+", type=positive_int, help="triples from the start of each set (default: all)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("groups", help="listwise groups (query + n passages, teacher scores) "
                                      "from a distillation set's candidates")
    p.add_argument("--candidates", default="data/distill/candidates.parquet")
    p.add_argument("--output_dir", default="data/distill")
    p.add_argument("--group_size", type=positive_int, default=8)
    p.add_argument("--groups_per_query", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--forbid_qrels", default=DL20_QRELS,
                   help="refuse candidates of these (evaluation) queries")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_groups)

    args = parse_args(parser, argv)
    try:
        args.func(args)
    except (DataError, OSError, ValueError) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")


if __name__ == "__main__":
    main()
