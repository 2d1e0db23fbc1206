"""Bi-encoder (dual encoder) embeddings: the teacher side of cross-encoder distillation.

* ``load_encoder(path_or_tag)`` -> ``(model, tokenizer, pooling)``: a transformers
  ``AutoModel`` (the base encoder, no head), its tokenizer, and the pooling the model was
  trained with, read from a sentence-transformers directory (``modules.json`` ->
  the ``Pooling`` module's ``config.json``, by default ``1_Pooling/config.json``:
  ``pooling_mode_mean_tokens`` / ``pooling_mode_cls_token``). A plain Hugging Face directory
  without a pooling config gets mean pooling. Packaged tags (``all-MiniLM-L6-v2``) resolve
  through ``common.models.names.resolve_model_path``.
* ``encode(model, tokenizer, texts, pooling=...)`` -> ``[len(texts), dim]`` float32 tensor:
  length-sorted batches, no grad, mean over the non-padding tokens of the last hidden state
  (or the first, CLS, token), L2-normalised by default.
* ``bi_scores(query_emb, passage_emb)`` -> cosine similarities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from common.models.names import PACKAGED_MODELS, resolve_model_path
from common.models.st_format import POOLINGS, EmbeddingSpec, canonical_pooling, read_pooling  # noqa: F401 (public here too)

QUERY_ENCODER_FIELD = "slimrank_query_encoder"  # config.json of an asymmetric bi-encoder (common.serving.rank)
INNER_QUERY_ENCODER = "query_encoder"  # where a checkpoint keeps a local query encoder (training copies it in)


def config_path(model_dir: str | Path, name: str, field: str) -> str:
    """A model named by a model dir's config.json (``field``): a directory inside ``model_dir``
    named by a relative path (links followed, it must stay inside), or a packaged tag or hub name
    (``name`` or ``org/name``) that is no path on this machine. Anything else is refused, so a
    config never leads a read, or a copy, out of its directory: an absolute path, ``~``, ``..``
    or a link out of the dir, a name that exists here outside the dir (transformers would open
    it, relative to the working directory). A model elsewhere is named on the command line
    (``--query_encoder PATH``), never by a config."""
    name = str(name)
    where = f"{Path(model_dir, 'config.json')}: {field} {name!r}"
    how = ("refused (a model dir names a directory inside it, or a packaged tag or hub name; name a "
           "model elsewhere on the command line: --query_encoder PATH)")
    if not name.strip() or Path(name).is_absolute() or name.startswith("~") or "\\" in name:
        raise ValueError(f"{where} is not a relative path inside the model dir: {how}")
    root = Path(model_dir).resolve()
    inside = (root / name).resolve()
    if inside == root:
        raise ValueError(f"{where} names the model dir itself: {how}")
    if root in inside.parents:
        if inside.is_dir():
            return str(Path(model_dir, name))
    elif (root / name).exists() or ".." in Path(name).parts:
        raise ValueError(f"{where} leads outside the model directory: {how}")
    if Path(name).exists():
        raise ValueError(f"{where} is no directory inside the model dir but a path here "
                         f"({Path(name).resolve()}): {how}")
    if name in PACKAGED_MODELS or (name.count("/") <= 1 and not name.startswith(".")):
        return name  # a packaged tag or a hub name
    raise ValueError(f"{where} is neither a directory inside the model dir, nor a packaged tag or hub name: {how}")


def query_encoder_source(name: str) -> tuple[str, str]:
    """A ``--query_encoder`` named on the command line: (what to load, what a checkpoint's
    config stores). A local directory loads by its absolute path and is kept inside every
    checkpoint (``INNER_QUERY_ENCODER``: the checkpoint is self-contained and movable); a
    packaged tag or hub name is stored as it is."""
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve()), INNER_QUERY_ENCODER
    return name, name


def pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool ``[batch, seq, dim]`` hidden states into ``[batch, dim]`` as sentence-transformers'
    Pooling module does (``attention_mask`` marks the real tokens). ``mean``: mean over the real
    tokens; ``cls``: the first position; ``max``: element-wise maximum over the real tokens;
    ``lasttoken``: the last real token (a causal decoder's summary of the whole text);
    ``weightedmean`` (SGPT, for causal decoders): the i-th real token weighs i. Positions are
    counted through ``attention_mask``, so left and right padding give the same result (the
    names of ``common.models.st_format.POOLINGS``; ``last`` / ``weighted_mean`` are aliases)."""
    pooling = canonical_pooling(pooling)
    if pooling == "cls":
        return last_hidden[:, 0]
    mask = attention_mask.to(last_hidden.device)
    if pooling == "max":
        return last_hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if pooling == "lasttoken":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask > 0)).amax(dim=1)
        return last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), last]
    if pooling in ("mean", "weightedmean"):
        weights = mask.to(last_hidden.dtype)
        if pooling == "weightedmean":
            weights = torch.cumsum(weights, dim=1) * weights
        weights = weights.unsqueeze(-1)
        return (last_hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}")


def embedding_of(model: torch.nn.Module, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A bi-encoder's embedding of its last hidden states, as its sentence-transformers chain
    computes it: its pooling, its Dense layers (``slimrank_dense``), L2 normalisation if it has
    a Normalize module (``common.models.st_format.EmbeddingSpec``), in float32."""
    config = model.config
    emb = pool(last_hidden, attention_mask, getattr(config, "slimrank_pooling", "mean")).float()
    for layer in getattr(model, "slimrank_dense", None) or ():
        emb = layer.activation(F.linear(emb, layer.linear.weight.float(),
                                        None if layer.linear.bias is None else layer.linear.bias.float()))
    if EmbeddingSpec.from_config(config).normalize:
        emb = F.normalize(emb, p=2, dim=-1)
    return emb


def instructed(model: torch.nn.Module, queries: list[str]) -> list[str]:
    """``queries`` with the model's query prompt (``--query_instruction``) before each."""
    return with_prompt(model, queries, "query")


def with_prompt(model: torch.nn.Module, texts: list[str], role: str | None) -> list[str]:
    """``texts`` with the model's prompt for ``role`` (``query`` / ``passage``) before each."""
    prompt = EmbeddingSpec.from_config(model.config).prompt(role)
    return [prompt + str(t) for t in texts] if prompt else [str(t) for t in texts]


def max_length_of(model: torch.nn.Module, max_length: int) -> int:
    """``max_length``, capped by the model's own maximum sequence length (sentence-transformers)."""
    bound = EmbeddingSpec.from_config(model.config).max_seq_length
    return min(max_length, bound) if bound else max_length


def similarity(model: torch.nn.Module, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Row-wise score of query and passage embeddings: cosine, or the dot product for a model
    whose sentence-transformers config says ``similarity_fn_name: dot``."""
    if EmbeddingSpec.from_config(model.config).similarity == "cosine":
        q, p = F.normalize(q, p=2, dim=-1), F.normalize(p, p=2, dim=-1)
    return (q * p).sum(dim=-1)


def _base_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder without a task head: ``model.base_model`` when there is one."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


@torch.no_grad()
def encode(model, tokenizer, texts, *, pooling: str = "mean", normalize: bool = True,
           batch_size: int = 64, max_length: int = 256, progress: bool = False,
           head=None) -> torch.Tensor:
    """Embed ``texts`` with a transformers encoder; returns a float32 CPU tensor ``[n, dim]``.

    Texts are tokenised once (truncated to ``max_length``), sorted by length (longest
    first) and padded per batch, so little compute goes to padding; the output rows are in
    the input order. ``model`` may be an ``AutoModel`` or a model with a head, whose
    ``base_model`` is used. ``pooling`` is one of ``POOLINGS`` (:func:`pool`).
    With ``normalize`` the rows are L2-normalised (dot product = cosine). ``head``
    (``(hidden, attention_mask) -> embeddings``) replaces pooling and normalisation."""
    pooling = canonical_pooling(pooling)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = [str(t) for t in texts]
    encoder = _base_encoder(model)
    try:
        device = next(encoder.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        device = torch.device("cpu")
    dim = getattr(getattr(encoder, "config", None), "hidden_size", None)
    if not texts:
        return torch.empty((0, dim or 0), dtype=torch.float32)

    was_training = encoder.training
    encoder.eval()
    features = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in features.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    lengths = np.array([len(ids) for ids in features["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    out: torch.Tensor | None = None
    batches = range(0, len(order), batch_size)
    try:
        for start in tqdm(batches, desc="encoding", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad([{k: features[k][i] for k in keys} for i in idx],
                                  return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = encoder(**batch).last_hidden_state
            if head is not None:
                emb = head(hidden, batch["attention_mask"]).float()
            else:
                emb = pool(hidden, batch["attention_mask"], pooling).float()
                if normalize:
                    emb = F.normalize(emb, p=2, dim=-1)
            if out is None:
                out = torch.empty((len(texts), emb.shape[-1]), dtype=torch.float32)
            out[torch.as_tensor(idx)] = emb.cpu()
    finally:
        encoder.train(was_training)
    return out


def embed_texts(model, tokenizer, texts, role: str | None = None, *, batch_size: int = 64,
                max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """A slimrank bi-encoder's own embeddings of ``texts`` as ``query`` or ``passage`` (its
    prompt before each, its maximum length, pooling, Dense layers and normalisation)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    return encode(model, tokenizer, with_prompt(model, texts, role), batch_size=batch_size,
                  max_length=max_length_of(model, max_length), progress=progress,
                  head=lambda hidden, mask: embedding_of(model, hidden, mask))


def load_encoder(path_or_tag: str, device: str | torch.device = "cpu"):
    """Load a bi-encoder: ``(AutoModel in eval mode, tokenizer, pooling)``.

    ``path_or_tag`` is a directory, a packaged tag (``all-MiniLM-L6-v2``) or a hub name.
    The pooling comes from the directory's sentence-transformers config (see module doc)."""
    path = resolve_model_path(path_or_tag)
    pooling = read_pooling(path) if Path(path).is_dir() else "mean"
    model = AutoModel.from_pretrained(path, trust_remote_code=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer, pooling


def bi_scores(query_emb: torch.Tensor, passage_emb: torch.Tensor, *, pairwise: bool = False
              ) -> torch.Tensor:
    """Cosine similarities between query and passage embeddings.

    Default: every query against every passage, ``[nq, np]`` (a 1-D query gives ``[np]``).
    ``pairwise=True``: row ``i`` of ``query_emb`` against row ``i`` of ``passage_emb``, ``[n]``.
    Inputs need not be normalised."""
    q = F.normalize(torch.as_tensor(query_emb).float(), p=2, dim=-1)
    p = F.normalize(torch.as_tensor(passage_emb).float(), p=2, dim=-1)
    if pairwise:
        if q.shape != p.shape:
            raise ValueError(f"pairwise needs equal shapes, got {tuple(q.shape)} and {tuple(p.shape)}")
        return (q * p).sum(dim=-1)
    return q @ p.T
