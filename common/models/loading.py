"""What loading, saving and scoring share across model kinds: pair encoding and length-sorted
batches, the relevance logit, autocast, devices, the bare encoder and a trained head's labels,
config paths, layer dropping.

The loader and saver themselves (``load_model``, ``save_model``, ``reshape_checkpoint``,
``LoadedModel``) are ``common.kinds.loading``'s: what differs by kind (cross-encoder, bi-encoder)
is the kind's class (``common.kinds``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, BatchEncoding

from common.models.arch import adapter_for, layer_stack, set_module
from common.models.decoders import is_decoder
from common.models.encoders import (INNER_QUERY_ENCODER, QUERY_ENCODER_FIELD, config_path,  # noqa: F401 (public here too)
                                    read_pooling)
from common.models import st_format
from common.models.names import PACKAGED_MODELS, resolve_model_path  # noqa: F401 (public here too)
from common.io import atomic_write_text
from common.models.segment import SegmentCrossEncoder, encode_segment_pairs, is_segment

NUM_LABELS = 2  # a fresh classification head (a base model): monoBERT's two labels
HEAD_LABELS = (1, 2)  # a trained head: one logit, or the relevant (index 1) of two
DENSE_PREFIX = "slimrank_dense."  # a bi-encoder's Dense layers (common.models.st_format)
MODELING_FILE = "modeling_slimrank.py"  # common/standalone.py, copied into every model dir
# what stock tools read from config.json (save_model writes them; our loader ignores them)
STOCK_FIELDS = ("auto_map", "slimrank_layout")


def pooling_of(model: nn.Module) -> str:
    return getattr(model.config, "slimrank_pooling", "mean")


def bare_encoder(path: str, pooling: str | None) -> nn.Module:
    """The bare encoder of a plain model (``AutoModel``; a decoder LLM's too) with its pooling:
    ``pooling``, else the directory's sentence-transformers config, else ``lasttoken`` for a
    decoder and ``mean`` for the rest."""
    model, info = AutoModel.from_pretrained(path, trust_remote_code=False, output_loading_info=True)
    check_weights_found(model, info, path)
    default = "lasttoken" if is_decoder(model.config) else "mean"
    model.config.slimrank_pooling = st_format.canonical_pooling(
        pooling or (read_pooling(path, default) if Path(path).is_dir() else default))
    return model


def check_weights_found(model: nn.Module, info: dict, path: str) -> None:
    """Refuse weights that do not belong to the architecture ``config.json`` declares: an
    encoder weight the file lacks would be left at its random initialisation (only a fresh
    head, and a pooler, may be missing), so the model would silently not be the one named."""
    base = getattr(model, "base_model_prefix", "")
    names = {n for n, _ in model.named_parameters()}
    encoder = {n for n in names if not base or n.startswith(base + ".") or not hasattr(model, base)}
    missing = [k for k in info.get("missing_keys", []) if k in encoder and "pooler" not in k]
    if missing:
        model_type = getattr(model.config, "model_type", "?")
        unexpected = list(info.get("unexpected_keys", []))
        raise ValueError(f"{path}: its weights do not match its config.json (model_type {model_type!r}): "
                         f"{len(missing)} of {len(encoder)} encoder weights missing (e.g. {missing[0]!r})"
                         + (f", {len(unexpected)} unexpected (e.g. {unexpected[0]!r})" if unexpected else "")
                         + ": it would run with random weights")


def trained_head_labels(path: str) -> int | None:
    """The label count of a sequence-classification checkpoint's trained head (its config names
    a ``*ForSequenceClassification`` architecture); None for a base model (a fresh head is made).
    A head of another size than 1 or 2 labels is one error naming the config file."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if not any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or ())):
        return None
    if config.num_labels not in HEAD_LABELS:
        where = Path(path, "config.json") if Path(path).is_dir() else path
        raise ValueError(f"{where}: a sequence-classification head with {config.num_labels} labels; slimrank "
                         "scores a pair by a 1-label head (the logit) or a 2-label one (the logit of label 1)")
    return config.num_labels


def segment_pair_template(tokenizer_json: Path) -> None:
    """Make the saved tokenizer encode a pair as the segment head's layout: each text as it is
    encoded alone, one after the other, all token type 0 (``[CLS] q [SEP] [CLS] p [SEP]``), so
    that stock tools that tokenise (query, passage) pairs feed the model what it was trained on.

    The template lives in tokenizer.json; ``tokenizer_class: PreTrainedTokenizerFast`` makes
    transformers use that file as it is (BertTokenizer would rebuild its own pair template)."""
    config_json = tokenizer_json.with_name("tokenizer_config.json")
    if not (tokenizer_json.is_file() and config_json.is_file()):
        return
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    processor = data.get("post_processor") or {}
    if processor.get("type") != "TemplateProcessing":
        return
    second = [{"Sequence": {"id": "B", "type_id": 0}} if "Sequence" in item else item
              for item in processor["single"]]
    processor["pair"] = processor["single"] + second
    tokenizer_config = json.loads(config_json.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for path, obj in ((tokenizer_json, data), (config_json, tokenizer_config)):
        atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def plain_state_dict(model: nn.Module) -> dict:
    """The model's weights as a plain model holds them: LoRA adapters (``common.models.lora``)
    merged into the weights they adapt, their own tensors left out."""
    from common.models.lora import merged_state_dict  # peft is imported only when LoRA is used
    return merged_state_dict(model)


def model_depth(path_or_tag: str) -> int:
    """The layer count of a model (from its config.json, without loading the weights)."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path_or_tag), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the config of {path_or_tag}: {str(err).splitlines()[0]}") from None
    return getattr(config, adapter_for(config).cfg_layers)


def keep_first_layers(loaded, n: int, note: dict | None = None) -> None:
    """Layer dropping (the L3Prune baseline): keep the first ``n`` transformer layers.

    The saved config then describes an ``n``-layer model, so the loader needs nothing else;
    ``note`` (how n was chosen) goes into the pruning history beside it."""
    adapter = adapter_for(loaded.model.config)
    stack = layer_stack(loaded.model, adapter)
    if not 1 <= n <= len(stack):
        raise ValueError(f"--keep_layers must be within 1..{len(stack)}, got {n}")
    set_module(loaded.model.base_model, adapter.layers, nn.ModuleList(list(stack)[:n]))
    if isinstance(loaded.model, SegmentCrossEncoder):
        loaded.model.keep_layers(n)
    setattr(loaded.model.config, adapter.cfg_layers, n)
    if isinstance(getattr(loaded.model.config, "layer_types", None), list):  # ModernBERT, Qwen2/3, Mistral: per layer
        loaded.model.config.layer_types = loaded.model.config.layer_types[:n]
    state = loaded.state
    for name in ("present_heads", "present_ffn", "kept_heads", "kept_ffn"):
        setattr(state, name, getattr(state, name)[:n])
    state.history.append({"keep_layers": n, **(note or {})})


def encode_pairs(tokenizer, queries: list[str], passages: list[str], max_length: int,
                 model: nn.Module | None = None, padding: bool = True):
    """Tokenise (query, passage) pairs for ``model``'s head: the tokenizer's pair template,
    truncating only the passage, or the segment layout (``common.models.segment``)."""
    if model is not None and is_segment(model):
        return encode_segment_pairs(tokenizer, queries, passages, max_length, padding=padding)
    long = long_queries(tokenizer, queries, max_length)
    if not long:
        if not padding:
            return tokenizer(queries, passages, truncation="only_second", max_length=max_length)
        return tokenizer(queries, passages, truncation="only_second", max_length=max_length,
                         padding=True, return_tensors="pt")
    # a query that leaves no room for its passage: that pair is truncated longest-first (query
    # and passage cut to about half each), deterministically; every other pair as above
    rest = [i for i in range(len(queries)) if i not in long]
    parts = [(sorted(long), "longest_first"), (rest, "only_second")]
    features: dict[str, list] = {}
    for rows, strategy in parts:
        if not rows:
            continue
        encoded = tokenizer([queries[i] for i in rows], [passages[i] for i in rows],
                            truncation=strategy, max_length=max_length)
        for key, values in encoded.items():
            column = features.setdefault(key, [None] * len(queries))
            for i, value in zip(rows, values):
                column[i] = value
    if not padding:
        return BatchEncoding(features)
    return tokenizer.pad(features, return_tensors="pt")


def long_queries(tokenizer, queries: list[str], max_length: int) -> set[int]:
    """Indices of the queries too long to leave a pair at least one passage token within
    ``max_length`` (each distinct query is tokenised once)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - 1
    distinct = list(dict.fromkeys(queries))
    lengths = dict(zip(distinct, map(len, tokenizer(distinct, add_special_tokens=False)["input_ids"])))
    return {i for i, q in enumerate(queries) if lengths[q] > room}


def relevance_logit(logits: torch.Tensor) -> torch.Tensor:
    """The score of a pair: the relevant-class logit (index 1 of a 2-label head)."""
    return logits[:, 1] if logits.shape[-1] == 2 else logits[:, 0]


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def sorted_batches(tokenizer, features, batch_size: int, progress: bool = False, desc: str = "scoring"):
    """``(row indices, padded batch)`` over unpadded ``features``, longest first, so that little
    compute goes to padding; every scorer here (torch or ONNX, pairs or single texts) uses it."""
    lengths = np.array([len(ids) for ids in features["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    keys = list(features.keys())
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        yield idx, tokenizer.pad([{k: features[k][i] for k in keys} for i in idx], return_tensors="pt")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU) or a torch device name; a device this machine
    does not have is a ``ValueError`` naming it (not a traceback from the first tensor moved)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {name!r}: not a device name ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}")
    return device
