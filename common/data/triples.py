"""Training triples for ``02`` / ``03*``: from judged pools (``triples``) or mined hard negatives
of a first-stage run (``mine``), the subcommands of ``01_prefetch_passages.py``. Training
topics never overlap the evaluation topics unless ``allow_eval_overlap``."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path

import pandas as pd

from common.data import formats as data
from common.data.first_stage import mine_hard_negatives
from common.io import refuse_existing

DL20_QRELS = "../shared/data/trec-dl/dl20/qrels.txt"  # the evaluation topics, refused by default
Path_ = str | os.PathLike
Report = Callable[[str], None]


def check_eval_topics(train_qids: set, source: str, eval_candidates: Iterable[Path_] = (),
                      eval_qrels: Path_ | None = DL20_QRELS, allow_eval_overlap: bool = False) -> None:
    """Training topics (of ``source``) never overlap the evaluation topics: those of
    ``eval_candidates`` and the judged qids of ``eval_qrels`` (default: DL20, the evaluation
    set), unless ``allow_eval_overlap``."""
    if allow_eval_overlap:
        return
    for path in eval_candidates:
        data.check_disjoint(train_qids, set(data.read_candidates(path)["qid"]),
                            f"training topics of {source} vs evaluation topics of {path} "
                            "(--allow_eval_overlap to train on them anyway)")
    if eval_qrels and Path(eval_qrels).is_file():
        data.check_disjoint(train_qids, set(data.read_qrels(eval_qrels)),
                            f"training topics of {source} vs judged topics of {eval_qrels} "
                            "(--allow_eval_overlap to train on them anyway)")


DL20_TOPICS = "../shared/data/trec-dl/dl20/bm25.json"  # the evaluation queries (text), refused by default


def check_text_queries(queries: Iterable[str], source: str, eval_topics: Iterable[Path_] = (DL20_TOPICS,),
                       allow_eval_overlap: bool = False) -> None:
    """Queries given as text (calibration or training triples) are none of the evaluation
    queries of ``eval_topics`` (candidates parquet or the shared JSON lists; a default file that
    is absent is skipped), compared after whitespace and case folding, unless ``allow_eval_overlap``."""
    if allow_eval_overlap:
        return
    ours = {" ".join(str(q).lower().split()) for q in queries}
    for path in eval_topics:
        if not path or (str(path) == DL20_TOPICS and not Path(path).is_file()):
            continue
        frame = (data.read_candidates_json(path) if str(path).endswith((".json", ".json.gz"))
                 else data.read_candidates(path))
        shared = sorted(ours & {" ".join(str(q).lower().split()) for q in frame["query"].unique()})
        if shared:
            raise data.DataError(f"{source}: {len(shared)} queries are evaluation queries of {path} (e.g. "
                            f"{shared[0]!r}): use training-side text, or pass --allow_eval_overlap")


def calibration_pairs(path: Path_, pairs: int, held_out_triples: int = 0,
                      eval_topics: Iterable[Path_] = (DL20_TOPICS,), allow_eval_overlap: bool = False):
    """``((queries, passages), held_out)`` from a training-side triples file: the first ``pairs``
    pairs (a query with each passage of the first triples), checked against the evaluation queries
    (:func:`check_text_queries`), and up to ``held_out_triples`` (query, positive, negative) triples
    after them, which the calibration did not see."""
    n_calib = (pairs + 1) // 2
    rows = list(islice(iter(data.TriplesStream(path)), n_calib + held_out_triples))
    chosen = [(row[0], p) for row in rows[:n_calib] for p in row[1:]][:pairs]
    if not chosen:
        raise data.DataError(f"{path}: no triples to calibrate on")
    calibration = ([q for q, _ in chosen], [p for _, p in chosen])
    check_text_queries(calibration[0], f"--calibration_triples {path}", eval_topics, allow_eval_overlap)
    return calibration, [(row[0], row[1], row[2]) for row in rows[n_calib:] if len(row) >= 3]


def triples_from_qrels(candidates: list[Path_], qrels: Path_, output: Path_, *, seed: int = 42,
                       min_positive_grade: int = 2, negatives_per_positive: int = 4,
                       include_unjudged: bool = False, eval_candidates: Iterable[Path_] = (),
                       eval_qrels: Path_ | None = DL20_QRELS, allow_eval_overlap: bool = False,
                       overwrite: bool = False, report: Report = print) -> None:
    """Judged pools of ``candidates`` -> a triples TSV (``data.build_triples_from_qrels``)."""
    refuse_existing([output], overwrite, inputs=[*candidates, qrels])
    pools = pd.concat([data.read_candidates(p) for p in candidates], ignore_index=True)
    judgements = data.read_qrels(qrels)
    check_eval_topics(set(pools["qid"]), candidates, eval_candidates, eval_qrels, allow_eval_overlap)
    triples = data.build_triples_from_qrels(
        pools, judgements, seed=seed, min_positive_grade=min_positive_grade,
        negatives_per_positive=negatives_per_positive, include_unjudged=include_unjudged)
    n = data.write_triples_tsv(triples, output)
    queries = len({q for q, _p, _n in triples})
    report(f"wrote {output}: {n} triples ({2 * n} pairs) from {queries} queries")


def mined_triples(candidates: Path_, qrels: Path_, output: Path_, *, negative_number: int = 7,
                  range_for_sampling: str = "10-100", min_positive_grade: int = 2, seed: int = 42,
                  eval_candidates: Iterable[Path_] = (), eval_qrels: Path_ | None = DL20_QRELS,
                  allow_eval_overlap: bool = False, overwrite: bool = False,
                  report: Report = print) -> None:
    """Hard negatives from ranks a-b (``range_for_sampling``) of a first-stage candidates
    parquet, judged passages excluded (``first_stage.mine_hard_negatives``)."""
    refuse_existing([output], overwrite, inputs=[candidates, qrels])
    pools = data.read_candidates(candidates)
    check_eval_topics(set(pools["qid"]), candidates, eval_candidates, eval_qrels, allow_eval_overlap)
    a, b = (int(x) for x in range_for_sampling.split("-"))
    triples, stats = mine_hard_negatives(pools, data.read_qrels(qrels), negative_number, (a, b),
                                         seed, min_positive_grade)
    n = data.write_triples_tsv(triples, output)
    report(f"wrote {output}: {n} triples; {stats}")
