"""Dense first stage: a bi-encoder's passage embeddings as a saved, resumable index, searched
exactly (batched matrix products) or with FAISS, written as the candidates parquet + TREC run of
``bm25`` (so ``01 mine`` and ``01 teacher`` take it as they take a BM25 list).

The subcommand ``dense`` of ``01_prefetch_passages.py`` is :func:`from_dense`. Any bi-encoder
``common.kinds.loading.load_model`` opens (the packaged tag, a plain Hugging Face or
sentence-transformers dir, slimrank checkpoints masked or reshaped, shipped dirs) on any backend
of ``common.serving.rank`` embeds the passages once; a bi model that names a query encoder (or
``query_encoder``) embeds the queries with it. Under ``torchrun`` the ranks share the encoding
(shard i goes to rank i % world size); rank 0 assembles the index, searches and writes.

An index dir holds:

* ``index.json``: what built it (``encoder``: the name given, ``weights_sha256``: a hash of its
  weights and pruning state, ``pooling``, ``max_length``, ``backend``), the collection it covers
  (path, passage count, ``sha256`` of its ids and texts), ``dim``, ``shard_size``, ``complete``,
  and the build's time and size once complete;
* ``embeddings.npy``: float32 ``[passages, dim]``, L2-normalised rows, row i = line i of
* ``docids.txt``: the collection's ids in collection order;
* ``shards/``: while building only, ``embeddings-00000.npy`` ... of ``shard_size`` passages, each
  written atomically; an interrupted build resumes after the last complete shard and yields the
  same ``embeddings.npy`` byte for byte (each shard is encoded on its own, in the same batches);
* ``hnsw.faiss``: the FAISS HNSW graph, built by the first ``--search hnsw`` and reused.

A later search over the same collection with the same encoder reuses the index; an index built by
another encoder, max length, pooling or backend, or over another collection, is refused naming
both. Scores are cosines; ties rank in collection order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import formats as data
from common.data.first_stage import iter_collection_lines
from common.io import atomic_output, atomic_write_text, refuse_existing

Path_ = str | os.PathLike
Report = Callable[[str], None]

INDEX_FORMAT = "slimrank-dense-index/1"
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
DOCIDS_FILE = "docids.txt"
SHARDS_DIR = "shards"
HNSW_FILE = "hnsw.faiss"
SHARD_SIZE = 4096
IDENTITY_KEYS = ("weights_sha256", "pooling", "max_length", "backend")
SEARCHES = ("exact", "flat", "hnsw")
HNSW_M = 32  # neighbours per node (FAISS IndexHNSWFlat M)
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256  # at least k at search time
EXACT_CHUNK = 32768  # passages per matrix product
QUERY_CHUNK = 1024  # queries per matrix product


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Collection:
    path: str
    docids: list[str]
    texts: list[str]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for docid, text in zip(self.docids, self.texts):
            digest.update(f"{docid}\t{text}\n".encode("utf-8"))
        return digest.hexdigest()


def read_collection(path: Path_) -> Collection:
    """A passage collection, TSV ``id<TAB>text`` or JSONL ``{"id", "contents"}`` (as ``bm25``
    takes it). A repeated id or an empty text raises ``DataError`` naming the lines."""
    if not Path(path).is_file():
        raise data.DataError(f"{path}: no such collection file")
    docids, texts, first_line = [], [], {}
    try:
        for lineno, docid, text in iter_collection_lines(Path(path)):
            if docid in first_line:
                raise data.DataError(f"{path}: line {lineno}: duplicate docid {docid!r} "
                                     f"(first on line {first_line[docid]})")
            if not text.strip():
                raise data.DataError(f"{path}: line {lineno}: empty passage text for docid {docid!r}")
            first_line[docid] = lineno
            docids.append(docid)
            texts.append(text)
    except UnicodeDecodeError as err:
        raise data.DataError(f"{path}: not UTF-8 ({err.reason})") from None
    except data.DataError:
        raise
    except ValueError as err:  # a malformed line, named by iter_collection_lines
        raise data.DataError(str(err)) from None
    if not docids:
        raise data.DataError(f"{path}: no passages")
    return Collection(str(path), docids, texts)


def read_query_set(path: Path_) -> dict[str, str]:
    """``qid<TAB>query`` lines (``formats.read_queries_tsv``); an empty set raises ``DataError``."""
    queries = data.read_queries_tsv(path)
    if not queries:
        raise data.DataError(f"{path}: no queries")
    return queries


# ----------------------------------------------------------------------------- encoder


def _config_of(name: str):
    from transformers import AutoConfig

    from common.models.names import resolve_model_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--encoder {name}: cannot read its config: {first}") from None


def check_bi_encoder(name: str) -> None:
    """Refuse a cross-encoder given where a bi-encoder is needed: a slimrank checkpoint of the
    cross kind, or a plain model whose config names a sequence-classification head."""
    from common.kinds import KINDS

    config = _config_of(name)
    kind = getattr(config, "slimrank_model_kind", None)
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    pairs = kind in KINDS and KINDS[kind].pairs
    if pairs or (kind is None and heads):
        why = f"slimrank_model_kind {kind}" if pairs else f"architectures {heads}"
        raise ValueError(f"--encoder {name} is a cross-encoder ({why} in its config.json): the dense "
                         "first stage embeds passages with a bi-encoder")


def load_bi_encoder(name: str, backend: str = "auto", *, max_length: int = 256, batch_size: int = 64,
                    device: str = "cpu", query_encoder: str | None = None, threads: int | None = None):
    """A bi-encoder ``Ranker`` of ``name`` on ``backend`` (a cross-encoder is refused)."""
    from common.kinds import BiKind
    from common.models.loading import pick_device
    from common.kinds.loading import load_model
    from common.serving.rank import Ranker

    check_bi_encoder(name)
    loaded = load_model(name, pick_device(device), kind=BiKind.name)
    return Ranker.from_loaded(loaded, backend, max_length=max_length, batch_size=batch_size,
                              threads=threads, query_encoder=query_encoder)


def weights_sha256(loaded) -> str:
    """A hash of a loaded model's tensors and of its pruning state (which units are alive)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    state = dataclasses.asdict(loaded.state)
    state.pop("history", None)
    digest.update(json.dumps(state, sort_keys=True).encode())
    return digest.hexdigest()


def encoder_identity(ranker, name: str) -> dict:
    """What makes two passage embeddings comparable: the weights, pooling, max length, backend."""
    from common.models.loading import pooling_of

    return {"encoder": name, "weights_sha256": weights_sha256(ranker.loaded),
            "pooling": pooling_of(ranker.loaded.model), "max_length": int(ranker.max_length),
            "backend": ranker.backend}


def _describe(identity: dict) -> str:
    return (f"{identity['encoder']} (max_length {identity['max_length']}, pooling "
            f"{identity['pooling']}, backend {identity['backend']})")


# ----------------------------------------------------------------------------- index


@dataclasses.dataclass
class DenseIndex:
    path: Path
    meta: dict
    embeddings: np.ndarray  # memory-mapped, float32 [passages, dim]
    docids: list[str]

    @classmethod
    def load(cls, path: Path_) -> "DenseIndex":
        path = Path(path)
        meta = read_meta(path)
        if meta is None or not meta.get("complete"):
            raise data.DataError(f"{path}: not a complete dense index (no {INDEX_FILE} saying complete)")
        embeddings = np.load(path / EMBEDDINGS_FILE, mmap_mode="r")
        docids = (path / DOCIDS_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        if embeddings.shape != (meta["collection"]["passages"], meta["dim"]) or len(docids) != len(embeddings):
            raise data.DataError(f"{path}: {EMBEDDINGS_FILE} {embeddings.shape} and {DOCIDS_FILE} "
                                 f"({len(docids)} ids) disagree with {INDEX_FILE}")
        return cls(path, meta, embeddings, docids)

    def size_bytes(self) -> int:
        """Bytes of the embeddings and the ids (what a search loads)."""
        return sum((self.path / f).stat().st_size for f in (EMBEDDINGS_FILE, DOCIDS_FILE))


def read_meta(path: Path_) -> dict | None:
    file = Path(path) / INDEX_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise data.DataError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise data.DataError(f"{file}: not a dense index ({INDEX_FORMAT}) description")
    return meta


def check_index(path: Path_, meta: dict, identity: dict, collection: Collection,
                collection_sha: str) -> None:
    """Refuse an index built by another encoder setting or over another collection."""
    built = meta["identity"]
    if built.get("weights_sha256") != identity["weights_sha256"] and built.get("encoder") == identity["encoder"]:
        raise ValueError(f"index {path} was built by encoder {built['encoder']} with other weights "
                         f"(sha256 {built['weights_sha256'][:12]}, now {identity['weights_sha256'][:12]}): "
                         "use another --index")
    if any(built.get(key) != identity[key] for key in IDENTITY_KEYS):
        raise ValueError(f"index {path} was built by encoder {_describe(built)}, not by "
                         f"{_describe(identity)}: use another --index")
    saved = meta["collection"]
    if saved["sha256"] != collection_sha:
        raise ValueError(f"index {path} covers another collection ({saved['path']}, {saved['passages']} "
                         f"passages), not {collection.path} ({len(collection.docids)} passages): "
                         "use another --index")


def _shard_file(path: Path, shard: int) -> Path:
    return path / SHARDS_DIR / f"embeddings-{shard:05d}.npy"


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _complete_shard(file: Path, rows: int, dim: int | None) -> bool:
    """A shard file of the expected shape (a torn one cannot exist: each is renamed into place)."""
    if not file.is_file():
        return False
    try:
        array = np.load(file, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return array.shape[0] == rows and array.dtype == np.float32 and (dim is None or array.shape[1] == dim)


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of a ``torchrun`` launch (``RANK`` / ``WORLD_SIZE``), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _wait_for(condition: Callable[[], bool], poll: float = 1.0) -> None:
    while not condition():
        time.sleep(poll)


def build_index(ranker, identity: dict, collection: Collection, path: Path_, *,
                shard_size: int = SHARD_SIZE, report: Report = print,
                after_shard: Callable[[int], None] | None = None,
                rank: int = 0, world_size: int = 1) -> DenseIndex | None:
    """Encode ``collection`` into the index dir ``path`` (or reuse / resume the one there).

    Shards of ``shard_size`` passages are encoded in order and each is saved atomically; a rerun
    skips the complete ones. ``after_shard(i)`` is called after shard ``i`` is saved (tests
    interrupt there). When every shard is there, ``embeddings.npy`` and ``docids.txt`` are written
    (atomically), ``index.json`` says ``complete`` and the shards go.

    Across ``world_size`` processes (``torchrun``, :func:`distributed_rank`) rank r encodes the
    shards i with i % world_size == r; rank 0 creates the dir, waits for every shard and assembles
    the same file one process would; the other ranks return None when their shards are saved."""
    path = Path(path)
    collection_sha = collection.sha256()
    if rank != 0:  # rank 0 creates (or checks) the index description first
        _wait_for(lambda: (path / INDEX_FILE).is_file())
    meta = read_meta(path)
    if meta is not None:
        check_index(path, meta, identity, collection, collection_sha)
        if meta.get("complete"):
            report(f"reusing the index {path} ({meta['collection']['passages']} passages)")
            return DenseIndex.load(path) if rank == 0 else None
        shard_size = int(meta["shard_size"])  # a resumed build keeps its shards
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"--index {path} exists and is not a dense index: use another --index")
    n = len(collection.docids)
    if meta is None:
        meta = {"format": INDEX_FORMAT, "identity": identity,
                "collection": {"path": str(collection.path), "passages": n, "sha256": collection_sha},
                "dim": None, "shard_size": int(shard_size), "complete": False}
        (path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / INDEX_FILE, json.dumps(meta, indent=1) + "\n")

    shards = range((n + shard_size - 1) // shard_size)
    rows = {shard: min(n, (shard + 1) * shard_size) - shard * shard_size for shard in shards}
    started, encoded, reused = time.perf_counter(), 0, 0
    for shard in shards[rank::world_size]:
        lo = shard * shard_size
        file = _shard_file(path, shard)
        if _complete_shard(file, rows[shard], None):
            reused += 1
        else:
            t0 = time.perf_counter()
            embeddings = np.ascontiguousarray(ranker.encode(collection.texts[lo:lo + rows[shard]]), dtype=np.float32)
            _save_npy(embeddings, file)
            encoded += rows[shard]
            report(f"shard {shard + 1}/{len(shards)}: {rows[shard]} passages in {time.perf_counter() - t0:.1f}s")
        if after_shard is not None:
            after_shard(shard)
    encode_seconds = time.perf_counter() - started
    if rank != 0:
        report(f"rank {rank}: its {len(shards[rank::world_size])} shards are saved in {path / SHARDS_DIR}")
        return None
    if world_size > 1:
        report(f"waiting for the shards of ranks 1-{world_size - 1}")
        _wait_for(lambda: all(_complete_shard(_shard_file(path, s), rows[s], None) for s in shards))
        encode_seconds = time.perf_counter() - started
    dims = {int(np.load(_shard_file(path, s), mmap_mode="r").shape[1]) for s in shards}
    if len(dims) != 1:
        raise data.DataError(f"{path / SHARDS_DIR}: shards of different widths {sorted(dims)}")
    meta["dim"] = dims.pop()

    with atomic_output(path / EMBEDDINGS_FILE) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, meta["dim"]))
        for shard in shards:
            lo = shard * shard_size
            block = np.load(_shard_file(path, shard))
            out[lo:lo + len(block)] = block
        out.flush()
        del out
    atomic_write_text(path / DOCIDS_FILE, "".join(f"{d}\n" for d in collection.docids))
    if world_size > 1:  # the other ranks' counts are theirs: a fresh build encodes every passage
        encoded = n - sum(rows[s] for s in shards if s % world_size == 0) + encoded
    meta.update(complete=True, encode_seconds=round(encode_seconds, 3), passages_encoded=encoded,
                shards_reused=reused, world_size=world_size,
                passages_per_s=round(encoded / encode_seconds, 1) if encoded else None,
                bytes=sum((path / f).stat().st_size for f in (EMBEDDINGS_FILE, DOCIDS_FILE)))
    atomic_write_text(path / INDEX_FILE, json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(path / SHARDS_DIR, ignore_errors=True)
    index = DenseIndex.load(path)
    report(f"indexed {n} passages into {path} in {encode_seconds:.1f}s "
           f"({meta['passages_per_s']} passages/s), {meta['bytes'] / 2**20:.1f} MiB")
    return index


# ----------------------------------------------------------------------------- search


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` by score descending, ties by id ascending."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def exact_search(queries: np.ndarray, embeddings: np.ndarray, k: int, *, chunk: int = EXACT_CHUNK,
                 query_chunk: int = QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of each query with the rows of ``embeddings`` (which may
    be memory-mapped): ``(scores [nq, k], row ids [nq, k])``, score descending, ties by row.

    The passages go ``chunk`` rows at a time through one matrix product per ``query_chunk``
    queries; each chunk's candidates (its top k, ties at the cut all kept) merge into the
    running top k, so the result is the same as sorting every score."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(embeddings)
    k = min(int(k), n)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_ids = np.empty((len(queries), k), dtype=np.int64)
    for qlo in range(0, len(queries), query_chunk):
        q = queries[qlo:qlo + query_chunk]
        best_s = np.empty((len(q), 0), dtype=np.float32)
        best_i = np.empty((len(q), 0), dtype=np.int64)
        for lo in range(0, n, chunk):
            block = np.asarray(embeddings[lo:lo + chunk], dtype=np.float32)
            scores = q @ block.T
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            cand_s = np.take_along_axis(scores, part, 1)
            cand_i = part.astype(np.int64)
            threshold = cand_s.min(axis=1)
            tied = np.flatnonzero((scores >= threshold[:, None]).sum(axis=1) > kk)
            for row in tied:  # ties straddle the cut: keep the lowest rows among them
                ids = np.flatnonzero(scores[row] >= threshold[row])
                pick = ids[np.lexsort((ids, -scores[row, ids]))[:kk]]
                cand_s[row], cand_i[row] = scores[row, pick], pick
            best_s, best_i = _order(np.concatenate([best_s, cand_s], 1),
                                    np.concatenate([best_i, cand_i + lo], 1), k)
        out_scores[qlo:qlo + len(q)], out_ids[qlo:qlo + len(q)] = best_s, best_i
    return out_scores, out_ids


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("--search flat/hnsw needs faiss-cpu (pip install faiss-cpu, pinned in "
                         "requirements.txt); --search exact needs nothing") from None
    return faiss


def hnsw_index(index: DenseIndex, report: Report = print):
    """The index's FAISS HNSW graph (inner product): loaded from ``hnsw.faiss``, or built and
    saved there (atomically) when missing or built with other parameters."""
    faiss = _faiss()
    file = index.path / HNSW_FILE
    params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    if file.is_file() and index.meta.get("hnsw", {}).get("params") == params:
        return faiss.read_index(str(file))
    started = time.perf_counter()
    graph = faiss.IndexHNSWFlat(index.meta["dim"], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    graph.add(np.ascontiguousarray(index.embeddings, dtype=np.float32))
    seconds = time.perf_counter() - started
    with atomic_output(file) as tmp:
        faiss.write_index(graph, str(tmp))
    index.meta["hnsw"] = {"params": params, "build_seconds": round(seconds, 3), "bytes": file.stat().st_size}
    atomic_write_text(index.path / INDEX_FILE, json.dumps(index.meta, indent=1) + "\n")
    report(f"built the HNSW graph (M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}) in {seconds:.1f}s")
    return graph


def faiss_search(queries: np.ndarray, index: DenseIndex, k: int, kind: str = "flat",
                 report: Report = print) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by FAISS: ``flat`` (IndexFlatIP, exact) or ``hnsw`` (approximate, efSearch =
    max(k, HNSW_EF_SEARCH)); same output as :func:`exact_search` (each row's hits re-ordered by
    score, ties by row)."""
    faiss = _faiss()
    k = min(int(k), len(index.docids))
    if kind == "flat":
        searcher = faiss.IndexFlatIP(index.meta["dim"])
        searcher.add(np.ascontiguousarray(index.embeddings, dtype=np.float32))
    elif kind == "hnsw":
        searcher = hnsw_index(index, report)
        searcher.hnsw.efSearch = max(k, HNSW_EF_SEARCH)
    else:
        raise ValueError(f"FAISS search must be flat or hnsw, got {kind!r}")
    scores, ids = searcher.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if (ids < 0).any():  # HNSW may return fewer than k: pad with the lowest score, drop below
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return _order(scores, ids.astype(np.int64), k)


def search(queries: np.ndarray, index: DenseIndex, k: int, how: str = "exact",
           report: Report = print) -> tuple[np.ndarray, np.ndarray]:
    if how == "exact":
        return exact_search(queries, index.embeddings, k)
    return faiss_search(queries, index, k, how, report)


def to_candidates(queries: dict[str, str], collection: Collection, scores: np.ndarray,
                  ids: np.ndarray) -> pd.DataFrame:
    """The candidates frame (``formats.CANDIDATE_COLUMNS``): queries in file order, rank from 1."""
    keep = ids >= 0
    if not np.isfinite(scores[keep]).all():
        raise data.DataError("dense search: non-finite scores (an encoder that outputs NaN?)")
    qids = list(queries)
    rows = np.repeat(np.arange(len(qids)), keep.sum(axis=1))
    ranks = np.concatenate([np.arange(1, r + 1) for r in keep.sum(axis=1)]) if len(rows) else []
    docids = np.asarray(collection.docids, dtype=object)
    texts = np.asarray(collection.texts, dtype=object)
    flat = ids[keep]
    return pd.DataFrame({
        "qid": pd.array([qids[r] for r in rows], dtype="str"),
        "query": pd.array([queries[qids[r]] for r in rows], dtype="str"),
        "docid": pd.array(docids[flat], dtype="str"),
        "rank": np.asarray(ranks, dtype=np.int32),
        "first_stage_score": scores[keep].astype(np.float32),
        "passage": pd.array(texts[flat], dtype="str"),
    }, columns=data.CANDIDATE_COLUMNS)


def from_dense(encoder: str, collection: Path_, queries: Path_, index: Path_, output: Path_, *,
               run_file: Path_ | None = None, tag: str = "dense", k: int = 100, how: str = "exact",
               backend: str = "auto", max_length: int = 256, batch_size: int = 64,
               shard_size: int = SHARD_SIZE, query_encoder: str | None = None, device: str = "auto",
               threads: int | None = None, overwrite: bool = False, report: Report = print,
               after_shard: Callable[[int], None] | None = None) -> dict:
    """``01_prefetch_passages.py dense``: every input is checked before anything is written
    (outputs exist, queries, collection, encoder, an existing index), then the index is built or
    reused, the queries searched, and the parquet (+ run) written together. Returns the stats."""
    from common.data.candidates import write_candidates_and_run

    if how not in SEARCHES:
        raise ValueError(f"--search must be one of {SEARCHES}, got {how!r}")
    if how != "exact":
        _faiss()
    refuse_existing([output, run_file], overwrite, inputs=[collection, queries, index])
    for out in (output, run_file):
        if out and Path(index).resolve() in Path(out).resolve().parents:
            raise ValueError(f"output {out} is inside the index dir {index}: choose another output")
    query_texts = read_query_set(queries)
    passages = read_collection(collection)
    if threads:
        torch.set_num_threads(threads)
    rank, world_size = distributed_rank()
    if world_size > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    ranker = load_bi_encoder(encoder, backend, max_length=max_length, batch_size=batch_size,
                             device=device, query_encoder=query_encoder, threads=threads)
    identity = encoder_identity(ranker, encoder)
    meta = read_meta(index)
    if meta is not None:  # refuse before any work
        check_index(index, meta, identity, passages, passages.sha256())
    dense = build_index(ranker, identity, passages, index, shard_size=shard_size, report=report,
                        after_shard=after_shard, rank=rank, world_size=world_size)
    if dense is None:  # another torchrun rank: rank 0 searches and writes
        return {"rank": rank}
    started = time.perf_counter()
    query_vectors = (ranker.query_ranker or ranker).encode(list(query_texts.values()))
    encode_seconds = time.perf_counter() - started
    scores, ids = search(query_vectors, dense, k, how, report)
    search_seconds = time.perf_counter() - started - encode_seconds
    report(f"searched {len(query_texts)} queries ({how}, k={k}) in {search_seconds:.2f}s "
           f"(+{encode_seconds:.2f}s encoding them)")
    df = to_candidates(query_texts, passages, scores, ids)
    write_candidates_and_run(df, output, run_file, tag, report)
    return {"passages": len(passages.docids), "queries": len(query_texts), "k": k, "search": how,
            "index_encode_seconds": dense.meta.get("encode_seconds"), "index_bytes": dense.meta.get("bytes"),
            "search_seconds": round(search_seconds, 4), "query_encode_seconds": round(encode_seconds, 4)}
