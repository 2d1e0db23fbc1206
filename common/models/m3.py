"""BGE-M3's three heads on a bi-encoder: dense, sparse (lexical weights) and ColBERT (multi-vector).

As FlagEmbedding's M3 embedder (``BGEM3Model`` / ``EncoderOnlyEmbedderM3Model``) defines them:

* dense: the model's pooled embedding (its pooling: CLS for BGE-M3, mean for MiniLM), normalised;
  score = dot product (cosine);
* sparse: ``ReLU(sparse_linear(h_t))`` for each token t (``sparse_linear``: hidden -> 1), the max
  over a text's tokens per vocabulary id, special tokens (CLS, SEP/EOS, PAD, UNK, ...) weighted 0;
  score = dot product of the two vocabulary-sized vectors (the shared tokens' weight products);
* ColBERT: ``colbert_linear(h_t)`` (hidden -> hidden) for every token after the first, padding
  zeroed, L2-normalised; score = MaxSim: for each query token the best cosine over the passage's
  tokens, averaged over the query's tokens.

The heads are plain ``nn.Linear`` maps, initialised as ``nn.Linear`` initialises them (what
FlagEmbedding does for a model without them) or loaded from a BGE-M3 dir's ``sparse_linear.pt``
and ``colbert_linear.pt`` (``torch.load(weights_only=True)``), and saved the same way beside the
model, so the files are FlagEmbedding's. On a loaded model they live in ``model.m3_heads`` (a
submodule: the optimiser trains them, pruning and reshaping leave them alone, as they act on
the hidden size, which neither changes); ``config.slimrank_heads`` lists the heads.

Unified training with self-distillation (:func:`self_distill_loss`) is the seed's
``unified_finetuning`` + ``use_self_distill``: each head's cross-entropy and the ensemble's
(``1 * dense + 0.3 * sparse + 1 * colbert``), then the KL-style soft cross-entropy of each head
from the ensemble's (detached) softmax.

The ONNX export of a model with heads (:class:`HeadOutputs`) outputs the dense embedding
(``output``), the token weights (``sparse_weights``) and the ColBERT vectors (``colbert_vecs``);
:func:`from_graph_outputs` turns them back into :func:`represent`'s dict.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.io import atomic_output, save_torch

HEAD_NAMES = ("dense", "sparse", "colbert")
HEAD_FILES = {"sparse": "sparse_linear.pt", "colbert": "colbert_linear.pt"}
ENSEMBLE_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
HEADS_FIELD = "slimrank_heads"  # config.json: the heads a bi model carries


def parse_heads(text: str | None) -> tuple[str, ...]:
    """``dense,sparse,colbert`` (any subset that includes dense, in that order)."""
    names = tuple(n.strip() for n in (text or "dense").split(",") if n.strip())
    unknown = [n for n in names if n not in HEAD_NAMES]
    if unknown or "dense" not in names or len(set(names)) != len(names):
        raise ValueError(f"--heads must be dense plus any of sparse, colbert (comma-separated), got {text!r}")
    return tuple(n for n in HEAD_NAMES if n in names)


class M3Heads(nn.Module):
    """The sparse and ColBERT linear maps of one encoder (either may be absent)."""

    def __init__(self, hidden: int, vocab_size: int, special_ids, heads=HEAD_NAMES,
                 colbert_dim: int | None = None):
        super().__init__()
        self.heads = tuple(heads)
        self.vocab_size = vocab_size
        self.special_ids = sorted({int(i) for i in special_ids if i is not None})
        self.sparse_linear = nn.Linear(hidden, 1) if "sparse" in heads else None
        self.colbert_linear = nn.Linear(hidden, colbert_dim or hidden) if "colbert" in heads else None

    def token_weights(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, seq]`` ReLU weight of each token, 0 for special tokens and padding (what the
        ONNX export outputs as ``sparse_weights``; :func:`lexical_max` takes the max per id)."""
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        keep = torch.ones_like(weights)
        if self.special_ids:
            special = torch.tensor(self.special_ids, dtype=input_ids.dtype, device=input_ids.device)
            keep = ((input_ids[..., None] == special).sum(-1) == 0).to(weights.dtype)
        if attention_mask is not None:
            keep = keep * attention_mask.to(weights.dtype)
        return weights * keep

    def sparse(self, hidden: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, vocab]`` lexical weights: the max ReLU weight of each token id in a text,
        0 for ids absent from it and for special tokens (padding is a special token)."""
        return lexical_max(self.token_weights(hidden, input_ids, attention_mask), input_ids, self.vocab_size)

    def colbert(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([batch, seq - 1, dim], mask [batch, seq - 1])``: the tokens after the first, mapped,
        padding zeroed, L2-normalised."""
        mask = attention_mask[:, 1:]
        vectors = self.colbert_linear(hidden[:, 1:]) * mask[..., None].to(hidden.dtype)
        return F.normalize(vectors, p=2, dim=-1), mask


def lexical_max(weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[batch, vocab]``: the max of each token id's ``[batch, seq]`` weights (>= 0) in a text,
    0 for ids absent from it (FlagEmbedding's ``_process_token_weights``, as a dense vector)."""
    out = torch.zeros(input_ids.shape[0], vocab_size, dtype=weights.dtype, device=weights.device)
    return out.scatter_reduce(-1, input_ids.long(), weights, reduce="amax", include_self=True)


def sparse_scores(query: torch.Tensor, passage: torch.Tensor) -> torch.Tensor:
    """``[nq, np]`` dot products of lexical-weight vectors."""
    return query @ passage.T


def maxsim(query: torch.Tensor, query_mask: torch.Tensor, passage: torch.Tensor,
           passage_mask: torch.Tensor) -> torch.Tensor:
    """``[nq, np]`` ColBERT scores: for each real query token its best dot product over the
    passage's real tokens, summed and divided by the query's token count."""
    sims = torch.einsum("qid,pjd->qpij", query, passage)
    sims = sims.masked_fill(~passage_mask.bool()[None, :, None, :], float("-inf"))
    best = sims.max(dim=-1).values * query_mask[:, None, :].to(sims.dtype)
    return best.sum(-1) / query_mask.sum(-1, keepdim=True).clamp(min=1).to(sims.dtype)


def ensemble(scores: dict[str, torch.Tensor], weights: dict[str, float] = ENSEMBLE_WEIGHTS) -> torch.Tensor:
    """The weighted sum of the heads' scores (the heads present in ``scores``)."""
    return sum(weights[name] * value for name, value in scores.items())


# ----------------------------------------------------------------------------- on a model


def special_ids_of(tokenizer) -> list[int]:
    return list(tokenizer.all_special_ids)


def attach_heads(model: nn.Module, tokenizer, heads, directory: str | Path | None = None) -> M3Heads:
    """Give ``model`` (a bi-encoder) the sparse / ColBERT heads of ``heads``: loaded from
    ``directory``'s ``sparse_linear.pt`` / ``colbert_linear.pt`` when they are there, else
    initialised as ``nn.Linear`` initialises them."""
    heads = parse_heads(",".join(heads)) if not isinstance(heads, str) else parse_heads(heads)
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    colbert_dim = None
    files = {name: Path(directory, HEAD_FILES[name]) for name in heads if name in HEAD_FILES} if directory else {}
    states = {}
    for name, file in files.items():
        if file.is_file():
            try:
                states[name] = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # a pickle that is not plain tensors, a torn file
                raise ValueError(f"{file}: not a state dict of plain tensors ({type(err).__name__}: {err})") from None
            if set(states[name]) != {"weight", "bias"}:
                raise ValueError(f"{file}: expected the keys weight and bias of a linear map, got {sorted(states[name])}")
    if "colbert" in states:
        colbert_dim = int(states["colbert"]["weight"].shape[0])
    module = M3Heads(hidden, config.vocab_size, special_ids_of(tokenizer), heads, colbert_dim)
    for name, state in states.items():
        linear = getattr(module, f"{name}_linear")
        if tuple(state["weight"].shape) != tuple(linear.weight.shape):
            raise ValueError(f"{files[name]}: weight {tuple(state['weight'].shape)}, the model needs "
                             f"{tuple(linear.weight.shape)} (hidden size {hidden})")
        linear.load_state_dict(state)
    device = next(model.parameters()).device
    model.m3_heads = module.to(device)
    setattr(config, HEADS_FIELD, list(heads))
    return module


def heads_of(model: nn.Module) -> M3Heads | None:
    return getattr(model, "m3_heads", None)


def save_heads(model: nn.Module, directory: str | Path) -> None:
    """``sparse_linear.pt`` / ``colbert_linear.pt`` (each a linear map's state dict), atomically."""
    module = heads_of(model)
    if module is None:
        return
    for name in module.heads:
        if name in HEAD_FILES:
            state = {k: v.detach().to("cpu").contiguous().clone()
                     for k, v in getattr(module, f"{name}_linear").state_dict().items()}
            with atomic_output(Path(directory) / HEAD_FILES[name]) as tmp:
                save_torch(state, tmp)


HEADS_PREFIX = "m3_heads."  # the heads' tensors in a model's state dict (saved to their own files)


def represent(hidden: torch.Tensor, batch: dict, pooling: str, module: M3Heads | None) -> dict:
    """Each head's representation from the last hidden states of one tokenised batch: ``dense``
    (pooled, normalised), ``sparse`` (``[batch, vocab]``), ``colbert`` (vectors, mask)."""
    from common.models.encoders import pool

    out = {"dense": F.normalize(pool(hidden, batch["attention_mask"], pooling), p=2, dim=-1)}
    if module is not None and module.sparse_linear is not None:
        out["sparse"] = module.sparse(hidden, batch["input_ids"], batch["attention_mask"])
    if module is not None and module.colbert_linear is not None:
        out["colbert"] = module.colbert(hidden, batch["attention_mask"])
    return out


def encode_all(model: nn.Module, tokenizer, texts: list[str], pooling: str, max_length: int = 256) -> dict:
    """Every head's representation of ``texts`` (one padded batch; for small sets and tests)."""
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    encoder = getattr(model, "base_model", model)
    return represent(encoder(**batch).last_hidden_state.float(), batch, pooling, heads_of(model))


def score_matrices(queries: dict, passages: dict, weights: dict[str, float] = ENSEMBLE_WEIGHTS,
                   combined: bool = True) -> dict:
    """``[nq, np]`` scores of each head present in both, and their weighted ``combined`` sum."""
    scores = {"dense": queries["dense"] @ passages["dense"].T}
    if "sparse" in queries and "sparse" in passages:
        scores["sparse"] = sparse_scores(queries["sparse"], passages["sparse"])
    if "colbert" in queries and "colbert" in passages:
        scores["colbert"] = maxsim(*queries["colbert"], *passages["colbert"])
    if combined:
        scores["combined"] = ensemble(scores, weights)
    return scores


# ----------------------------------------------------------------------------- in an ONNX graph

# a bi model's exported graph (common.serving.onnx_export): the embedding under the name every
# export's first output has, then, with heads, each head's per-token representation
GRAPH_OUTPUTS = {"dense": "output", "sparse": "sparse_weights", "colbert": "colbert_vecs"}
GRAPH_AXES = {"output": {0: "batch"}, "sparse_weights": {0: "batch", 1: "sequence"},
              "colbert_vecs": {0: "batch", 1: "colbert_tokens"}}  # colbert_tokens = sequence - 1


def graph_outputs(model: nn.Module) -> list[str]:
    """The outputs of ``model``'s exported graph, in order: ``output`` alone for a model without
    heads (every kind), then ``sparse_weights`` / ``colbert_vecs`` for the heads it carries."""
    module = heads_of(model)
    return [GRAPH_OUTPUTS[name] for name in (module.heads if module is not None else ("dense",))]


class HeadOutputs(nn.Module):
    """The graph a bi model with heads is exported as: ``(embedding, sparse_weights,
    colbert_vecs)`` (those of its heads), per text: the embedding its ``RankingOutput`` gives,
    ``[batch, seq]`` token weights (:meth:`M3Heads.token_weights`: after ReLU, special tokens and
    padding 0) and ``[batch, seq - 1, dim]`` ColBERT vectors (L2-normalised, padding zeroed).
    The wrapped model is the attribute ``model``, as in ``RankingOutput`` (the graph's node names
    follow module paths)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from common.models.encoders import embedding_of

        encoder = getattr(self.model, "base_model", self.model)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        module = heads_of(self.model)
        out = [embedding_of(self.model, hidden, attention_mask)]
        if module.sparse_linear is not None:
            out.append(module.token_weights(hidden.float(), input_ids, attention_mask))
        if module.colbert_linear is not None:
            out.append(module.colbert(hidden.float(), attention_mask)[0])
        return tuple(out)


def from_graph_outputs(outputs: dict, input_ids, attention_mask, module: M3Heads) -> dict:
    """:func:`represent`'s dict from an exported graph's outputs (name -> array) on one batch:
    the per-id max of ``sparse_weights`` (:func:`lexical_max`), ``colbert_vecs`` with their mask."""
    input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
    out = {"dense": torch.as_tensor(outputs[GRAPH_OUTPUTS["dense"]]).float()}
    if module.sparse_linear is not None:
        out["sparse"] = lexical_max(torch.as_tensor(outputs[GRAPH_OUTPUTS["sparse"]]).float(), input_ids,
                                    module.vocab_size)
    if module.colbert_linear is not None:
        out["colbert"] = (torch.as_tensor(outputs[GRAPH_OUTPUTS["colbert"]]).float(), attention_mask[:, 1:])
    return out
