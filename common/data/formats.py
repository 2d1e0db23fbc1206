"""Data formats of the pipeline: readers, the candidates schema, triples.

Everything that crosses a file boundary goes through this module:

* candidate lists: the shared JSON form (``read_candidates_json``), TREC run files
  (``read_trec_run``) hydrated with query and passage text (``hydrate_run``), and the
  candidates parquet written by ``01`` (``write_candidates`` / ``read_candidates``);
* passage text: the MS MARCO v2 corpus addressed by byte offset (``MsMarcoV2Corpus``) and
  the MS MARCO v1 ``collection.tsv`` (``TsvCollection``);
* judgements and queries: ``read_qrels``, ``read_queries_tsv``;
* training triples: ``build_triples_from_qrels``, ``write_triples_tsv`` and the streaming
  reader ``TriplesStream`` with exact skip (resume) and DDP sharding.

Bad input never passes silently: every reader raises ``DataError`` naming the file and the
line (or entry / field), with counts and a few examples. Every writer writes to a temporary
file in the destination directory and renames it into place (``common.io.atomic_output``),
so a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from common.io import atomic_output  # noqa: F401 (also imported from here)

CANDIDATE_COLUMNS = ["qid", "query", "docid", "rank", "first_stage_score", "passage"]
"""Columns of a candidates DataFrame, in order. qid/query/docid/passage are str, rank is
int32 (1-based), first_stage_score is float32; rows are ordered by query (order of first
appearance) then rank. Extra columns (e.g. re-ranker scores) may follow and are kept."""

RUN_COLUMNS = ["qid", "docid", "rank", "score"]
"""Columns returned by ``read_trec_run`` and expected by ``hydrate_run``."""

_MAX_EXAMPLES = 5


class DataError(ValueError):
    """Bad input data. The message names the file, the line or field, counts and examples."""


# --------------------------------------------------------------------------- helpers


def _examples(items: Iterable[object]) -> str:
    """Format up to ``_MAX_EXAMPLES`` items, saying how many were left out."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:_MAX_EXAMPLES])
    rest = len(items) - _MAX_EXAMPLES
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def _is_gzip(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gz")


def open_text(path: str | os.PathLike, mode: str = "rt", newline: str | None = None):
    """Open a UTF-8 text file, transparently gzip-compressed when the name ends in .gz."""
    if _is_gzip(path):
        return gzip.open(path, mode, encoding="utf-8", newline=newline)
    return open(path, mode.replace("t", ""), encoding="utf-8", newline=newline)


def decoded_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a plain or .gz UTF-8 file, line endings kept, each decoded on its own so
    that undecodable bytes are reported at their own line; a corrupt or truncated gzip stream
    becomes ``DataError`` naming the last line read."""
    line_number = 0
    try:
        with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {line_number}: not UTF-8 ({e.reason} at byte "
                                    f"{e.start} of the line)") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path}: no such file") from None
        raise DataError(f"{path}: cannot read after line {line_number}: {e}") from e


def _iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, line ending removed) of a plain or .gz file
    (:func:`decoded_lines`)."""
    for line_number, line in enumerate(decoded_lines(path), start=1):
        yield line_number, line.rstrip("\r\n")


def _order_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Order rows by query (first appearance) then rank, stably; reset the index."""
    query_order = pd.factorize(df["qid"])[0]
    order = np.lexsort((df["rank"].to_numpy(), query_order))
    return df.iloc[order].reset_index(drop=True)


def _with_candidate_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with the candidate columns first, in their schema dtypes."""
    extra = [c for c in df.columns if c not in CANDIDATE_COLUMNS]
    out = df[CANDIDATE_COLUMNS + extra].copy()
    for column in ("qid", "query", "docid", "passage"):
        out[column] = out[column].astype("str")
    out["rank"] = out["rank"].astype("int32")
    out["first_stage_score"] = out["first_stage_score"].astype("float32")
    return out


def _require_columns(df: pd.DataFrame, columns: Iterable[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {list(df.columns)}"
        )


# ------------------------------------------------------------------- candidate lists


def read_candidates_json(path: str | os.PathLike) -> pd.DataFrame:
    """Read a shared JSON candidate list into a validated candidates DataFrame.

    The file is a JSON list of ``{"query": str, "hits": [{"qid": int, "docid": str,
    "rank": int, "score": float, "content": str}, ...]}``; qids are converted to str.
    A missing or mistyped field raises ``DataError`` naming the entry, hit and field."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of queries, got {type(entries).__name__}")

    hit_fields = {"qid": (int, str), "docid": str, "rank": int, "score": (int, float),
                  "content": str}
    rows = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("query"), str) \
                or not isinstance(entry.get("hits"), list):
            raise DataError(f"{where}: expected {{'query': str, 'hits': list}}")
        for j, hit in enumerate(entry["hits"]):
            if not isinstance(hit, dict):
                raise DataError(f"{where}, hit {j}: expected an object")
            for field, types in hit_fields.items():
                value = hit.get(field)
                if not isinstance(value, types) or isinstance(value, bool):
                    raise DataError(
                        f"{where}, hit {j}: field {field!r} missing or of the wrong type "
                        f"({value!r})"
                    )
            qid = str(hit["qid"])
            if j > 0 and rows[-1][0] != qid:
                raise DataError(
                    f"{where}, hit {j}: qid {qid!r} differs from the entry's qid {rows[-1][0]!r}"
                )
            rows.append((qid, entry["query"], hit["docid"], hit["rank"], hit["score"],
                         hit["content"]))
    df = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    df = _with_candidate_dtypes(_order_rows(df))
    validate_candidates(df, source=str(path))
    return df


def read_queries_tsv(path: str | os.PathLike) -> dict[str, str]:
    """Read ``qid<TAB>query`` lines (plain or .gz) into ``{qid: query}``.

    The query text is kept as written (only the line ending is removed). A line without
    exactly two fields, with an empty qid or query, or repeating a qid raises ``DataError``
    with its line number."""
    queries: dict[str, str] = {}
    for line_number, line in _iter_lines(path):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(
                f"{path}: line {line_number}: expected 'qid<TAB>query' with both non-empty: {line!r}"
            )
        qid = fields[0].strip()
        if qid in queries:
            raise DataError(f"{path}: line {line_number}: duplicate qid {qid!r}")
        queries[qid] = fields[1]
    return queries


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Read TREC qrels (``qid 0 docid grade``, plain or .gz) into ``{qid: {docid: grade}}``.

    A line without four fields, with a non-integer grade, or judging the same
    (qid, docid) twice raises ``DataError`` with its line number."""
    qrels: dict[str, dict[str, int]] = {}
    for line_number, line in _iter_lines(path):
        fields = line.split()
        try:
            if len(fields) != 4:
                raise ValueError(f"expected 4 fields 'qid 0 docid grade', got {len(fields)}")
            grade = int(fields[3])
        except ValueError as e:
            raise DataError(f"{path}: line {line_number}: malformed qrels line ({e}): {line!r}") from e
        judged = qrels.setdefault(fields[0], {})
        if fields[2] in judged:
            raise DataError(
                f"{path}: line {line_number}: (qid {fields[0]!r}, docid {fields[2]!r}) judged twice"
            )
        judged[fields[2]] = grade
    return qrels


# -------------------------------------------------------------------------- corpora


class MsMarcoV2Corpus:
    """MS MARCO v2 passages read by byte offset.

    ``root`` holds the shards ``msmarco_passage_XX.gz`` (gzip files of JSON lines with
    ``pid``, ``passage``, ``spans``, ``docid``). A passage id ``msmarco_passage_XX_OFFSET``
    names shard XX and the byte offset of its line in the *uncompressed* shard, so ``get``
    reads at that offset instead of scanning. Like the official ir_datasets/pyserini
    tooling, each shard is decompressed once: an uncompressed ``root/msmarco_passage_XX``
    is used if it exists, otherwise the .gz is decompressed (atomically) into
    ``cache_dir`` (default ``root``) on first use. Open file handles are kept per shard and read with ``os.pread``;
    call ``close()`` or use the corpus as a context manager to release them.
    """

    _PID = re.compile(r"msmarco_passage_(\d{2})_(\d+)")

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root
        if not self.root.is_dir():
            raise DataError(f"{self.root}: MS MARCO v2 corpus directory does not exist")
        self._handles: dict[str, object] = {}

    def _shard_path(self, shard: str) -> Path:
        """Path of the uncompressed shard, decompressing the .gz into the cache if needed."""
        name = f"msmarco_passage_{shard}"
        for candidate in (self.root / name, self.cache_dir / name):
            if candidate.is_file():
                return candidate
        compressed = self.root / f"{name}.gz"
        if not compressed.is_file():
            raise DataError(f"{compressed}: shard not found (needed for passages of shard {shard})")
        target = self.cache_dir / name
        try:
            with atomic_output(target) as tmp, gzip.open(compressed, "rb") as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
        except (EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{compressed}: corrupt or truncated gzip shard: {e}") from e
        return target

    @staticmethod
    def _read_line(handle, offset: int, chunk: int = 1 << 16) -> bytes:
        """Read the line starting at byte ``offset`` with ``os.pread``, which leaves the
        shared file position alone (safe across threads and forked data-loader workers)."""
        parts = []
        while True:
            data = os.pread(handle.fileno(), chunk, offset)
            end = data.find(b"\n")
            if end >= 0 or not data:
                parts.append(data if end < 0 else data[: end + 1])
                return b"".join(parts)
            parts.append(data)
            offset += len(data)

    def get(self, pid: str) -> str:
        """Return the text of passage ``pid`` (``msmarco_passage_XX_OFFSET``)."""
        match = self._PID.fullmatch(pid)
        if match is None:
            raise DataError(f"{self.root}: {pid!r} is not an MS MARCO v2 passage id "
                            "(msmarco_passage_XX_OFFSET)")
        shard, offset = match.group(1), int(match.group(2))
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self._shard_path(shard), "rb")
        line = self._read_line(handle, offset)
        where = f"{handle.name}: byte offset {offset}"
        try:
            record = json.loads(line)
            found, passage = record["pid"], record["passage"]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise DataError(f"{where}: no JSON line with 'pid' and 'passage' for {pid!r} ({e!r})") from e
        if found != pid:
            raise DataError(f"{where}: line has pid {found!r}, expected {pid!r}")
        return passage

    def close(self) -> None:
        """Close the open shard files."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> MsMarcoV2Corpus:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TsvCollection:
    """MS MARCO v1 ``collection.tsv`` (``pid<TAB>passage``, plain or .gz) held in memory.

    With ``needed_ids`` only those passages are kept (one streaming pass over the file);
    otherwise all are loaded. Malformed lines and repeated pids raise ``DataError`` with
    the line number; ``get`` of an absent pid raises ``DataError`` naming the file."""

    def __init__(self, path: str | os.PathLike, needed_ids: Iterable[str] | None = None):
        self.path = Path(path)
        needed = None if needed_ids is None else {str(p) for p in needed_ids}
        self._passages: dict[str, str] = {}
        seen: set[str] = set()
        for line_number, line in _iter_lines(self.path):
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0]:
                raise DataError(f"{self.path}: line {line_number}: expected 'pid<TAB>passage': {line[:200]!r}")
            pid, passage = fields
            if pid in seen:
                raise DataError(f"{self.path}: line {line_number}: duplicate pid {pid!r}")
            seen.add(pid)
            if needed is None or pid in needed:
                self._passages[pid] = passage

    def get(self, pid: str) -> str:
        """Return the text of passage ``pid``."""
        try:
            return self._passages[pid]
        except KeyError:
            raise DataError(f"{self.path}: passage {pid!r} not found "
                            "(absent from the file or not in needed_ids)") from None

    def __contains__(self, pid: object) -> bool:
        return pid in self._passages

    def __len__(self) -> int:
        return len(self._passages)


# --------------------------------------------------------------- candidates parquet


def hydrate_run(run_df: pd.DataFrame, queries: Mapping[str, str], corpus, source: str) -> pd.DataFrame:
    """Attach query and passage text to a run; return a validated candidates DataFrame.

    ``corpus`` is anything with ``get(docid) -> str`` raising ``DataError`` when a passage
    is unavailable. Queries without text and passages the corpus cannot supply are
    collected and reported together (counts and examples) rather than dropped."""
    _require_columns(run_df, RUN_COLUMNS, source)
    run_qids = run_df["qid"].astype("str")
    missing_queries = sorted(set(run_qids) - set(queries))
    if missing_queries:
        raise DataError(
            f"{source}: {len(missing_queries)} of {run_qids.nunique()} run queries have no "
            f"query text, e.g. {_examples(missing_queries)}"
        )
    texts: dict[str, str] = {}
    failures: dict[str, str] = {}
    for docid in dict.fromkeys(run_df["docid"].astype("str")):
        try:
            texts[docid] = corpus.get(docid)
        except DataError as e:
            failures[docid] = str(e)
    if failures:
        first = next(iter(failures.values()))
        raise DataError(
            f"{source}: {len(failures)} of {len(failures) + len(texts)} passages unavailable, "
            f"e.g. {_examples(failures)}; first error: {first}"
        )
    df = pd.DataFrame({
        "qid": run_qids,
        "query": run_qids.map(queries),
        "docid": run_df["docid"].astype("str"),
        "rank": run_df["rank"],
        "first_stage_score": run_df["score"],
        "passage": run_df["docid"].astype("str").map(texts),
    })
    df = _with_candidate_dtypes(_order_rows(df))
    validate_candidates(df, source)
    return df


def validate_candidates(df: pd.DataFrame, source: str) -> None:
    """Raise ``DataError`` listing every problem of a candidates DataFrame.

    Checked: the schema columns exist; no duplicate (qid, docid); no missing or blank
    passage or query text; one query text per qid; ranks >= 1. Rows are never dropped."""
    _require_columns(df, CANDIDATE_COLUMNS, source)
    if not len(df):
        raise DataError(f"{source}: no candidates (an empty list): nothing to rank")
    problems = []

    duplicated = df.duplicated(["qid", "docid"], keep="first")
    if duplicated.any():
        pairs = list(zip(df.loc[duplicated, "qid"], df.loc[duplicated, "docid"]))
        problems.append(f"{len(pairs)} duplicate (qid, docid) rows, e.g. {_examples(pairs)}")

    for column in ("passage", "query"):
        text = df[column]
        blank = text.isna() | (text.astype("str").str.strip() == "")
        if blank.any():
            pairs = list(zip(df.loc[blank, "qid"], df.loc[blank, "docid"]))
            problems.append(
                f"{len(pairs)} rows with missing or empty {column!r}, (qid, docid) e.g. {_examples(pairs)}"
            )

    texts_per_qid = df.groupby("qid", sort=False)["query"].nunique()
    inconsistent = texts_per_qid[texts_per_qid > 1].index.tolist()
    if inconsistent:
        problems.append(
            f"{len(inconsistent)} qids with more than one query text, e.g. {_examples(inconsistent)}"
        )

    bad_rank = df["rank"].isna() | (df["rank"] < 1)
    if bad_rank.any():
        pairs = list(zip(df.loc[bad_rank, "qid"], df.loc[bad_rank, "docid"]))
        problems.append(f"{len(pairs)} rows with missing or rank < 1, e.g. {_examples(pairs)}")

    if problems:
        raise DataError(f"{source}: invalid candidates ({len(df)} rows): " + "; ".join(problems))


def write_candidates(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Validate and atomically write a candidates DataFrame as zstd parquet.

    The schema columns come first in their schema dtypes; extra columns are kept."""
    validate_candidates(df, source=str(path))
    table = _with_candidate_dtypes(df)
    with atomic_output(path) as tmp:
        table.to_parquet(tmp, compression="zstd", index=False)


def read_candidates(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a candidates parquet written by ``write_candidates``."""
    df = pd.read_parquet(path)
    _require_columns(df, CANDIDATE_COLUMNS, str(path))
    df = _with_candidate_dtypes(df)
    validate_candidates(df, source=str(path))
    return df


def candidates_to_run(df: pd.DataFrame, score_column: str = "first_stage_score"
                      ) -> dict[str, dict[str, float]]:
    """Turn candidates (or any frame with qid, docid and a score column) into
    ``{qid: {docid: score}}``, the form pytrec_eval takes.

    Duplicate (qid, docid) pairs and missing scores raise ``DataError``."""
    _require_columns(df, ["qid", "docid", score_column], f"candidates_to_run({score_column!r})")
    duplicated = df.duplicated(["qid", "docid"])
    if duplicated.any():
        pairs = list(zip(df.loc[duplicated, "qid"], df.loc[duplicated, "docid"]))
        raise DataError(f"candidates_to_run: {len(pairs)} duplicate (qid, docid), e.g. {_examples(pairs)}")
    missing = df[score_column].isna()
    if missing.any():
        pairs = list(zip(df.loc[missing, "qid"], df.loc[missing, "docid"]))
        raise DataError(
            f"candidates_to_run: {len(pairs)} rows without {score_column!r}, e.g. {_examples(pairs)}"
        )
    run: dict[str, dict[str, float]] = {}
    for qid, docid, score in zip(df["qid"].astype("str"), df["docid"].astype("str"),
                                 df[score_column].astype("float64")):
        run.setdefault(qid, {})[docid] = float(score)
    return run


# -------------------------------------------------------------------------- triples


def build_triples_from_qrels(
    candidates: pd.DataFrame,
    qrels: Mapping[str, Mapping[str, int]],
    seed: int,
    min_positive_grade: int = 2,
    negatives_per_positive: int = 4,
    include_unjudged: bool = False,
) -> list[tuple[str, str, str]]:
    """Build ``(query, positive passage, negative passage)`` training triples.

    For each query of ``candidates`` that has qrels (in sorted qid order):

    * positives: judged passages with grade >= ``min_positive_grade`` whose text is in
      ``candidates``;
    * negatives: judged grade-0 passages with text, plus the unjudged candidates when
      ``include_unjudged``;
    * passages graded between 1 and ``min_positive_grade - 1`` (grade 1 by default,
      "related") are neither positive nor negative;
    * each positive (sorted by docid) gets ``negatives_per_positive`` distinct negatives
      sampled without replacement (all of them when fewer are available).

    ``candidates`` may concatenate several lists for the same topics (e.g. bm25 and
    bm25_rm3): passages are deduplicated by docid, and a docid with two different texts
    raises ``DataError``. Sampling uses ``random.Random(seed)`` and the final list is
    shuffled with the same generator, so the result is a function of the inputs and seed.
    """
    if min_positive_grade < 1:
        raise ValueError(f"min_positive_grade must be >= 1 (grade 0 is negative), got {min_positive_grade}")
    if negatives_per_positive < 1:
        raise ValueError(f"negatives_per_positive must be >= 1, got {negatives_per_positive}")
    _require_columns(candidates, ["qid", "query", "docid", "passage"], "build_triples_from_qrels")

    query_text: dict[str, str] = {}
    passages: dict[str, dict[str, str]] = {}
    conflicts = []
    for qid, query, docid, passage in zip(candidates["qid"].astype("str"), candidates["query"],
                                          candidates["docid"].astype("str"), candidates["passage"]):
        query_text.setdefault(qid, query)
        texts = passages.setdefault(qid, {})
        if texts.setdefault(docid, passage) != passage:
            conflicts.append((qid, docid))
    if conflicts:
        raise DataError(
            f"build_triples_from_qrels: {len(conflicts)} (qid, docid) with two different "
            f"passage texts in the candidates, e.g. {_examples(conflicts)}"
        )

    rng = random.Random(seed)
    triples: list[tuple[str, str, str]] = []
    for qid in sorted(set(passages) & set(qrels)):
        texts, judged = passages[qid], qrels[qid]
        positives = sorted(d for d, g in judged.items() if g >= min_positive_grade and d in texts)
        negatives = sorted(d for d, g in judged.items() if g == 0 and d in texts)
        if include_unjudged:
            negatives = sorted(negatives + [d for d in texts if d not in judged])
        for positive in positives:
            for negative in rng.sample(negatives, min(negatives_per_positive, len(negatives))):
                triples.append((query_text[qid], texts[positive], texts[negative]))
    rng.shuffle(triples)
    return triples


_TSV_UNSAFE = re.compile(r"[\t\n\r]")


def write_triples_tsv(triples: Iterable[tuple[str, ...]], path: str | os.PathLike,
                      passages: int = 2) -> int:
    """Atomically write triples as ``query<TAB>positive<TAB>negative`` lines (MS MARCO
    ``triples.train.small.tsv`` form; gzip-compressed when ``path`` ends in .gz).

    Tabs, newlines and carriage returns inside a text are replaced by a space so that
    every triple is exactly one line of three fields. A triple that is not three
    non-empty texts raises ``DataError`` (nothing is written). With ``passages=n > 2`` the rows
    are listwise groups, a query and n passages (see ``TriplesStream``). Returns the row count."""
    count = 0
    opener = gzip.open if _is_gzip(path) else open  # chosen by the final name, not the temp one
    with atomic_output(path) as tmp:
        with opener(tmp, "wt", encoding="utf-8", newline="\n") as f:
            for i, triple in enumerate(triples):
                fields = [_TSV_UNSAFE.sub(" ", t) if isinstance(t, str) else t for t in triple]
                if len(fields) != passages + 1 or not all(isinstance(t, str) and t.strip() for t in fields):
                    raise DataError(f"{path}: row {i} is not {passages + 1} non-empty texts "
                                    f"(a query and {passages} passages): {triple!r:.200}")
                f.write("\t".join(fields) + "\n")
                count += 1
            if not count:
                raise DataError(f"{path}: no rows to write (an empty list): nothing written")
    return count


class TriplesStream:
    """Stream ``(query, positive, negative)`` from a triples TSV (plain or .gz), or, with
    ``passages=n > 2``, listwise groups ``(query, passage_1, ..., passage_n)``.

    The file is read line by line with the csv module (tab-delimited, no quoting), never
    loaded whole. ``skip_triples`` skips that many triples from the start of the file (a
    global count, for exact resume). After the skip, triple ``i`` goes to rank
    ``i % world_size``, so ``world_size`` streams partition the remainder without overlap
    or loss. A line that is not exactly ``1 + passages`` non-empty fields raises ``DataError`` with
    the file and line number (on every rank, skipped lines included). When the file is
    exhausted the iteration simply ends. ``line_number`` is the last line read.
    Each ``iter()`` restarts from the beginning of the file."""

    def __init__(self, path: str | os.PathLike, skip_triples: int = 0, rank: int = 0,
                 world_size: int = 1, passages: int = 2):
        if passages < 2:
            raise ValueError(f"a training row needs at least 2 passages, got {passages}")
        if skip_triples < 0:
            raise ValueError(f"skip_triples must be >= 0, got {skip_triples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.path = Path(path)
        self.skip_triples = skip_triples
        self.rank = rank
        self.world_size = world_size
        self.passages = passages
        self.line_number = 0

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        self.line_number = 0
        reader = csv.reader(decoded_lines(self.path), delimiter="\t", quoting=csv.QUOTE_NONE)
        names = (["query", "positive", "negative"] if self.passages == 2
                 else ["query"] + [f"passage {i + 1}" for i in range(self.passages)])
        index = 0
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:
                raise DataError(f"{self.path}: line {reader.line_num}: {e}") from e
            if row is None:
                return
            self.line_number = reader.line_num
            if len(row) != self.passages + 1:
                raise DataError(
                    f"{self.path}: line {self.line_number}: expected {self.passages + 1} non-empty "
                    f"tab-separated fields ({', '.join(names)}), got {len(row)} fields")
            empty = [names[i] for i, field in enumerate(row) if not field.strip()]
            if empty:
                raise DataError(f"{self.path}: line {self.line_number}: empty field: "
                                f"{', '.join(empty)}")
            if index >= self.skip_triples and (index - self.skip_triples) % self.world_size == self.rank:
                yield tuple(row)
            index += 1


LENGTH_WINDOW_BATCHES = 32  # --group_by_length: batches per window of rows sorted by length


def row_length(row: tuple[str, ...]) -> int:
    """Characters of a training row's longest pair (query + its longest passage): every pair of
    a row goes into the same batch, so the longest sets how far the others are padded."""
    return len(row[0]) + max(len(p) for p in row[1:])


class TrainingBatches:
    """The global training batches of a stage: lists of ``(row index, row)`` of
    ``rows_per_batch`` rows from a triples/groups file, starting at row ``start_row`` (the
    stage's first) and skipping ``skip_batches`` batches (exact resume).

    In file order by default. With ``group_by_length`` the stage's rows are read in windows of
    ``LENGTH_WINDOW_BATCHES`` batches (window k: rows ``start_row + k * window`` onwards); a
    window's rows are sorted by length (``row_length``: characters of the query and its longest
    passage; ties in file order), cut into batches of similar length (little padding), and the batches taken in an
    order shuffled by a generator seeded with (seed, k). So the order is a function of the
    file, the stage's first row, the batch size and the seed alone: a resumed stage recomputes
    the window it stopped in and skips the batches already trained. Every row of a window is
    trained once the window is done; a stage that ends inside a window leaves some of its rows
    untrained (the next stage starts after the rows counted, as in file order).

    At the end of the file the last batch may be short (the caller raises); ``rows_read`` is
    the number of rows read from the file's start."""

    def __init__(self, path: str | os.PathLike, *, start_row: int, rows_per_batch: int, passages: int = 2,
                 group_by_length: bool = False, seed: int = 0, skip_batches: int = 0):
        if rows_per_batch < 1 or start_row < 0 or skip_batches < 0:
            raise ValueError("need rows_per_batch >= 1, start_row >= 0, skip_batches >= 0")
        self.path, self.start_row, self.rows_per_batch = path, start_row, rows_per_batch
        self.passages, self.group_by_length, self.seed = passages, group_by_length, seed
        self.skip_batches = skip_batches
        self.rows_read = start_row

    def __iter__(self) -> Iterator[list[tuple[int, tuple[str, ...]]]]:
        rows = enumerate(TriplesStream(self.path, skip_triples=self.start_row, passages=self.passages),
                         start=self.start_row)
        size = self.rows_per_batch
        if not self.group_by_length:
            skip = self.skip_batches * size
            for _ in range(skip):
                if next(rows, None) is None:
                    return
            self.rows_read = self.start_row + skip
            while True:
                batch = list(itertools.islice(rows, size))
                self.rows_read += len(batch)
                if not batch:
                    return
                yield batch
                if len(batch) < size:
                    return
        window = size * LENGTH_WINDOW_BATCHES
        first, offset = divmod(self.skip_batches, LENGTH_WINDOW_BATCHES)
        for _ in range(first * window):
            if next(rows, None) is None:
                return
        self.rows_read = self.start_row + first * window
        k = first
        while True:
            block = list(itertools.islice(rows, window))
            self.rows_read += len(block)
            if not block:
                return
            batches = self.window_batches(block, k)
            yield from batches[offset:]
            offset = 0
            if len(block) < window:
                return
            k += 1

    def stage_rows(self, batches: int) -> Iterator[tuple[str, ...]]:
        """Every row a stage of ``batches`` batches from ``start_row`` reads (with
        ``group_by_length``: whole windows), in file order; the same for a resumed stage."""
        if self.group_by_length:
            batches = -(-batches // LENGTH_WINDOW_BATCHES) * LENGTH_WINDOW_BATCHES
        return itertools.islice(TriplesStream(self.path, skip_triples=self.start_row, passages=self.passages),
                                batches * self.rows_per_batch)

    def window_batches(self, block: list[tuple[int, tuple[str, ...]]], k: int) -> list[list]:
        """Window ``k``'s batches: by length, in a seeded order; a short last batch (the file
        ended) comes last."""
        ordered = sorted(block, key=lambda item: (row_length(item[1]), item[0]))
        size = self.rows_per_batch
        full = [ordered[i:i + size] for i in range(0, len(ordered) - size + 1, size)]
        rest = ordered[len(full) * size:]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return shuffled + ([rest] if rest else [])


def teacher_columns(group_size: int) -> list[str]:
    """Teacher-score columns of a training row of ``group_size`` passages, in file order."""
    return ["teacher_pos", "teacher_neg"] if group_size == 2 else [f"teacher_{i}" for i in range(group_size)]


def read_teacher_scores(path: str | os.PathLike, group_size: int = 2):
    """Teacher scores aligned with a training file, as a float32 tensor ``(rows, group_size)``:
    columns ``teacher_pos, teacher_neg`` for triples, ``teacher_0 .. teacher_{n-1}`` for
    listwise groups of n passages (row i scores line i's passages in order). Missing columns
    or non-finite scores raise ``DataError`` naming the file and the first bad row."""
    columns = teacher_columns(group_size)
    try:
        present = pq.read_schema(path).names
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read teacher scores: {e}") from e
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{path}: teacher scores for rows of {group_size} passages need columns "
                        f"{columns}; missing {missing} (has {present})")
    values = pd.read_parquet(path, columns=columns).to_numpy(dtype="float32")
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: row {int(np.argmax(bad))}: non-finite teacher score "
                        f"({int(bad.sum())} such rows)")
    return torch.from_numpy(values.copy())


def check_disjoint(train_qids: Iterable, eval_qids: Iterable, what: str) -> None:
    """Raise ``DataError`` if any qid (compared as str) is in both sets, e.g. training
    topics that leak into evaluation topics; ``what`` names the two sets in the message."""
    overlap = sorted({str(q) for q in train_qids} & {str(q) for q in eval_qids})
    if overlap:
        raise DataError(f"{what}: {len(overlap)} qids in both sets, e.g. {_examples(overlap)}")
