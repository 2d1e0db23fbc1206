"""The bi-encoder kind: queries and passages embedded alone (the sentence-transformers chain of
``common.models.encoders``: prompt, pooling, Dense layers, L2 normalisation), scored by the
model's similarity (cosine, or dot); each distinct text is embedded once. A bi model whose config
names a query encoder (``slimrank_query_encoder``, ``--query_encoder``) embeds its queries with
that frozen encoder and only its passages itself (an asymmetric bi-encoder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.hardware import time_callable
from common.kinds.base import Forward, ModelKind, register_kind
from transformers import AutoModel

from common.models import m3, st_format
from common.models.arch import adapter_for
from common.models.encoders import embedding_of, max_length_of, similarity, with_prompt
from common.models.loading import DENSE_PREFIX, autocast_context, bare_encoder, pooling_of, sorted_batches


def pair_cosines(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Bi-encoder scores ``(rows, 2)``: each query's dot product with its positive and its
    negative (``passages`` holds them in that order, row by row)."""
    return (queries[:, None, :] * passages.view(len(queries), 2, -1)).sum(-1)


def _attach_embedding_spec(model: nn.Module, path: str, tokenizer) -> None:
    """Give a bare encoder its sentence-transformers chain: the spec into its config, the Dense
    layers (with their weights) as ``model.slimrank_dense``."""
    directory = Path(path)
    if not directory.is_dir():
        return
    spec = st_format.read_embedding_spec(directory, getattr(tokenizer, "model_max_length", None))
    model.config.slimrank_embedding = st_format.spec_dict(spec)
    if spec.dense:
        model.slimrank_dense = st_format.dense_module(spec.dense)
        weights = st_format.dense_weights(directory)
        model.load_state_dict(weights, strict=False)
        missing = [k for k in model.state_dict() if k.startswith("slimrank_dense.") and k not in weights]
        if missing:
            raise ValueError(f"{directory}: Dense weights missing: {missing}")


@register_kind("bi")
class BiKind(ModelKind):
    """Bi-encoder: in-batch contrastive on the query and passage embeddings (the task loss),
    distillation on the teacher's cosine scores or embeddings; with --distill_scores the task
    loss alone (--distill_from is not used then).

    With a query encoder (``--query_encoder``: ``query_encoder`` is set to that frozen model)
    the student embeds passages only: the queries' embeddings come from the query encoder
    without gradient, the scores are its queries against the student's passages, and embedding
    distillation compares passage embeddings only (the student's queries are never used)."""

    pairs = False
    output = "normalised embeddings"
    task_key = "contrastive"
    distill_beside_scores = False
    caches_teacher = True
    query_encoder: nn.Module | None = None
    # --cache_teacher: role -> (text -> row, the teacher's embeddings), from cache_teacher
    _teacher_cache: dict[str, tuple[dict[str, int], torch.Tensor]] | None = None

    @staticmethod
    def runner_output(model, input_ids, attention_mask, extra):
        encoder = getattr(model, "base_model", model)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return embedding_of(model, hidden, attention_mask)

    @classmethod
    def score(cls, ranker, queries, passages, progress=False):
        """Each distinct text embedded once (the queries by the ranker's ``query_ranker`` when the
        model names a query encoder); the model's similarity (cosine, or dot) of each pair."""
        uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        up, pi = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
        q = torch.from_numpy((ranker.query_ranker or ranker).encode(list(uq), progress, "query"))
        p = torch.from_numpy(ranker.encode(list(up), progress, "passage"))
        return similarity(ranker.loaded.model, q[torch.as_tensor(qi)], p[torch.as_tensor(pi)]).numpy()

    @classmethod
    def encode(cls, ranker, texts, progress=False, role=None):
        """Embeddings ``[len(texts), dim]`` (float32) of ``texts`` as ``role`` (``query``,
        ``passage``, None: no role), with the model's prompt for it."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        model = ranker.loaded.model
        features = ranker.tokenizer(with_prompt(model, texts, role), truncation=True,
                                    max_length=max_length_of(model, ranker.max_length))
        features = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = None
        for idx, batch in sorted_batches(ranker.tokenizer, features, ranker.batch_size, progress, "encoding"):
            emb = ranker.runner(dict(batch))
            if out is None:
                out = np.empty((len(texts), emb.shape[-1]), dtype=np.float32)
            out[idx] = emb
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    @classmethod
    def head_scores(cls, ranker, queries, passages, progress=False):
        """Every head's score of each pair, in the input order: ``dense`` and, for a model with
        BGE-M3 heads (``common.models.m3``), ``sparse``, ``colbert`` and their weighted
        ``combined`` sum; each query's passages go in batches beside it. On the onnx / onnx-int8
        backends the heads come from the graph's ``sparse_weights`` / ``colbert_vecs`` outputs
        (``dense`` from its ``output``), the per-id max and the scores computed from them; a graph
        without those outputs (one exported before the heads were) and every other backend run
        the heads in torch fp32 on the model's device."""
        module = m3.heads_of(ranker.loaded.model)
        if module is None:
            return {"dense": ranker.score(queries, passages, progress)}
        if ranker.query_ranker is not None:
            raise ValueError("sparse and ColBERT scores need the model's own query side (no query encoder)")
        model, pooling = ranker.loaded.model, ranker.loaded.model.config.slimrank_pooling
        graph = getattr(ranker.runner, "outputs", None)
        if graph is not None and set(m3.graph_outputs(model)) <= set(graph):
            def represent(texts):
                batch = ranker.tokenizer(texts, truncation=True, max_length=ranker.max_length, padding=True,
                                         return_tensors="np")
                return m3.from_graph_outputs(ranker.runner.named(batch, m3.graph_outputs(model)),
                                             batch["input_ids"], batch["attention_mask"], module)
        else:
            def represent(texts):
                return m3.encode_all(model, ranker.tokenizer, texts, pooling, ranker.max_length)
        names = ["dense", *(n for n in ("sparse", "colbert") if n in module.heads), "combined"]
        out = {name: np.empty(len(queries), dtype=np.float32) for name in names}
        rows: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            rows.setdefault(query, []).append(i)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for query, idx in rows.items():
                    q = represent([query])
                    for start in range(0, len(idx), ranker.batch_size):
                        part = idx[start:start + ranker.batch_size]
                        p = represent([passages[i] for i in part])
                        for name, value in m3.score_matrices(q, p).items():
                            out[name][part] = value[0].float().cpu().numpy()
        finally:
            model.train(was_training)
        return out

    @staticmethod
    def sequences_per_query(n_pairs):
        return n_pairs + 1  # the passages and the query, each encoded alone

    @classmethod
    def extra_costs(cls, ranker, candidates, opts, device, passages: int = 1000):
        """Corpus-encoding throughput (what indexing costs): passages/s over the first
        ``passages`` distinct candidate passages, batches of 64, mean ± std over repeats."""
        texts = list(dict.fromkeys(candidates["passage"]))[:passages]
        encoder = type(ranker).from_loaded(ranker.loaded, ranker.backend, max_length=ranker.max_length,
                                           batch_size=64)
        mean_ms, std_ms = time_callable(lambda: encoder.encode(texts), max(1, opts.repeats - 1),
                                        min(opts.warmup, 1), device)
        return {"encode_passages_per_s": len(texts) / (mean_ms / 1000),
                "encode_passages_per_s_std": len(texts) * std_ms / 1000 / (mean_ms / 1000) ** 2,
                "encode_passages": len(texts)}


    @classmethod
    def build(cls, path, tokenizer, head, pooling):
        model = bare_encoder(path, pooling)
        _attach_embedding_spec(model, path, tokenizer)
        return model

    @classmethod
    def empty_model(cls, config, saved_head):
        return AutoModel.from_config(config)

    @classmethod
    def finish_loaded(cls, model, config, saved_head):
        if st_format.EmbeddingSpec.from_config(config).dense:
            model.slimrank_dense = st_format.dense_module(st_format.EmbeddingSpec.from_config(config).dense)
        return model

    @classmethod
    def set_query_instruction(cls, model, query_instruction):
        if query_instruction is not None:  # the sentence-transformers `query` prompt
            spec = st_format.EmbeddingSpec.from_config(model.config)
            spec.prompts = {**spec.prompts, "query": query_instruction}
            model.config.slimrank_embedding = st_format.spec_dict(spec)

    @classmethod
    def save_files(cls, model, directory, tensors):
        st_format.write_sentence_transformers_files(
            directory, pooling_of(model), getattr(model.config, adapter_for(model.config).cfg_hidden),
            st_format.EmbeddingSpec.from_config(model.config),
            {k: v for k, v in tensors.items() if k.startswith(DENSE_PREFIX)})

    @classmethod
    def stock_config(cls, model, config):
        return "encoder", "AutoModel"

    @classmethod
    def check_args(cls, args, model):
        if args.group_size != 2 or args.distill_loss != "margin_mse":
            raise ValueError("bi-encoders train on triples (--group_size 2, --distill_loss margin_mse)")
        if m3.heads_of(model) is not None and (args.query_encoder or args.distill_scores):
            raise ValueError("a bi-encoder with sparse/ColBERT heads trains with the unified in-batch loss "
                             "on its own queries: drop --query_encoder and --distill_scores")

    @classmethod
    def unused_parameters(cls, model):
        # the embedding is pooled from the last hidden states: a BERT-family pooler gets no gradient
        return [name for name, _ in model.named_parameters() if ".pooler." in f".{name}"]

    @classmethod
    def label_loss(cls, args, model):
        if m3.heads_of(model) is not None:  # BGE-M3 unified training with self-distillation
            return "m3_self_distill", {"temperature": args.temperature}
        return "in_batch_contrastive", {"temperature": args.temperature}

    def embed(self, model: nn.Module, texts: list[str], role: str,
              owner: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """L2-normalised embeddings of ``texts`` as ``role`` (query / passage): ``owner``'s
        sentence-transformers chain (its prompt, maximum length, pooling, Dense layers;
        ``common.models.encoders``) around ``model`` (``owner`` itself, or its DDP wrapper)."""
        owner = owner if owner is not None else model
        batch = self.tokenizer(with_prompt(owner, texts, role), truncation=True,
                               max_length=max_length_of(owner, self.max_length),
                               padding=True, return_tensors="pt").to(self.device)
        with autocast_context(self.device, self.precision):
            hidden = model(**batch).last_hidden_state
        return F.normalize(embedding_of(owner, hidden.float(), batch["attention_mask"]), dim=-1), batch

    def embed_layers(self, model: nn.Module, texts: list[str], role: str) -> list[torch.Tensor]:
        """The embeddings of the model cut after each layer, from ONE forward pass: every
        layer's hidden states pooled (a decoder's through its final norm, as the cut model
        applies it), index k-1 for the first k layers (``common.pruning.l3prune``)."""
        from common.models.arch import adapter_for, get_module
        batch = self.tokenizer(with_prompt(model, texts, role), truncation=True,
                               max_length=max_length_of(model, self.max_length),
                               padding=True, return_tensors="pt").to(self.device)
        adapter = adapter_for(model.config)
        norm = get_module(model.base_model, adapter.final_norm) if adapter.final_norm else None
        with autocast_context(self.device, self.precision):
            states = model(**batch, output_hidden_states=True).hidden_states[1:]
            if norm is not None:  # the last entry is already normed (it is last_hidden_state)
                states = [norm(h) for h in states[:-1]] + [states[-1]]
        return [F.normalize(embedding_of(model, h.float(), batch["attention_mask"]), dim=-1) for h in states]

    def _texts(self, rows):
        """The rows' queries and passages (``embed`` puts each role's prompt before them)."""
        return [row[0] for row in rows], [x for _q, p, n in rows for x in (p, n)]

    def embed_heads(self, model: nn.Module, texts: list[str]) -> tuple[dict, dict]:
        """Every head's representation (``common.models.m3.represent``) of ``texts``."""
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.device)
        with autocast_context(self.device, self.precision):
            hidden = model(**batch).last_hidden_state
        return m3.represent(hidden.float(), batch, pooling_of(self.model), m3.heads_of(self.model)), batch

    def forward(self, model, rows, wanted):
        queries, passages = self._texts(rows)
        if "head_scores" in wanted:
            q, _ = self.embed_heads(model, queries)
            p, batch = self.embed_heads(model, passages)
            inputs = {"query_embeddings": q["dense"], "passage_embeddings": p["dense"],
                      "head_scores": m3.score_matrices(q, p, combined=False)}
            if "scores" in wanted:
                inputs["scores"] = pair_cosines(q["dense"], p["dense"])
            return Forward(inputs, batch, {})
        if self.query_encoder is None:
            q, _ = self.embed(model, queries, "query", self.model)
        else:
            with torch.no_grad():
                q, _ = self.embed(self.query_encoder, queries, "query")
        p, batch = self.embed(model, passages, "passage", self.model)
        inputs = {"query_embeddings": q, "passage_embeddings": p}
        if "scores" in wanted:
            inputs["scores"] = pair_cosines(q, p)
        return Forward(inputs, batch, {})

    def teacher_forward(self, teacher, rows, student):
        queries, passages = self._texts(rows)
        if self._teacher_cache is not None:
            return {"query_embeddings": self._cached("query", queries),
                    "passage_embeddings": self._cached("passage", passages)}
        tq, _ = self.embed(teacher, queries, "query")
        tp, _ = self.embed(teacher, passages, "passage")
        return {"query_embeddings": tq, "passage_embeddings": tp}

    def cache_teacher(self, teacher, rows, progress=False, batch_size=64):
        """The teacher's embeddings of every distinct query and passage of ``rows``, each role
        in batches of texts sorted by (characters, text): the values depend on the rows alone,
        not on how a stage's batches group them (the same when a stage is resumed). What
        ``embed`` computes, up to the rounding of other padding."""
        texts: dict[str, set[str]] = {"query": set(), "passage": set()}
        for row in rows:
            texts["query"].add(row[0])
            texts["passage"].update(row[1:])
        cache = {}
        with torch.no_grad():
            for role, found in texts.items():
                ordered = sorted(found, key=lambda t: (len(t), t))
                parts = [self.embed(teacher, ordered[i:i + batch_size], role)[0]
                         for i in tqdm(range(0, len(ordered), batch_size), desc=f"teacher cache, {role} texts",
                                       unit="batch", disable=not progress, dynamic_ncols=True)]
                cache[role] = ({t: i for i, t in enumerate(ordered)},
                               torch.cat(parts) if parts else torch.empty(0, device=self.device))
        self._teacher_cache = cache
        return sum(len(found) for found in texts.values())

    def _cached(self, role: str, texts: list[str]) -> torch.Tensor:
        index, table = self._teacher_cache[role]
        missing = [t for t in texts if t not in index]
        if missing:
            raise RuntimeError(f"--cache_teacher: {len(missing)} {role} text(s) of this batch were not cached "
                               f"(first: {missing[0][:60]!r})")
        return table[torch.as_tensor([index[t] for t in texts], device=table.device)]

    def distill_inputs(self, student, teacher, target):
        q, p = student.inputs["query_embeddings"], student.inputs["passage_embeddings"]
        tq, tp = teacher["query_embeddings"], teacher["passage_embeddings"]
        if target == "embeddings":
            return ([p], [tp]) if self.query_encoder is not None else ([q, p], [tq, tp])
        return pair_cosines(q, p), pair_cosines(tq, tp)

    def combine(self, task, distill, args):
        return args.contrastive_weight * task + args.distill_weight * distill
