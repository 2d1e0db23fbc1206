"""Run evaluation with TREC Deep Learning conventions, computed by trec_eval's own C code.

A *run* is ``{qid: {docid: score}}`` and *qrels* are ``{qid: {docid: grade}}``; ids may be
``int`` or ``str`` (they are compared as strings). :func:`evaluate_run` returns the four
measures of :data:`MEASURES` with the conventions of the TREC DL track overviews and of
Anserini's reproduction pages:

* ``ndcg@10``    -- ``trec_eval -c -m ndcg_cut.10``: gain is the relevance grade, every grade
  counts (grade 1 included).
* ``map@100``    -- ``trec_eval -c -l 2 -m map_cut.100``: grade >= 2 is relevant.
* ``rr@10``      -- ``trec_eval -c -l 2 -M 10 -m recip_rank``: trec_eval's ``recip_rank`` has
  no cut of its own, so the run is truncated to its top 10 documents here (``-M 10``).
* ``recall@100`` -- ``trec_eval -c -l 2 -m recall.100``.

Every measure is computed on the run truncated to depth 100 (the re-ranking depth).
Judged queries (non-empty qrels) that the run lacks score 0 on every measure (``-c``); the mean
is over all judged queries; run queries without judgements are ignored.

Ties, exactly as trec_eval sees them
------------------------------------
trec_eval ignores the rank column: it sorts each query by score descending and breaks ties by
docid in *descending* ``strcmp`` order (``comp_sim_docno`` in ``form_res_rels.c``). It holds a
score as a C ``float`` parsed from the run file's text, so two scores tie when their *printed*
values round to the same float32. Run files are printed with 6 decimals (``%f``, the format of
Anserini and Pyserini runs, and of :func:`write_trec_run`), which is what the published
baselines were scored on: ranking BM25 hits at full float32 precision can move MAP@100 in
the fourth decimal against trec_eval on Anserini's run file (``tests/test_evaluation.py``).

So a score is taken here as ``float32(float("%.6f" % score))`` (:data:`SCORE_DECIMALS`;
``score_decimals=None`` keeps full float64 text instead). :func:`ranked` applies that order;
the cut-offs of :func:`evaluate_run` and the ranks of :func:`write_trec_run` use it, so
``evaluate_run(run)`` equals trec_eval run on the file ``write_trec_run(run)`` writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytrec_eval

from common.data.formats import DataError, _iter_lines
from common.io import atomic_output, atomic_write_text  # noqa: F401 (atomic_write_text: imported from here)

MEASURES = ("ndcg@10", "map@100", "rr@10", "recall@100")

#: Depth every run is truncated to before evaluation (MAP@100, R@100).
RUN_DEPTH = 100
#: Depth of the run for the reciprocal rank (trec_eval ``-M 10``).
RR_DEPTH = 10
#: Minimum grade counted as relevant by the binary measures (trec_eval ``-l 2``).
BINARY_RELEVANCE_LEVEL = 2
#: Decimals of a score in a run file (``%f``, as Anserini/Pyserini write them); defines ties.
SCORE_DECIMALS = 6

CONVENTIONS = (
    "Evaluation conventions (TREC Deep Learning; trec_eval's C code via pytrec_eval): each "
    "query's candidates are ranked by score descending, scores taken as trec_eval reads them "
    "from a run file (printed with 6 decimals, held as float32), ties broken by docid "
    "descending, and the ranking is truncated to depth 100. "
    "NDCG@10 uses every relevance grade as gain (`trec_eval -c -m ndcg_cut.10`); "
    "MAP@100, RR@10 and R@100 count grade >= 2 as relevant "
    "(`trec_eval -c -l 2 -m map_cut.100`, `trec_eval -c -l 2 -M 10 -m recip_rank`, "
    "`trec_eval -c -l 2 -m recall.100`). A judged query missing from the run scores 0 on every "
    "measure (`-c`); means are over all judged queries; queries without judgements are ignored."
)

# Our measure name -> (trec_eval measure requested, key pytrec_eval returns, relevance level,
# run depth).
_TREC_EVAL_SPEC = {
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10", 1, RUN_DEPTH),
    "map@100": ("map_cut.100", "map_cut_100", BINARY_RELEVANCE_LEVEL, RUN_DEPTH),
    "rr@10": ("recip_rank", "recip_rank", BINARY_RELEVANCE_LEVEL, RR_DEPTH),
    "recall@100": ("recall.100", "recall_100", BINARY_RELEVANCE_LEVEL, RUN_DEPTH),
}

Run = Mapping[object, Mapping[object, float]]
Qrels = Mapping[object, Mapping[object, int]]


def score_text(score: float, score_decimals: int | None = SCORE_DECIMALS) -> str:
    """A score as printed in a run file: ``score_decimals`` fixed decimals, or exact ``repr``."""
    value = float(score)
    if math.isnan(value):
        raise ValueError("NaN score in run")
    return repr(value) if score_decimals is None else f"{value:.{score_decimals}f}"


def trec_score(score: float, score_decimals: int | None = SCORE_DECIMALS) -> float:
    """The score as trec_eval holds it: the run-file text parsed into a C ``float`` (float32)."""
    return float(np.float32(float(score_text(score, score_decimals))))


def ranked(
    doc_scores: Mapping[object, float], score_decimals: int | None = SCORE_DECIMALS
) -> list[tuple[str, float]]:
    """One query's documents in trec_eval's order, as ``(docid, original score)`` pairs.

    Score descending as trec_eval holds it (:func:`trec_score`), ties broken by docid
    descending (Python's string order equals ``strcmp`` on UTF-8 bytes).
    """
    keyed = [
        ((trec_score(score, score_decimals), str(docid)), (str(docid), float(score)))
        for docid, score in doc_scores.items()
    ]
    keyed.sort(key=lambda pair: pair[0], reverse=True)
    return [item for _, item in keyed]


def _truncate(
    run: Mapping[str, Mapping[str, float]], depth: int, score_decimals: int | None
) -> dict[str, dict[str, float]]:
    """Each query's top ``depth`` documents in trec_eval order, with trec_eval's score values."""
    return {
        qid: {
            docid: trec_score(score, score_decimals)
            for docid, score in ranked(docs, score_decimals)[:depth]
        }
        for qid, docs in run.items()
    }


def _str_keys(mapping: Mapping[object, Mapping], what: str) -> dict[str, Mapping]:
    """Re-key a per-query mapping by ``str(qid)``, refusing qids that collide (``1`` and ``"1"``)."""
    out: dict[str, Mapping] = {}
    for qid, docs in mapping.items():
        key = str(qid)
        if key in out:
            raise ValueError(f"{what} has query id {key!r} twice (as str and as another type)")
        out[key] = docs
    return out


def _natural_key(qid: str) -> tuple[int, int | str]:
    """Sort numeric qids numerically, others after them lexically."""
    return (0, int(qid)) if qid.isdigit() else (1, qid)


def evaluate_run(
    run: Run, qrels: Qrels, score_decimals: int | None = SCORE_DECIMALS
) -> tuple[dict[str, float], pd.DataFrame]:
    """Evaluate ``run`` against ``qrels`` with the conventions of this module.

    Returns ``(means, per_query)``. ``means`` maps each name of :data:`MEASURES` to its mean over
    all judged queries, plus ``"num_queries"``: the number of judged queries (an int).
    ``per_query`` has a ``qid`` column (str, natural order) and one float column per measure,
    one row per judged query (queries missing from the run score 0).
    ``score_decimals`` is the run-file score precision that defines ties (see module docs).
    """
    judged = {
        qid: {str(docid): int(grade) for docid, grade in docs.items()}
        for qid, docs in _str_keys(qrels, "qrels").items()
        if len(docs) > 0
    }
    if not judged:
        raise ValueError("qrels contain no judged query")
    # Only judged queries with at least one document reach trec_eval; the others keep the
    # 0 they start with (trec_eval -c).
    run_judged = {
        qid: {str(docid): score for docid, score in docs.items()}
        for qid, docs in _str_keys(run, "run").items()
        if qid in judged and len(docs) > 0
    }

    per_query = {qid: dict.fromkeys(MEASURES, 0.0) for qid in judged}
    if run_judged:
        truncated = {
            depth: _truncate(run_judged, depth, score_decimals)
            for depth in {spec[3] for spec in _TREC_EVAL_SPEC.values()}
        }
        for measure, (te_measure, te_key, level, depth) in _TREC_EVAL_SPEC.items():
            evaluator = pytrec_eval.RelevanceEvaluator(
                judged, {te_measure}, relevance_level=level
            )
            for qid, values in evaluator.evaluate(truncated[depth]).items():
                per_query[qid][measure] = float(values[te_key])

    qids = sorted(judged, key=_natural_key)
    frame = pd.DataFrame(
        {"qid": qids, **{m: [per_query[q][m] for q in qids] for m in MEASURES}}
    )
    means: dict[str, float] = {m: float(frame[m].mean()) for m in MEASURES}
    means["num_queries"] = len(qids)
    return means, frame


def check_fusable(candidates: pd.DataFrame, source: str = "the candidates") -> None:
    """Score interpolation needs a finite first-stage score on every candidate: a missing one
    would be scaled to 0 and the fused row would silently be the model's ranking."""
    first = pd.to_numeric(candidates["first_stage_score"], errors="coerce").astype("float64")
    bad = ~np.isfinite(first.to_numpy())
    if bad.any():
        qids = list(dict.fromkeys(candidates["qid"].to_numpy()[bad]))[:3]
        raise ValueError(f"{source}: {int(bad.sum())} candidates without a finite first_stage_score "
                         f"(qids e.g. {qids}): --interpolate needs the first stage's scores")


def interpolate(candidates: pd.DataFrame, scores, weight: float) -> pd.Series:
    """Per-query score interpolation with the first stage, the usual BM25 fusion:
    ``weight * minmax(model) + (1 - weight) * minmax(first_stage_score)``, each min-max scaled
    to [0, 1] within the query's candidates (a query whose scores are all equal gets 0)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {weight}")
    check_fusable(candidates)
    frame = pd.DataFrame({"qid": candidates["qid"].to_numpy(),
                          "model": pd.Series(scores, dtype="float64").to_numpy(),
                          "first": candidates["first_stage_score"].astype("float64").to_numpy()})

    def minmax(column: str) -> pd.Series:
        groups = frame.groupby("qid", sort=False)[column]
        low, high = groups.transform("min"), groups.transform("max")
        return ((frame[column] - low) / (high - low).where(high > low)).fillna(0.0)
    fused = weight * minmax("model") + (1 - weight) * minmax("first")
    return pd.Series(fused.to_numpy(), index=candidates.index)


def read_trec_run(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TREC run (``qid Q0 docid rank score tag``, plain or .gz), in file order.

    Returns columns ``qid`` (str), ``docid`` (str), ``rank`` (int32), ``score`` (float64).
    A line without six fields or with a non-numeric rank/score raises ``DataError``
    with its line number."""
    qids, docids, ranks, scores = [], [], [], []
    for line_number, line in _iter_lines(path):
        fields = line.split()
        try:
            if len(fields) != 6:
                raise ValueError(f"expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}")
            rank, score = int(fields[3]), float(fields[4])
        except ValueError as e:
            raise DataError(f"{path}: line {line_number}: malformed run line ({e}): {line!r}") from e
        qids.append(fields[0])
        docids.append(fields[2])
        ranks.append(rank)
        scores.append(score)
    return pd.DataFrame({
        "qid": pd.array(qids, dtype="str"),
        "docid": pd.array(docids, dtype="str"),
        "rank": np.array(ranks, dtype=np.int32),
        "score": np.array(scores, dtype=np.float64),
    })


def write_trec_run(
    run: Run, path: str | os.PathLike, tag: str, score_decimals: int | None = SCORE_DECIMALS
) -> Path:
    """Write ``run`` as a TREC run file ``qid Q0 docid rank score tag``, atomically.

    Queries in natural qid order; documents in trec_eval's order (:func:`ranked`), ranks from 1;
    scores printed with ``score_decimals`` decimals (``None``: exact float64 ``repr``), so
    trec_eval on the file sees the ties :func:`evaluate_run` saw. Returns the path written.
    """
    if not tag or any(ch.isspace() for ch in tag):
        raise ValueError(f"run tag must be a non-empty word without whitespace, got {tag!r}")
    by_qid = _str_keys(run, "run")
    lines = []
    for qid in sorted(by_qid, key=_natural_key):
        for rank, (docid, score) in enumerate(ranked(by_qid[qid], score_decimals), start=1):
            lines.append(f"{qid} Q0 {docid} {rank} {score_text(score, score_decimals)} {tag}\n")
    return atomic_write_text(path, "".join(lines))
