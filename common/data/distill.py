"""Training data for distilling a bi-encoder teacher into a cross-encoder.

As the BGE-M3 fine-tuning recipes build theirs: retrieve candidates with BM25, score every
(query, candidate) with a teacher, sample passage pairs spanning the whole ranking, and keep
the teacher's scores for each pair (for a margin-MSE / KL distillation loss).

``build_distillation_set(queries, collection, out_dir, ...)`` writes to ``out_dir``:

* ``collection.jsonl``: the collection as Anserini JSONL (``{"id", "contents"}``);
* ``index/`` (unless ``index_dir`` is given): the BM25 index, with a sidecar
  ``index.fingerprint.json`` (sha256 of the collection) so a rebuild reuses a matching index;
* ``candidates.parquet``: BM25 top-k per query in the candidates schema of
  ``common.data.formats`` plus ``teacher_score`` (float32 cosine of the teacher's embeddings);
* ``triples.tsv``: ``query<TAB>passage_a<TAB>passage_b`` where the teacher scores
  passage_a at least as high as passage_b;
* ``teacher_scores.parquet``: ``teacher_pos``, ``teacher_neg`` (float32); row i is triple i;
* ``pairs.parquet``: provenance of triple i (``qid``, ``docid_pos``, ``docid_neg``, their
  BM25 ranks and teacher ranks);
* ``stats.json``: counts and timings.

Every file is written to a temporary name and renamed into place.

Pair sampling (per query with n >= 2 candidates, candidates ordered by teacher score):
half of the pairs (``pairs_per_query // 2``) take the first passage uniformly from the
teacher's top ``TOP_TEACHER`` (10) and the second uniformly from the rest of the top-k; the
others take two distinct passages uniformly from the whole top-k. So the pairs span the
ranking (a probe that only used the teacher's top 30 did poorly). Each pair is ordered so its
first passage has the higher teacher score. Pairs are distinct within a query and never pair
two identical texts. A query's pairs depend only on ``(seed, qid)`` and its candidates; the
final list is shuffled with ``random.Random(seed)``.

Teacher fusion (``fusion_weight`` w): the teacher score becomes
``w * minmax(cosine) + (1 - w) * minmax(BM25)`` within each query's candidates
(``common.data.trec.interpolate``, the same interpolation ``05_eval_trec.py --interpolate``
measures); the cosine stays in ``teacher_cosine``. ``fuse_distillation_set`` re-derives a
fused set from an existing one's ``candidates.parquet`` without re-encoding anything.
``build_listwise_groups`` derives listwise groups (query + n passages) the same way.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common.kinds import BiKind
from common.models.encoders import encode, load_encoder
from common.data.formats import (DataError, TriplesStream, read_candidates_json, read_qrels,
                         read_queries_tsv, write_candidates, write_triples_tsv)
from common.data.trec import interpolate
from common.data.first_stage import bm25_search, build_bm25_index
from common.io import atomic_output, atomic_write_text, refuse_existing
from common.serving.rank import AUTO, Ranker, resolve_backend


def _examples(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return f"{shown} (and {len(items) - limit} more)" if len(items) > limit else shown


TOP_TEACHER = 10
"""The first passage of a "head" pair comes from the teacher's top TOP_TEACHER."""
DEFAULT_SHARED = "../shared/data/trec-dl"  # relative to the repository, as every default path
_MAX_TRIES = 50


# ------------------------------------------------------------------------ sources


def _json_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(f"{directory}: no *.json candidate lists")
    return files


def embedded_default_sources(shared: str = DEFAULT_SHARED
                             ) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """The default distillation sources: ``(queries, collection, forbidden_qids)``.

    * queries: the MS MARCO dev-subset queries (``msmarco-dev-subset/queries.tsv``) plus the
      DL21 and DL22 topics (the queries of ``dl21/*.json`` and ``dl22/*.json``);
    * collection: the distinct passages (id = docid) of the DL21 and DL22 candidate lists;
    * forbidden_qids: the DL20 topics (queries of ``dl20/*.json`` and judged qids of
      ``dl20/qrels.txt``), the evaluation set, which must never be trained on.

    A qid with two different query texts, or a docid with two different passage texts,
    raises ``DataError``. DL20 is never read for queries or passages."""
    root = Path(shared)
    queries = dict(read_queries_tsv(root / "msmarco-dev-subset" / "queries.tsv"))
    collection: dict[str, str] = {}
    conflicts_q, conflicts_p = [], []
    for year in ("dl21", "dl22"):
        for path in _json_files(root / year):
            df = read_candidates_json(path)
            for qid, query in df.drop_duplicates("qid")[["qid", "query"]].itertuples(index=False):
                if queries.setdefault(qid, query) != query:
                    conflicts_q.append((str(path), qid))
            for docid, passage in zip(df["docid"], df["passage"]):
                if collection.setdefault(docid, passage) != passage:
                    conflicts_p.append((str(path), docid))
    if conflicts_q or conflicts_p:
        raise DataError(f"{root}: {len(conflicts_q)} qids with two query texts "
                        f"(e.g. {_examples(conflicts_q)}), {len(conflicts_p)} docids with two "
                        f"passage texts (e.g. {_examples(conflicts_p)})")
    forbidden: set[str] = set()
    dl20 = root / "dl20"
    for path in _json_files(dl20):
        forbidden.update(read_candidates_json(path)["qid"].unique())
    qrels = dl20 / "qrels.txt"
    if qrels.is_file():
        with open(qrels, encoding="utf-8") as f:
            forbidden.update(line.split()[0] for line in f if line.strip())
    return queries, collection, forbidden


def write_holdout(shared: str, n: int, out_dir) -> list[str]:
    """Hold ``n`` DL21 topics out of training, for monitoring: the first ``n`` judged qids of
    ``dl21/bm25.json`` (in its order) go to ``out_dir/holdout.candidates.parquet`` (their BM25
    lists) and ``out_dir/holdout.qrels.txt``; returns them, for the caller to drop from the
    training queries."""
    root = Path(shared) / "dl21"
    qrels_path = root / "qrels.txt"
    with open(qrels_path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    judged = {line.split()[0] for line in lines}
    cands = read_candidates_json(root / "bm25.json")
    chosen = [q for q in cands["qid"].unique() if q in judged][:n]
    if len(chosen) < n:
        raise DataError(f"{qrels_path}: only {len(chosen)} judged topics, --holdout {n} asked")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_candidates(cands[cands["qid"].isin(set(chosen))].reset_index(drop=True),
                     out / "holdout.candidates.parquet")
    keep = set(chosen)
    atomic_write_text(out / "holdout.qrels.txt", "".join(line for line in lines if line.split()[0] in keep))
    return chosen


# ------------------------------------------------------------------------ helpers


def _write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_collection_jsonl(collection: Mapping[str, str], path: Path) -> tuple[int, str]:
    """Write ``{"id", "contents"}`` lines atomically; return (count, sha256 of the file)."""
    digest = hashlib.sha256()
    n = 0
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for docid, text in collection.items():
                line = json.dumps({"id": str(docid), "contents": str(text)}, ensure_ascii=False) + "\n"
                f.write(line)
                digest.update(line.encode("utf-8"))
                n += 1
    return n, digest.hexdigest()


def sample_pairs(n: int, pairs: int, rng: random.Random, texts: list[str] | None = None,
                 top: int = TOP_TEACHER) -> list[tuple[int, int]]:
    """Sample up to ``pairs`` distinct pairs of positions in a teacher ranking of length n.

    Positions are 0-based teacher ranks (0 = the teacher's best). The first
    ``pairs // 2`` pairs are "head" pairs (one position < ``top``, the other >= ``top``,
    or any other position when n <= top); the rest are uniform pairs of distinct
    positions. Each pair is returned as (higher-ranked, lower-ranked), i.e. (i, j) with
    i < j. Pairs already drawn, and pairs of identical ``texts``, are redrawn (at most
    ``_MAX_TRIES`` times, then the pair is dropped), so fewer than ``pairs`` may come back
    for a short list."""
    if n < 2 or pairs <= 0:
        return []
    pairs = min(pairs, n * (n - 1) // 2)
    n_head = pairs // 2
    head_top = min(top, n)
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for p in range(pairs):
        for _ in range(_MAX_TRIES):
            if p < n_head and head_top < n:
                a, b = rng.randrange(head_top), rng.randrange(head_top, n)
            else:  # uniform pair (also a head pair when the whole list is the head)
                a, b = rng.sample(range(n), 2)
            pair = (min(a, b), max(a, b))
            if pair in seen or (texts is not None and texts[pair[0]] == texts[pair[1]]):
                continue
            seen.add(pair)
            chosen.append(pair)
            break
    return chosen


# ------------------------------------------------------------------------- builder


def build_distillation_set(queries: Mapping[str, str], collection: Mapping[str, str], out_dir, *,
                           index_dir=None, k: int = 100, pairs_per_query: int = 16,
                           seed: int = 42, teacher: str = "all-MiniLM-L6-v2",
                           teacher_max_length: int = 256, forbidden_qids: Iterable = (),
                           progress: bool = True, threads: int = 2,
                           teacher_batch_size: int = 64, fusion_weight: float | None = None,
                           teacher_backend: str = AUTO) -> dict:
    """Build BM25 candidates, teacher scores and teacher-ordered passage pairs (see module doc).

    ``teacher_backend``: a ``common.serving.rank`` backend; ``auto`` (the default everywhere): for a
    teacher dir shipped by 04_reshape.py --onnx its fastest backend here (``resolve_backend``),
    else torch fp32 (the packaged encoder: the study's sets, on every host).

    ``queries`` is ``{qid: text}``, ``collection`` ``{docid: passage}``. Any qid in
    ``forbidden_qids`` (the evaluation topics) raises ``DataError`` before anything is
    written. ``index_dir``: where the BM25 index lives (default ``out_dir/index``); an
    existing index is reused only if its sidecar fingerprint matches this collection,
    otherwise it is rebuilt. Queries with fewer than 2 BM25 hits are skipped and counted.
    Returns the stats also written to ``out_dir/stats.json``."""
    t_start = time.perf_counter()
    queries = {str(q): str(t) for q, t in queries.items()}
    collection = {str(d): str(t) for d, t in collection.items()}
    forbidden = {str(q) for q in forbidden_qids}
    leaked = sorted(set(queries) & forbidden)
    if leaked:
        raise DataError(f"build_distillation_set: {len(leaked)} of {len(queries)} queries are "
                        f"forbidden (evaluation topics): {_examples(leaked)}")
    if k < 2:
        raise ValueError(f"k must be >= 2 to form pairs, got {k}")
    if pairs_per_query < 1:
        raise ValueError(f"pairs_per_query must be >= 1, got {pairs_per_query}")
    blank_q = [q for q, t in queries.items() if not t.strip()]
    if blank_q:
        raise DataError(f"build_distillation_set: {len(blank_q)} blank queries, e.g. {_examples(blank_q)}")
    if not collection:
        raise DataError("build_distillation_set: empty collection")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = dict(teacher=teacher, teacher_max_length=teacher_max_length, k=k,
                       pairs_per_query=pairs_per_query, seed=seed, top_teacher=TOP_TEACHER,
                       queries_input=len(queries), passages_input=len(collection))

    # 1. collection + BM25 index
    t0 = time.perf_counter()
    n_written, fingerprint = _write_collection_jsonl(collection, out_dir / "collection.jsonl")
    index_dir = Path(index_dir) if index_dir is not None else out_dir / "index"
    sidecar = index_dir.parent / f"{index_dir.name}.fingerprint.json"
    reuse = False
    if index_dir.is_dir() and sidecar.is_file():
        try:
            reuse = json.loads(sidecar.read_text())["collection_sha256"] == fingerprint
        except (json.JSONDecodeError, KeyError):
            reuse = False
    if reuse:
        index_stats = {"reused": True}
    else:
        sidecar.unlink(missing_ok=True)
        index_stats = build_bm25_index(out_dir / "collection.jsonl", index_dir, threads=threads,
                                       overwrite=True)
        _write_json({"collection_sha256": fingerprint, "passages": n_written}, sidecar)
    stats["index"] = index_stats
    stats["seconds_index"] = round(time.perf_counter() - t0, 2)

    # 2. BM25 top-k
    t0 = time.perf_counter()
    cands = bm25_search(index_dir, queries, k=k, threads=threads)
    stats["seconds_search"] = round(time.perf_counter() - t0, 2)
    hits = cands.groupby("qid", sort=False).size()
    keep = set(hits[hits >= 2].index)
    stats["queries_skipped_few_hits"] = len(queries) - len(keep)
    cands = cands[cands["qid"].isin(keep)].reset_index(drop=True)
    if cands.empty:
        raise DataError("build_distillation_set: no query has 2 or more BM25 hits")
    unknown = set(cands["docid"]) - set(collection)
    if unknown:
        raise DataError(f"{index_dir}: index returns {len(unknown)} docids not in the collection "
                        f"(stale index?), e.g. {_examples(sorted(unknown))}")
    # the collection's text, not the index's stored copy (identical unless the index is stale)
    cands["passage"] = cands["docid"].map(collection)

    # 3. teacher scores: every distinct passage and query encoded once
    t0 = time.perf_counter()
    docids = list(dict.fromkeys(cands["docid"]))
    qids = list(dict.fromkeys(cands["qid"]))
    backend = resolve_backend(teacher, teacher_backend)
    stats["teacher_backend"] = backend
    p_texts, q_texts = [collection[d] for d in docids], [queries[q] for q in qids]
    if progress:
        print(f"[distill] encoding {len(docids)} passages and {len(qids)} queries "
              f"with {teacher} ({backend})", flush=True)
    if backend == "torch":  # the sets of record: sentence-transformers' own encoding path
        model, tokenizer, pooling = load_encoder(teacher)
        kw = dict(pooling=pooling, max_length=teacher_max_length, batch_size=teacher_batch_size,
                  progress=progress)
        p_emb, q_emb = encode(model, tokenizer, p_texts, **kw), encode(model, tokenizer, q_texts, **kw)
    else:
        ranker = Ranker.load(teacher, backend, max_length=teacher_max_length,
                             batch_size=teacher_batch_size, kind=BiKind.name, threads=threads)
        # cosine, as the torch path (a model without a Normalize module embeds unnormalised)
        p_emb = F.normalize(torch.from_numpy(ranker.encode(p_texts, progress, "passage")), dim=-1)
        q_emb = F.normalize(torch.from_numpy(ranker.encode(q_texts, progress, "query")), dim=-1)
    stats["seconds_encode"] = round(time.perf_counter() - t0, 2)
    stats["passages_encoded"] = len(docids)
    stats["queries_encoded"] = len(qids)
    d_index = pd.Index(docids).get_indexer(cands["docid"])
    q_index = pd.Index(qids).get_indexer(cands["qid"])
    scores = (q_emb[torch.as_tensor(q_index)] * p_emb[torch.as_tensor(d_index)]).sum(-1)
    cands["teacher_score"] = scores.numpy().astype(np.float32)

    if fusion_weight is not None:
        cands = fuse_teacher(cands, fusion_weight)
        stats["fusion_weight"] = fusion_weight
    write_candidates(cands, out_dir / "candidates.parquet")

    # 4. pairs spanning the ranking, ordered by teacher score
    stats.update(write_teacher_pairs(cands, out_dir, pairs_per_query=pairs_per_query, seed=seed))
    stats["seconds_total"] = round(time.perf_counter() - t_start, 2)
    _write_json(stats, out_dir / "stats.json")
    if progress:
        print(f"[distill] {stats['queries']} queries, {stats['pairs']} triples in "
              f"{stats['seconds_total']} s", flush=True)
    return stats


def fuse_teacher(cands: pd.DataFrame, weight: float) -> pd.DataFrame:
    """Candidates with ``teacher_score`` replaced by its interpolation with the BM25 score
    (module doc); the cosine moves to ``teacher_cosine``."""
    cosine = cands["teacher_cosine"] if "teacher_cosine" in cands else cands["teacher_score"]
    fused = interpolate(cands, cosine.to_numpy(), weight)
    return cands.assign(teacher_cosine=cosine.astype(np.float32),
                        teacher_score=fused.to_numpy().astype(np.float32))


def write_teacher_pairs(cands: pd.DataFrame, out_dir: Path, *, pairs_per_query: int,
                        seed: int) -> dict:
    """Sample pairs per query from its teacher ranking (module doc) and write ``triples.tsv``,
    ``teacher_scores.parquet`` and ``pairs.parquet``; returns their stats."""
    t0 = time.perf_counter()
    queries = dict(zip(cands["qid"], cands["query"]))
    triples: list[tuple[str, str, str]] = []
    rows: list[tuple] = []
    short = 0
    for qid, group in cands.groupby("qid", sort=False):
        # teacher ranking; ties broken by BM25 rank so it is deterministic
        order = np.lexsort((group["rank"].to_numpy(), -group["teacher_score"].to_numpy()))
        g = group.iloc[order]
        texts = g["passage"].tolist()
        rng = random.Random(f"{seed}:{qid}")
        chosen = sample_pairs(len(g), pairs_per_query, rng, texts)
        short += len(chosen) < pairs_per_query
        ids, ranks, ts = g["docid"].tolist(), g["rank"].tolist(), g["teacher_score"].tolist()
        query = queries[qid]
        for i, j in chosen:
            triples.append((query, texts[i], texts[j]))
            rows.append((qid, ids[i], ids[j], ranks[i], ranks[j], i + 1, j + 1, ts[i], ts[j]))
    order = list(range(len(triples)))
    random.Random(seed).shuffle(order)
    triples = [triples[i] for i in order]
    pairs = pd.DataFrame([rows[i] for i in order],
                         columns=["qid", "docid_pos", "docid_neg", "bm25_rank_pos",
                                  "bm25_rank_neg", "teacher_rank_pos", "teacher_rank_neg",
                                  "teacher_pos", "teacher_neg"])
    for c in ("bm25_rank_pos", "bm25_rank_neg", "teacher_rank_pos", "teacher_rank_neg"):
        pairs[c] = pairs[c].astype("int32")
    for c in ("teacher_pos", "teacher_neg"):
        pairs[c] = pairs[c].astype("float32")
    n = write_triples_tsv(triples, out_dir / "triples.tsv")
    with atomic_output(out_dir / "teacher_scores.parquet") as tmp:
        pairs[["teacher_pos", "teacher_neg"]].to_parquet(tmp, index=False)
    with atomic_output(out_dir / "pairs.parquet") as tmp:
        pairs.to_parquet(tmp, compression="zstd", index=False)
    qids = cands["qid"].nunique()
    return dict(
        queries=qids,
        pairs=n,
        queries_short_of_pairs=int(short),
        candidates=len(cands),
        mean_candidates_per_query=round(len(cands) / max(qids, 1), 2),
        head_pair_fraction=round(float((pairs["teacher_rank_pos"] <= TOP_TEACHER).mean()), 4)
        if n else 0.0,
        mean_teacher_margin=round(float((pairs["teacher_pos"] - pairs["teacher_neg"]).mean()), 4)
        if n else 0.0,
        seconds_sample=round(time.perf_counter() - t0, 2),
    )


def fuse_distillation_set(source_dir, out_dir, fusion_weight: float, *, pairs_per_query: int = 16,
                          seed: int = 42) -> dict:
    """A fused-teacher copy of an existing distillation set: its ``candidates.parquet`` with
    ``fuse_teacher``, then pairs sampled from the fused ranking (nothing is re-encoded)."""
    t0 = time.perf_counter()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if source_dir.resolve() == out_dir.resolve():
        raise ValueError(f"{out_dir}: write the fused set to another directory than its source")
    cands = fuse_teacher(pd.read_parquet(source_dir / "candidates.parquet"), fusion_weight)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_candidates(cands, out_dir / "candidates.parquet")
    stats = dict(source=str(source_dir), fusion_weight=fusion_weight,
                 pairs_per_query=pairs_per_query, seed=seed, top_teacher=TOP_TEACHER,
                 **write_teacher_pairs(cands, out_dir, pairs_per_query=pairs_per_query, seed=seed))
    stats["seconds_total"] = round(time.perf_counter() - t0, 2)
    _write_json(stats, out_dir / "stats.json")
    return stats


def sample_group(n: int, size: int, rng: random.Random, texts: list[str] | None = None,
                 top: int = TOP_TEACHER) -> list[int]:
    """Positions (0-based teacher ranks, ascending) of one listwise group of ``size`` passages
    from a teacher ranking of length n: one from the teacher's top ``top``, the rest uniform
    over all other positions, so a group spans the ranking. Passages whose text repeats one
    already taken are skipped; fewer than ``size`` come back only if the list runs out."""
    if n < 2 or size < 2:
        return []
    first = rng.randrange(min(top, n))
    rest = [i for i in range(n) if i != first]
    rng.shuffle(rest)
    chosen, taken = [first], {texts[first]} if texts is not None else set()
    for i in rest:
        if len(chosen) == size:
            break
        if texts is not None:
            if texts[i] in taken:
                continue
            taken.add(texts[i])
        chosen.append(i)
    return sorted(chosen)


def build_listwise_groups(candidates_path, out_dir, *, group_size: int = 8,
                          groups_per_query: int = 4, seed: int = 42, top: int = TOP_TEACHER,
                          forbidden_qids: Iterable = ()) -> dict:
    """Listwise training groups from a distillation set's ``candidates.parquet`` (its teacher
    scores; nothing is re-encoded): ``groups_per_query`` groups of ``group_size`` passages per
    query (``sample_group``), written as ``groups.tsv`` (query, then the passages in teacher
    order) and ``group_scores.parquet`` (``teacher_0 .. teacher_{n-1}`` aligned with the lines,
    plus qid and docids), rows shuffled across queries. Queries with fewer than
    ``group_size`` distinct candidate texts are skipped and counted."""
    t0 = time.perf_counter()
    cands = pd.read_parquet(candidates_path, columns=["qid", "query", "docid", "rank", "passage",
                                                      "teacher_score"])
    forbidden = {str(q) for q in forbidden_qids}
    leaked = sorted(set(cands["qid"].astype(str)) & forbidden)
    if leaked:
        raise DataError(f"{candidates_path}: {len(leaked)} queries are forbidden (evaluation "
                        f"topics): {_examples(leaked)}")
    if group_size < 2 or groups_per_query < 1:
        raise ValueError(f"need group_size >= 2 and groups_per_query >= 1, got {group_size}, {groups_per_query}")
    groups, rows, skipped = [], [], 0
    for qid, g in cands.groupby("qid", sort=False):
        order = np.lexsort((g["rank"].to_numpy(), -g["teacher_score"].to_numpy()))
        g = g.iloc[order]
        texts, ids, ts = g["passage"].tolist(), g["docid"].tolist(), g["teacher_score"].tolist()
        if len(set(texts)) < group_size:
            skipped += 1
            continue
        rng = random.Random(f"{seed}:{qid}")
        query = g["query"].iloc[0]
        for _ in range(groups_per_query):
            positions = sample_group(len(g), group_size, rng, texts, top)
            groups.append((query, *[texts[i] for i in positions]))
            rows.append((str(qid), *[ids[i] for i in positions], *[ts[i] for i in positions]))
    if not groups:
        raise DataError(f"{candidates_path}: no query has {group_size} distinct candidates")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    columns = (["qid"] + [f"docid_{i}" for i in range(group_size)]
               + [f"teacher_{i}" for i in range(group_size)])
    table = pd.DataFrame([rows[i] for i in order], columns=columns)
    for i in range(group_size):
        table[f"teacher_{i}"] = table[f"teacher_{i}"].astype("float32")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = write_triples_tsv((groups[i] for i in order), out_dir / "groups.tsv", passages=group_size)
    with atomic_output(out_dir / "group_scores.parquet") as tmp:
        table.to_parquet(tmp, compression="zstd", index=False)
    stats = dict(candidates=str(candidates_path), group_size=group_size,
                 groups_per_query=groups_per_query, seed=seed, top_teacher=top, groups=n,
                 queries=n // groups_per_query, queries_skipped=skipped,
                 seconds=round(time.perf_counter() - t0, 2))
    _write_json(stats, out_dir / "groups.stats.json")
    return stats


# ------------------------------------------------- the distillation subcommands of 01


def build_default_set(output_dir, *, shared: str = DEFAULT_SHARED, k: int = 100,
                      pairs_per_query: int = 16, seed: int = 42, teacher: str = "all-MiniLM-L6-v2",
                      max_queries: int | None = None, max_passages: int | None = None,
                      holdout: int = 0, fusion_weight: float | None = None,
                      from_set=None, overwrite: bool = False, teacher_backend: str = AUTO) -> dict:
    """The embedded default distillation set (``embedded_default_sources``) in ``output_dir``,
    or, with ``from_set``, a fused-teacher copy of an existing set (``fuse_distillation_set``;
    needs ``fusion_weight``). ``max_passages`` / ``max_queries``: a miniature set (the first
    passages; the DL21/DL22 topics first, on-topic for this collection, then dev);
    ``holdout``: the first N judged DL21 topics go to monitoring files (``write_holdout``)
    instead of training. A non-empty ``output_dir`` is refused unless ``overwrite``."""
    refuse_existing([output_dir], overwrite,
                    inputs=[Path(from_set) / "candidates.parquet"] if from_set else [])
    if from_set:
        if fusion_weight is None:
            raise ValueError("--from_set re-derives a set with --fusion_weight; give one")
        return fuse_distillation_set(from_set, output_dir, fusion_weight,
                                     pairs_per_query=pairs_per_query, seed=seed)
    queries, collection, forbidden = embedded_default_sources(shared)
    if max_passages:
        collection = dict(list(collection.items())[:max_passages])
    if max_queries:
        dev = set(read_queries_tsv(Path(shared) / "msmarco-dev-subset" / "queries.tsv"))
        ordered = [q for q in queries if q not in dev] + [q for q in queries if q in dev]
        queries = {q: queries[q] for q in ordered[:max_queries]}
    if holdout:
        for qid in write_holdout(shared, holdout, output_dir):
            queries.pop(qid, None)
    return build_distillation_set(queries, collection, output_dir, k=k,
                                  pairs_per_query=pairs_per_query, seed=seed, teacher=teacher,
                                  forbidden_qids=forbidden, fusion_weight=fusion_weight,
                                  teacher_backend=teacher_backend)


def build_groups_file(candidates, output_dir, *, group_size: int = 8, groups_per_query: int = 4,
                      seed: int = 42, forbid_qrels=None, overwrite: bool = False) -> dict:
    """``build_listwise_groups`` refusing an existing ``output_dir/groups.tsv`` unless
    ``overwrite``; the queries judged in ``forbid_qrels`` (evaluation topics) are refused."""
    refuse_existing([Path(output_dir) / "groups.tsv"], overwrite, inputs=[candidates])
    forbidden = set(read_qrels(forbid_qrels)) if forbid_qrels else set()
    return build_listwise_groups(candidates, output_dir, group_size=group_size,
                                 groups_per_query=groups_per_query, seed=seed, forbidden_qids=forbidden)


def score_triples(triples, checkpoint: str, output, *, batch_size: int = 64, max_length: int = 256,
                  overwrite: bool = False, backend: str = AUTO, progress: bool = True) -> int:
    """Teacher scores of a triples file by any checkpoint, tag or model dir: a parquet of
    ``teacher_pos, teacher_neg`` whose row i scores triple i (``--distill_scores``), on a
    ``common.serving.rank`` backend (``auto``: ``common.serving.rank.resolve_backend``). Returns the number of rows."""
    refuse_existing([output], overwrite, inputs=[triples])
    rows = list(TriplesStream(triples))
    if not rows:
        raise DataError(f"{triples}: no triples: nothing to score")
    queries = [q for q, _p, _n in rows]
    positives, negatives = [p for _q, p, _n in rows], [n for _q, _p, n in rows]
    # the torch backend is score_pairs bit for bit (tests/test_ship.py)
    ranker = Ranker.load(checkpoint, backend, max_length=max_length, batch_size=batch_size)
    pos, neg = ranker.score(queries, positives, progress), ranker.score(queries, negatives, progress)
    with atomic_output(output) as tmp:
        pd.DataFrame({"teacher_pos": pos, "teacher_neg": neg}).to_parquet(tmp, compression="zstd")
    return len(rows)
