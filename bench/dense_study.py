#!/usr/bin/env python
"""The retrieval study on the embedded data (``common.evaluation.retrieval.dense_study``): BM25 and
bi-encoders over every distinct passage of the shared DL20/DL21/DL22 first-stage lists (31,766),
DL20's topics as queries; NDCG@10, R@100, R@1000, index build time and size -> a markdown table.

  python bench/dense_study.py --encoders all-MiniLM-L6-v2 --work_dir runs/dense \
      --table results/dense/README.md
  python bench/dense_study.py --encoders all-MiniLM-L6-v2 runs/bi/recover/final \
      --asymmetric runs/bi/recover/final=all-MiniLM-L6-v2 ...   # + a pruned encoder, alone and
                                                                # with the unpruned query encoder
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from common.cli import fail, positive_int
from common.data.formats import DataError
from common.evaluation.retrieval import dense_study, study_table
from common.io import atomic_write_text


def pair(text: str) -> tuple[str, str]:
    encoder, sep, query_encoder = text.partition("=")
    if not sep or not encoder or not query_encoder:
        raise argparse.ArgumentTypeError(f"expected PASSAGE_ENCODER=QUERY_ENCODER, got {text!r}")
    return encoder, query_encoder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="../shared/data/trec-dl")
    p.add_argument("--work_dir", default="runs/dense", help="collection, indexes (reused), runs, study.json")
    p.add_argument("--encoders", nargs="*", default=["all-MiniLM-L6-v2"], help="bi-encoders, one row each")
    p.add_argument("--asymmetric", type=pair, nargs="*", default=[], metavar="ENCODER=QUERY_ENCODER",
                   help="rows whose queries another encoder embeds")
    p.add_argument("--no_bm25", action="store_true", help="leave out the BM25 row (needs pyserini)")
    p.add_argument("--k", type=positive_int, default=1000)
    p.add_argument("--max_length", type=positive_int, default=256)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--table", required=True, help="markdown table written here")
    a = p.parse_args(argv)
    try:
        rows, setting = dense_study(a.shared, a.work_dir, a.encoders, asymmetric=a.asymmetric, bm25=not a.no_bm25,
                                    k=a.k, max_length=a.max_length, batch_size=a.batch_size, threads=a.threads)
    except (DataError, FileExistsError, ValueError) as err:
        fail(err)
    command = "python bench/dense_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(a.table, study_table(rows, setting, command))
    print(Path(a.table).read_text())


if __name__ == "__main__":
    main()
