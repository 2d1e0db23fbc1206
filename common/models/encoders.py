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

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from common.models.names import resolve_model_path

POOLINGS = ("mean", "cls", "weighted_mean", "last")
# sentence-transformers' Pooling config field of each pooling
ST_POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "weighted_mean": "pooling_mode_weightedmean_tokens", "last": "pooling_mode_lasttoken"}


def pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool ``[batch, seq, dim]`` hidden states into ``[batch, dim]``.

    ``mean``: average over the positions where ``attention_mask`` is 1 (padding ignored);
    ``cls``: the first position; ``weighted_mean`` (SGPT, for causal decoders): the i-th
    non-padding token weighs i (later tokens have seen more of the text); ``last``: the last
    non-padding token (a causal decoder's summary of the whole text). Both count positions
    through ``attention_mask``, so left and right padding give the same result."""
    if pooling == "cls":
        return last_hidden[:, 0]
    mask = attention_mask.to(last_hidden.device)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask > 0)).amax(dim=1)
        return last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), last]
    if pooling in ("mean", "weighted_mean"):
        weights = mask.to(last_hidden.dtype)
        if pooling == "weighted_mean":
            weights = torch.cumsum(weights, dim=1) * weights
        weights = weights.unsqueeze(-1)
        summed = (last_hidden * weights).sum(dim=1)
        return summed / weights.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _base_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder without a task head: ``model.base_model`` when there is one."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


@torch.no_grad()
def encode(model, tokenizer, texts, *, pooling: str = "mean", normalize: bool = True,
           batch_size: int = 64, max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """Embed ``texts`` with a transformers encoder; returns a float32 CPU tensor ``[n, dim]``.

    Texts are tokenised once (truncated to ``max_length``), sorted by length (longest
    first) and padded per batch, so little compute goes to padding; the output rows are in
    the input order. ``model`` may be an ``AutoModel`` or a model with a head, whose
    ``base_model`` is used. ``pooling`` is ``mean`` (over non-padding tokens) or ``cls``.
    With ``normalize`` the rows are L2-normalised (dot product = cosine)."""
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
            emb = pool(hidden, batch["attention_mask"], pooling).float()
            if normalize:
                emb = F.normalize(emb, p=2, dim=-1)
            if out is None:
                out = torch.empty((len(texts), emb.shape[-1]), dtype=torch.float32)
            out[torch.as_tensor(idx)] = emb.cpu()
    finally:
        encoder.train(was_training)
    return out


def _pooling_config(path: Path) -> Path | None:
    """The sentence-transformers pooling config of a model directory, if it has one."""
    modules = path / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{modules}: not valid JSON: {err}") from err
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                config = path / entry.get("path", "") / "config.json"
                if config.is_file():
                    return config
    default = path / "1_Pooling" / "config.json"
    return default if default.is_file() else None


QUERY_INSTRUCTION_FIELD = "slimrank_query_instruction"  # config.json of a bi-encoder


def instructed(model, queries: list[str]) -> list[str]:
    """``queries`` with the model's query instruction (if it has one) in front of each."""
    config = getattr(_base_encoder(model), "config", None)
    instruction = getattr(config, QUERY_INSTRUCTION_FIELD, None)
    return [instruction + q for q in queries] if instruction else list(queries)


def read_query_prompt(path_or_tag: str) -> str | None:
    """The ``query`` prompt of a sentence-transformers directory (config_sentence_transformers.json)."""
    path = Path(resolve_model_path(path_or_tag), "config_sentence_transformers.json")
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    prompt = (config.get("prompts") or {}).get("query") if isinstance(config, dict) else None
    return prompt or None


def read_pooling(path_or_tag: str, default: str = "mean") -> str:
    """The pooling a model directory declares; ``default`` without config.

    A sentence-transformers config asking for a mode this module does not implement (max,
    mean_sqrt_len, several at once) raises ``ValueError``."""
    path = Path(resolve_model_path(path_or_tag))
    config_path = _pooling_config(path) if path.is_dir() else None
    if config_path is None:
        return default
    config = json.loads(config_path.read_text(encoding="utf-8"))
    modes = [name for name, on in config.items()
             if name.startswith("pooling_mode_") and on is True]
    by_mode = {mode: name for name, mode in ST_POOLING_MODES.items()}
    if len(modes) == 1 and modes[0] in by_mode:
        return by_mode[modes[0]]
    raise ValueError(f"{config_path}: unsupported pooling {modes or config.get('pooling_mode')!r}; "
                     f"only one of {', '.join(ST_POOLING_MODES.values())} alone")


def load_encoder(path_or_tag: str, device: str | torch.device = "cpu"):
    """Load a bi-encoder: ``(AutoModel in eval mode, tokenizer, pooling)``.

    ``path_or_tag`` is a directory, a packaged tag (``all-MiniLM-L6-v2``) or a hub name.
    The pooling comes from the directory's sentence-transformers config (see module doc)."""
    path = resolve_model_path(path_or_tag)
    pooling = read_pooling(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
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
