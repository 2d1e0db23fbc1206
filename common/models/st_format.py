"""The sentence-transformers directory format: what slimrank reads from it and writes back.

One owner for the files sentence-transformers keeps beside a transformers model:

* ``modules.json``: the module chain. A ``SentenceTransformer`` (bi-encoder) is
  ``Transformer -> Pooling -> [Dense ...] -> [Normalize]``; a ``CrossEncoder`` is one
  ``Transformer`` (sequence classification). Any other module (LayerNorm, WordWeights, Router,
  CNN, ...) is refused with one error naming it and the file.
* the ``Pooling`` config (``pooling_mode``: ``cls``, ``mean``, ``max``, ``lasttoken``,
  ``weightedmean``, or the legacy ``pooling_mode_*_tokens`` flags), ``Dense`` configs and weights,
* ``config_sentence_transformers.json``: ``prompts`` and ``default_prompt_name`` (E5's
  ``query: ``/``passage: ``, BGE's query instruction), ``similarity_fn_name`` (``cosine`` or
  ``dot``), a CrossEncoder's ``activation_fn``,
* the maximum sequence length (``sentence_bert_config.json`` ``max_seq_length``, else the
  tokenizer's ``model_max_length`` when it is a real bound).

:func:`read_embedding_spec` turns a directory into an :class:`EmbeddingSpec` (what turns hidden
states into the model's embedding, kept in ``config.json`` as ``slimrank_embedding``);
:func:`write_sentence_transformers_files` writes the same chain back, so a pruned model opens in
stock sentence-transformers and embeds as slimrank does. The computation itself (pooling, dense,
normalisation, prompts) lives in :mod:`common.models.encoders`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from common.io import atomic_write_text, save_tensors

POOLINGS = ("mean", "cls", "max", "lasttoken", "weightedmean")
POOLING_ALIASES = {"last": "lasttoken", "weighted_mean": "weightedmean"}  # L3Prune / SGPT's names
POOLING_CHOICES = POOLINGS + tuple(POOLING_ALIASES)  # what --pooling accepts


def canonical_pooling(name: str) -> str:
    """A pooling's sentence-transformers name (``last`` -> ``lasttoken``, ``weighted_mean`` ->
    ``weightedmean``)."""
    return POOLING_ALIASES.get(name, name)

SIMILARITIES = ("cosine", "dot")
LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Dense activations slimrank runs (sentence-transformers saves the class path)
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": nn.Tanh, "torch.nn.modules.linear.Identity": nn.Identity,
               "torch.nn.modules.activation.ReLU": nn.ReLU, "torch.nn.modules.activation.GELU": nn.GELU,
               "torch.nn.modules.activation.Sigmoid": nn.Sigmoid}
CROSS_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Sigmoid")
SPEC_FIELD = "slimrank_embedding"  # config.json: the EmbeddingSpec of a bi-encoder (asdict)
ACTIVATION_FIELD = "slimrank_activation_fn"  # config.json: a CrossEncoder's output activation
ST_CONFIG = "config_sentence_transformers.json"
_KNOWN = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass
class EmbeddingSpec:
    """Everything after the transformer that changes a bi-encoder's embedding or score."""

    normalize: bool = True
    similarity: str = "cosine"
    dense: list[dict] = field(default_factory=list)  # in_features, out_features, bias, activation_function
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None

    def prompt(self, role: str | None) -> str:
        """The text put before a ``query`` or ``passage`` (sentence-transformers' encode_query /
        encode_document rules: the ``query`` prompt, or the first of ``document``, ``passage``,
        ``corpus``; else the default prompt); ``None``: plain encode (the default prompt)."""
        names = {"query": ("query",), "passage": ("document", "passage", "corpus"), None: ()}[role]
        for name in names:
            if name in self.prompts:
                return self.prompts[name]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    @classmethod
    def from_config(cls, config) -> "EmbeddingSpec":
        data = getattr(config, SPEC_FIELD, None) or {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def dense_module(layers: list[dict]) -> nn.ModuleList:
    """The Dense layers of a spec as modules (``linear`` + ``activation``: sentence-transformers'
    state-dict names, so the weights move between the two as they are)."""
    out = nn.ModuleList()
    for entry in layers:
        layer = nn.Module()
        layer.linear = nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"])
        layer.activation = ACTIVATIONS[entry["activation_function"]]()
        out.append(layer)
    return out


def _json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def _modules(path: Path) -> list[dict]:
    """The entries of ``modules.json`` (empty: a plain transformers directory), each known module
    type or one error naming the module and the file."""
    file = path / "modules.json"
    if not file.is_file():
        return []
    entries = _json(file)
    root = path.resolve()
    for entry in entries:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _KNOWN:
            raise ValueError(f"{file}: module {entry.get('idx', '?')} ({entry.get('type')}) is not supported "
                             f"by slimrank; a model is {' -> '.join(_KNOWN)} (Dense and Normalize optional)")
        folder = str(entry.get("path", ""))  # read (and copied by a save) from inside the dir only
        real = (root / folder).resolve()
        if Path(folder).is_absolute() or not (real == root or root in real.parents):
            raise ValueError(f"{file}: module {entry.get('idx', '?')} path {folder!r} leads outside the "
                             "model directory: refused (a module folder is a relative path inside it)")
    return entries


def _kind(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _pooling(config_path: Path) -> str:
    config = _json(config_path)
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [LEGACY_POOLING.get(k, k) for k, on in config.items() if k.startswith("pooling_mode_") and on is True]
        mode = modes[0] if len(modes) == 1 else modes
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLINGS:
        raise ValueError(f"{config_path}: unsupported pooling {mode!r}; slimrank pools by one of {POOLINGS}")
    if config.get("include_prompt", True) is not True:
        raise ValueError(f"{config_path}: include_prompt false (prompt tokens left out of the pooling) "
                         "is not supported by slimrank")
    return mode


def read_pooling(path: str | Path, default: str = "mean") -> str:
    """The pooling a directory declares (``default`` without a sentence-transformers config)."""
    path = Path(path)
    entries = [e for e in _modules(path) if _kind(e) == "Pooling"] if path.is_dir() else []
    config = path / entries[0].get("path", "") / "config.json" if entries else path / "1_Pooling" / "config.json"
    return _pooling(config) if config.is_file() else default


def _max_seq_length(path: Path, tokenizer_bound: int | None) -> int | None:
    legacy = path / "sentence_bert_config.json"
    if legacy.is_file():
        value = _json(legacy).get("max_seq_length")
        if value:
            return int(value)
    return tokenizer_bound if tokenizer_bound and tokenizer_bound < 1_000_000 else None


def read_embedding_spec(path: str | Path, tokenizer_bound: int | None = None) -> EmbeddingSpec:
    """The :class:`EmbeddingSpec` of a bi-encoder directory; a plain transformers directory gets
    the default (mean pooling is :func:`read_pooling`'s, L2-normalised, cosine)."""
    path = Path(path)
    spec = EmbeddingSpec(max_seq_length=_max_seq_length(path, tokenizer_bound))
    entries = _modules(path)
    if not entries:
        return spec
    spec.normalize = any(_kind(e) == "Normalize" for e in entries)
    for entry in entries:
        if _kind(entry) != "Dense":
            continue
        folder = path / entry.get("path", "")
        config = _json(folder / "config.json")
        activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{folder / 'config.json'}: Dense activation {activation!r} is not supported by "
                             f"slimrank (supported: {sorted(ACTIVATIONS)})")
        spec.dense.append({"in_features": int(config["in_features"]), "out_features": int(config["out_features"]),
                           "bias": bool(config.get("bias", True)), "activation_function": activation})
    settings = _json(path / ST_CONFIG) if (path / ST_CONFIG).is_file() else {}
    spec.prompts = dict(settings.get("prompts") or {})
    spec.default_prompt_name = settings.get("default_prompt_name")
    spec.similarity = settings.get("similarity_fn_name") or "cosine"
    if spec.similarity not in SIMILARITIES:
        raise ValueError(f"{path / ST_CONFIG}: similarity_fn_name {spec.similarity!r} is not supported by "
                         f"slimrank (supported: {SIMILARITIES})")
    return spec


def dense_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The Dense modules' weights of a sentence-transformers directory, under the names
    ``slimrank_dense.<i>.linear.*`` (:func:`dense_module` attached to the encoder)."""
    path = Path(path)
    out = {}
    for i, entry in enumerate(e for e in _modules(path) if _kind(e) == "Dense"):
        folder = path / entry.get("path", "")
        if (folder / "model.safetensors").is_file():
            weights = load_file(str(folder / "model.safetensors"))
        elif (folder / "pytorch_model.bin").is_file():
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{folder}: a Dense module without model.safetensors or pytorch_model.bin")
        out.update({f"slimrank_dense.{i}.{k}": v for k, v in weights.items()})
    return out


def read_cross_activation(path: str | Path) -> str | None:
    """A CrossEncoder directory's output activation (``activation_fn``), after checking that its
    module chain is one Transformer and that it has no prompts slimrank would drop."""
    path = Path(path)
    entries = _modules(path)
    extra = [e for e in entries if _kind(e) != "Transformer"]
    if extra:
        raise ValueError(f"{path / 'modules.json'}: module {extra[0].get('idx', '?')} ({extra[0].get('type')}) "
                         "after a cross-encoder's Transformer is not supported by slimrank")
    settings = _json(path / ST_CONFIG) if (path / ST_CONFIG).is_file() else {}
    if settings.get("prompts") or settings.get("default_prompt_name"):
        raise ValueError(f"{path / ST_CONFIG}: cross-encoder prompts are not supported by slimrank")
    activation = settings.get("activation_fn")
    if activation is not None and activation not in CROSS_ACTIVATIONS:
        raise ValueError(f"{path / ST_CONFIG}: activation_fn {activation!r} is not supported by slimrank "
                         f"(supported: {CROSS_ACTIVATIONS})")
    return activation


def write_sentence_transformers_files(directory: Path, pooling: str, dim: int, spec: EmbeddingSpec,
                                      dense_state: dict[str, torch.Tensor]) -> None:
    """modules.json, sentence_bert_config.json, the Pooling, Dense and Normalize folders and
    config_sentence_transformers.json: the bi-encoder as slimrank embeds and scores it.
    ``dense_state``: the model's ``slimrank_dense.*`` tensors."""
    chain = [("Transformer", ""), ("Pooling", "1_Pooling")]
    chain += [("Dense", f"{2 + i}_Dense") for i in range(len(spec.dense))]
    if spec.normalize:
        chain.append(("Normalize", f"{len(chain)}_Normalize"))
    modules = [{"idx": i, "name": str(i), "path": folder, "type": f"sentence_transformers.models.{kind}"}
               for i, (kind, folder) in enumerate(chain)]
    atomic_write_text(directory / "modules.json", json.dumps(modules, indent=1))
    atomic_write_text(directory / "sentence_bert_config.json", json.dumps(
        {"max_seq_length": spec.max_seq_length or 256, "do_lower_case": False}, indent=1))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    # the legacy flags: every sentence-transformers version reads them (newer ones convert them)
    atomic_write_text(directory / "1_Pooling" / "config.json", json.dumps(
        {"word_embedding_dimension": dim, **{key: mode == pooling for key, mode in LEGACY_POOLING.items()},
         "include_prompt": True}, indent=1))
    for i, entry in enumerate(spec.dense):
        folder = directory / f"{2 + i}_Dense"
        folder.mkdir(exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps(entry, indent=1))
        prefix = f"slimrank_dense.{i}."
        save_tensors({k[len(prefix):]: v.detach().cpu().contiguous() for k, v in dense_state.items()
                      if k.startswith(prefix)}, folder / "model.safetensors")
    if spec.normalize:
        (directory / chain[-1][1]).mkdir(exist_ok=True)
    atomic_write_text(directory / ST_CONFIG, json.dumps(
        {"model_type": "SentenceTransformer", "prompts": spec.prompts,
         "default_prompt_name": spec.default_prompt_name, "similarity_fn_name": spec.similarity}, indent=1))


def spec_dict(spec: EmbeddingSpec) -> dict:
    return asdict(spec)
