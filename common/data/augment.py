"""Pseudo-queries from training-side passages, and sets mixed from several distillation sets.

The training signal of distillation is limited by the texts the student sees, not by human
queries: a teacher scores whatever it is given. ``build_augmented_set`` makes queries from the
passages of an existing distillation set (never from an evaluation topic's candidates) and runs
them through the same path as the real queries (``common.data.distill.build_distillation_set``:
BM25 candidates from the set's own index, teacher scores, pairs spanning the teacher's ranking),
so 02/03* read the result unchanged. Methods (one per query, in turn):

* ``crop``: an independent crop (Contriever): a random span of ``CROP_WORDS`` words of the passage;
* ``ict``: inverse cloze (Lee et al. 2019): one sentence of the passage (at most ``ICT_WORDS`` words);
* ``keywords``: the passage's ``KEYWORDS`` words of highest tf-idf over the collection, in passage
  order (stop words and one-letter tokens left out);
* ``generator``: a seq2seq doc2query model (``--generator``, e.g. a docT5query checkpoint): one
  sampled query per drawn passage.

Passages are drawn uniformly (with replacement) with ``random.Random(seed)``; a query whose text
repeats an earlier one is drawn again (at most ``_MAX_TRIES`` times). Every query records its
method and source passage (``pseudo_queries.parquet``). ``mix_sets`` interleaves sets whose
teacher scores are on one scale (same teacher, same fusion) into one stream.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.distill import _write_json, build_distillation_set, embedded_default_sources
from common.data.formats import DataError, TriplesStream, read_candidates_json, write_triples_tsv
from common.io import atomic_output, refuse_existing

METHODS = ("crop", "ict", "keywords", "generator")
CROP_WORDS = (4, 12)
ICT_WORDS = 32
KEYWORDS = (2, 5)
_MAX_TRIES = 20
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves also may one two many much used use""".split())


def read_collection_jsonl(path) -> dict[str, str]:
    """``{"id", "contents"}`` lines (a distillation set's ``collection.jsonl``) as ``{docid: text}``."""
    collection = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                collection[str(row["id"])] = str(row["contents"])
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: not a collection line ({err})") from None
    if not collection:
        raise DataError(f"{path}: empty collection")
    return collection


class _Keywords:
    """tf-idf keywords of a passage against the document frequencies of a collection."""

    def __init__(self, collection: dict[str, str]):
        self.df = Counter(w for text in collection.values() for w in set(self.words(text)))
        self.n = len(collection)

    @staticmethod
    def words(text: str) -> list[str]:
        return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOP_WORDS]

    def __call__(self, text: str, k: int) -> str:
        words = self.words(text)
        tf = Counter(words)
        weight = {w: c * math.log((1 + self.n) / (1 + self.df[w])) for w, c in tf.items()}
        top = set(sorted(weight, key=lambda w: (-weight[w], w))[:k])
        seen, out = set(), []
        for w in words:  # passage order, each once
            if w in top and w not in seen:
                seen.add(w)
                out.append(w)
        return " ".join(out)


def _crop(text: str, rng: random.Random) -> str:
    words = text.split()
    length = min(len(words), rng.randint(*CROP_WORDS))
    start = rng.randrange(len(words) - length + 1) if words else 0
    return " ".join(words[start:start + length])


def _ict(text: str, rng: random.Random) -> str:
    sentences = [s for s in _SENTENCE.split(text.strip()) if len(s.split()) >= 3]
    if not sentences:
        return _crop(text, rng)
    return " ".join(rng.choice(sentences).split()[:ICT_WORDS])


class Doc2Query:
    """A seq2seq query generator (any ``AutoModelForSeq2SeqLM`` dir or hub name), sampling."""

    def __init__(self, name: str, seed: int, max_new_tokens: int = 32, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(name, trust_remote_code=False).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"--generator {name}: not a seq2seq model slimrank can load ({err})") from None
        self.torch, self.seed = torch, seed
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, passages: list[str]) -> list[str]:
        torch, out = self.torch, []
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, len(passages), self.batch_size):
            batch = self.tokenizer(passages[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            with torch.no_grad():
                ids = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          do_sample=True, top_k=10, max_new_tokens=self.max_new_tokens)
            out.extend(" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out


def pseudo_queries(collection: dict[str, str], n: int, methods=("crop", "ict", "keywords"), seed: int = 42,
                   generator: Doc2Query | None = None) -> pd.DataFrame:
    """``n`` pseudo-queries (columns ``qid, query, method, docid``) from the passages of
    ``collection``, methods in turn (module doc). ``generator``: the model of method ``generator``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: expected some of {', '.join(METHODS)}, got {' '.join(methods) or 'none'}")
    if ("generator" in methods) != (generator is not None):
        raise ValueError("the generator method and --generator go together")
    if n < 1:
        raise ValueError(f"--num_queries must be >= 1, got {n}")
    docids = list(collection)
    rng = random.Random(seed)
    keywords = _Keywords(collection) if "keywords" in methods else None
    seen: set[str] = set()
    rows = []
    for i in range(n):
        method = methods[i % len(methods)]
        for _ in range(_MAX_TRIES):
            docid = rng.choice(docids)
            text = collection[docid]
            if method == "crop":
                query = _crop(text, rng)
            elif method == "ict":
                query = _ict(text, rng)
            elif method == "keywords":
                query = keywords(text, rng.randint(*KEYWORDS))
            else:  # generated below, in batches
                query = f"\0{len(rows)}"
            if query.strip() and query not in seen:
                break
        else:
            continue
        seen.add(query)
        rows.append((f"aug-{method}-{i:07d}", query, method, docid))
    table = pd.DataFrame(rows, columns=["qid", "query", "method", "docid"])
    if generator is not None:
        mask = table["method"] == "generator"
        made = generator([collection[d] for d in table.loc[mask, "docid"]])
        table.loc[mask, "query"] = made
        table = table[table["query"].str.strip() != ""].drop_duplicates("query").reset_index(drop=True)
    if table.empty:
        raise DataError("no pseudo-query could be made from the collection")
    return table


def evaluation_passages(shared: str) -> tuple[set[str], set[str]]:
    """The docids and texts of the DL20 candidate lists: never a source of pseudo-queries."""
    ids, texts = set(), set()
    for path in sorted((Path(shared) / "dl20").glob("*.json")):
        df = read_candidates_json(path)
        ids.update(df["docid"])
        texts.update(df["passage"])
    return ids, texts


def build_augmented_set(from_set, output_dir, *, num_queries: int, methods=("crop", "ict", "keywords"),
                        seed: int = 42, generator: str | None = None, shared: str = "../shared/data/trec-dl",
                        fusion_weight: float | None = None, k: int | None = None,
                        pairs_per_query: int | None = None, overwrite: bool = False,
                        progress: bool = True) -> dict:
    """A distillation set of pseudo-queries over ``from_set``'s collection (module doc), with
    ``from_set``'s teacher, length, k and pairs per query unless given, its BM25 index reused;
    passages of the DL20 lists are left out of the sources. Returns the set's stats."""
    source = Path(from_set)
    try:
        made = json.loads((source / "stats.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"--from_set {source}: not a distillation set (no readable stats.json: {err})") from None
    if "teacher" not in made:
        raise DataError(f"--from_set {source}: a set derived from another ({made.get('source')}); give that one")
    refuse_existing([output_dir], overwrite, inputs=[source])
    collection = read_collection_jsonl(source / "collection.jsonl")
    bad_ids, bad_texts = evaluation_passages(shared)
    sources = {d: t for d, t in collection.items() if d not in bad_ids and t not in bad_texts}
    if not sources:
        raise DataError(f"--from_set {source}: every passage of its collection is a DL20 candidate")
    model = Doc2Query(generator, seed) if generator else None
    queries = pseudo_queries(sources, num_queries, tuple(methods), seed, model)
    _, _, forbidden = embedded_default_sources(shared)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "pseudo_queries.parquet") as tmp:
        queries.to_parquet(tmp, index=False)
    # the source's BM25 index when it has one for this collection (else one is built in out: the
    # source set is an input, never written)
    index = source / "index" if (source / "index.fingerprint.json").is_file() else None
    stats = build_distillation_set(
        dict(zip(queries["qid"], queries["query"])), collection, out, index_dir=index,
        k=k or made["k"], pairs_per_query=pairs_per_query or made["pairs_per_query"], seed=seed,
        teacher=made["teacher"], teacher_max_length=made["teacher_max_length"], forbidden_qids=forbidden,
        fusion_weight=fusion_weight, progress=progress)
    stats["augment"] = {"from_set": str(source), "methods": list(methods), "generator": generator,
                        "num_queries": num_queries, "made": int(len(queries)),
                        "per_method": {m: int(c) for m, c in queries["method"].value_counts().items()},
                        "source_passages": len(sources), "left_out_dl20_passages": len(collection) - len(sources)}
    _write_json(stats, out / "stats.json")
    return stats


def _scale(path: Path) -> tuple:
    """What puts a set's teacher scores on one scale: its teacher, length and fusion."""
    stats = json.loads((path / "stats.json").read_text())
    if "source" in stats and "teacher" not in stats:  # a fused copy: its source's teacher
        base = _scale(Path(stats["source"]))
        return base[:2] + (stats.get("fusion_weight"),)
    return stats.get("teacher"), stats.get("teacher_max_length"), stats.get("fusion_weight")


def mix_sets(sets: list, output_dir, take: list[int] | None = None, seed: int = 42,
             overwrite: bool = False) -> dict:
    """One training stream from several sets: the first ``take[i]`` triples of set i (all when not
    given) shuffled together with ``random.Random(seed)``, so every prefix of the stream holds the
    sets in about the same proportion; ``triples.tsv``, ``teacher_scores.parquet`` (row-aligned)
    and ``mix.parquet`` (set, row). Sets scored by another teacher or fusion are refused."""
    paths = [Path(s) for s in sets]
    if len(paths) < 2:
        raise ValueError("--sets: give two or more distillation sets to mix")
    if take is not None and len(take) != len(paths):
        raise ValueError(f"--take: one count per set ({len(paths)}), got {len(take)}")
    refuse_existing([output_dir], overwrite, inputs=paths)
    scales = []
    for p in paths:
        try:
            scales.append(_scale(p))
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"--sets {p}: not a distillation set (stats.json: {err})") from None
    if len(set(scales)) > 1:
        raise DataError("--sets: teacher scores on different scales (teacher, length, fusion): "
                        + "; ".join(f"{p}: {s}" for p, s in zip(paths, scales)))
    rows, scores, origin = [], [], []
    for i, p in enumerate(paths):
        triples = list(TriplesStream(p / "triples.tsv"))
        table = pd.read_parquet(p / "teacher_scores.parquet")
        if len(table) != len(triples):
            raise DataError(f"{p}: {len(triples)} triples but {len(table)} teacher-score rows")
        n = len(triples) if take is None else take[i]
        if not 1 <= n <= len(triples):
            raise ValueError(f"--take {n} for {p}: it has {len(triples)} triples")
        rows += triples[:n]
        scores.append(table.iloc[:n])
        origin += [(i, j) for j in range(n)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    table = pd.concat(scores, ignore_index=True).iloc[order].reset_index(drop=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = write_triples_tsv((rows[i] for i in order), out / "triples.tsv")
    with atomic_output(out / "teacher_scores.parquet") as tmp:
        table.astype(np.float32).to_parquet(tmp, index=False)
    with atomic_output(out / "mix.parquet") as tmp:
        pd.DataFrame([origin[i] for i in order], columns=["set", "row"]).astype("int32").to_parquet(tmp, index=False)
    counts = Counter(origin[i][0] for i in order)
    stats = {"sets": [str(p) for p in paths], "take": [counts[i] for i in range(len(paths))], "seed": seed,
             "pairs": n, "teacher": scales[0][0], "teacher_max_length": scales[0][1],
             "fusion_weight": scales[0][2], "mixed_from": True}
    _write_json(stats, out / "stats.json")
    return stats
