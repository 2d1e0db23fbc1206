"""Inference cost of a (pruned, reshaped) cross-encoder: multiply-adds, parameters, size, latency.

Units. One multiply-add (MAC) is counted as one operation, which is fvcore's convention for
what it calls a "flop". Only the matrix products are counted: the linear layers, the two
attention products (QK^T and attention-weighted V) and the classification head. Element-wise
work (layer norm, softmax, GELU, residual adds, embedding look-ups) is not a multiply-add of a
matrix product and is deliberately left out, on both the measured side (:func:`fvcore_macs`)
and the analytic side (:func:`analytic_macs`), so that the two agree exactly.

Attention. transformers 5 runs BERT-family attention through
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) by default; fvcore has no handler
for ``aten::scaled_dot_product_attention`` and would silently count the attention products as
zero. :func:`flop_analysis` registers one (:func:`sdpa_macs`). With eager attention the same
products appear as ``aten::matmul`` and fvcore's own handler counts them; both give the same
total. Any operator left without a handler that looks like a matrix product raises an error
instead of being skipped.

Latency. :func:`common.hardware.time_callable` times a callable on one device with ``time.perf_counter``,
synchronising CUDA around every call; :func:`worst_case_inputs` builds the synthetic batch
(every pair exactly ``max_length`` tokens, no padding) that latency and MACs are measured on;
:func:`common.hardware.machine_description` records the hardware the numbers belong to.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from math import prod
from pathlib import Path

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts its focal loss at import; torch deprecates that
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from common.models.arch import adapter_for, dims, get_module, kv_groups, layer_stack
from common.models.segment import is_segment

# Operators that do no matrix-product multiply-adds: fvcore is told to ignore them (it would
# otherwise warn about each one).
NON_MAC_OPS: frozenset[str] = frozenset({
    "aten::abs", "aten::add", "aten::add_", "aten::alias", "aten::all", "aten::any",
    "aten::bitwise_and", "aten::bitwise_or", "aten::cos", "aten::sin", "aten::cumsum", "aten::div", "aten::div_",
    "aten::dropout_", "aten::embedding", "aten::erf", "aten::exp", "aten::expand_as",
    "aten::gelu", "aten::le", "aten::lift_fresh", "aten::log",
    "aten::log_softmax", "aten::logical_and", "aten::logical_not", "aten::logical_or", "aten::lt",
    "aten::masked_fill_", "aten::mean", "aten::mul", "aten::mul_", "aten::ne", "aten::neg",
    "aten::new_ones", "aten::ones_like", "aten::pow", "aten::repeat", "aten::rsqrt",
    "aten::rsub", "aten::scalar_tensor", "aten::sigmoid", "aten::silu", "aten::softmax",
    "aten::sqrt", "aten::sub", "aten::sum", "aten::tanh", "aten::where", "aten::__or__",
    # the segment head (common.models.segment): softmax by hand, pooling norms
    "aten::amax", "aten::amin", "aten::argmax", "aten::clamp_min", "aten::linalg_vector_norm",
    # decoder LLMs: the rotary embedding's angle table (positions times inverse frequencies by
    # broadcasting, then cos and sin: element-wise)
    "aten::cos", "aten::sin",
})

# Operator names (after "aten::") that denote a matrix product: mm, addmm, bmm, baddbmm, addbmm
# (and in-place forms), matmul, linear, einsum, convolutions, attention kernels, mv, dot. An
# unhandled operator matching it would make the count silently too low, so it is an error.
_MATMUL_LIKE = re.compile(r"mm_?$|matmul|linear|einsum|conv|attention|mv_?$|dot$")

# Operators fvcore counts by default that are element-wise, not matrix products: layer norm
# (fvcore charges 5 "flops" per element) and the other normalisations. They get a handle that
# counts zero, since an explicit handle takes precedence over fvcore's ignore list.
ZERO_MAC_OPS: tuple[str, ...] = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm",
                                 "aten::instance_norm")

HEADS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "modernbert", "none")


# -- measured multiply-adds (fvcore) -------------------------------------------------------------
def sdpa_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``.

    For query (..., L, d), key (..., S, d) and value (..., S, dv), with the leading dimensions
    (batch, heads) taken from the query (grouped-query attention broadcasts key and value):
    ``prod(...) * L * S * d`` MACs for QK^T plus ``prod(...) * L * S * dv`` for the weighted
    sum of values. Scaling, masking and softmax are element-wise and not counted.
    """
    query, key, value = (get_shape(v) for v in inputs[:3])
    if query is None or key is None or value is None:
        raise RuntimeError("scaled_dot_product_attention traced without complete input shapes")
    rows = prod(query[:-1])  # batch * heads * L
    keys = key[-2]
    return rows * keys * query[-1] + rows * keys * value[-1]


def zero_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for an operator that performs no matrix-product multiply-adds."""
    return 0


def baddbmm_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::baddbmm`` (bias + batch1 @ batch2), missing from fvcore."""
    batch1, batch2 = get_shape(inputs[1]), get_shape(inputs[2])
    n, rows, inner = batch1
    return n * rows * inner * batch2[-1]


class _LogitsOnly(nn.Module):
    """Calls a transformers model with keyword inputs and returns the logits tensor.

    Tracing needs positional tensor inputs and a tensor output; transformers models take
    keywords (DistilBERT has no ``token_type_ids``) and return a ``ModelOutput``.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, tensors)), return_dict=True)
        logits = getattr(output, "logits", None)  # a bare encoder (bi-encoder) has none
        return logits if logits is not None else output.last_hidden_state


def flop_analysis(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> FlopCountAnalysis:
    """A configured fvcore analysis of one forward pass of ``model`` (not yet run).

    SDPA and baddbmm handles are registered, normalisations (:data:`ZERO_MAC_OPS`) count zero,
    the operators in :data:`NON_MAC_OPS` are ignored and fvcore's own warnings are silenced
    (:func:`check_unsupported` replaces them). The analysis traces the model when first
    queried, so put the model in eval mode and query it under ``torch.no_grad()`` (as
    :func:`fvcore_macs` does). Inputs are moved to the model's device. ``analysis.total()`` is
    the MAC count; ``by_module()`` and ``by_operator()`` break it down.
    """
    device = next(model.parameters()).device
    names = ("input_ids", "attention_mask")
    if token_type_ids is not None:
        names += ("token_type_ids",)
    tensors = tuple(t.to(device) for t in (input_ids, attention_mask, token_type_ids)
                    if t is not None)
    analysis = FlopCountAnalysis(_LogitsOnly(model, names), tensors)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs,
                           "aten::baddbmm", baddbmm_macs)
    analysis.set_op_handle(**{name: zero_macs for name in ZERO_MAC_OPS})
    analysis.set_op_handle(**{name: None for name in NON_MAC_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def check_unsupported(analysis: FlopCountAnalysis) -> Counter:
    """Operators the analysis met without a handler: an error for matrix products, else a warning.

    Returns the (possibly empty) counter of unsupported operators of the whole model.
    """
    unsupported = Counter(analysis.unsupported_ops())
    matmul_like = sorted(op for op in unsupported if _MATMUL_LIKE.search(op.split("::")[-1]))
    if matmul_like:
        raise RuntimeError(f"fvcore has no handler for matrix-product operator(s) {matmul_like}; "
                           "their multiply-adds would be missing from the count")
    if unsupported:
        warnings.warn(f"fvcore met operators it does not count (assumed not multiply-adds): "
                      f"{dict(unsupported)}", stacklevel=2)
    return unsupported


def fvcore_macs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> int:
    """Multiply-adds of one forward pass over the given batch, attention included.

    The model is traced in eval mode without gradients (its training flag is restored
    afterwards). Works for SDPA and eager attention alike, and for reshaped models whose layers
    differ in head count and FFN width. Raises if a matrix-product operator went uncounted.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = flop_analysis(model, input_ids, attention_mask, token_type_ids)
            total = analysis.total()
        check_unsupported(analysis)
    finally:
        model.train(was_training)
    return int(total)


# -- analytic multiply-adds --------------------------------------------------------------------
def analytic_macs(hidden: int, head_size: int, heads_per_layer: list[int],
                  ffn_per_layer: list[int], seq_len: int, batch: int = 1,
                  num_labels: int | None = 2, head: str = "bert",
                  embedding_size: int | None = None, kv_groups: int = 1, ffn_matrices: int = 2) -> int:
    """Multiply-adds of one forward pass from the architecture alone.

    With h = ``hidden``, L = ``seq_len``, B = ``batch``, and for layer l
    a_l = heads_l * ``head_size`` (attention width) and f_l = ``ffn_per_layer[l]``::

        encoder = B * L * sum_l [ 4*h*a_l      q, k, v projections and attention output
                                + 2*L*a_l      QK^T (L*a_l per token) and attention-weighted V
                                + 2*h*f_l ]    FFN input and output projections (a gated FFN,
                                               ``ffn_matrices=3``: 3*h*f_l: ModernBERT's gated
                                               input 2*f_l wide, SwiGLU's gate and up)
        project = B * L * E * h                ELECTRA's embeddings_project, only when an
                                               ``embedding_size`` E != h is given
        head    = B * (h*h + h*num_labels)     on the CLS token, when num_labels is not None

    Decoder LLMs (Llama, Mistral, Qwen): grouped-query attention with ``kv_groups`` query heads
    per key/value head makes k and v cost h*a_l/kv_groups each (q and the output projection
    h*a_l each: 2*h*a_l + 2*h*a_l/kv_groups instead of 4*h*a_l; the attention products are per
    query head, unchanged); SwiGLU has ``ffn_matrices`` = 3 (gate, up, down). Rotary position
    embedding adds no matrix product: its angle table is positions times inverse frequencies by
    broadcasting (transformers 5) and its rotation element-wise, so it counts 0 here as in fvcore.

    A layer with 0 heads contributes no attention MACs (its attention block is skipped) and
    one with f_l = 0 no FFN MACs. The classification heads of the four families have the same
    cost, only their names differ: BERT pooler (h x h) + classifier (h x num_labels);
    RoBERTa/ELECTRA classification head dense (h x h) + out_proj (h x num_labels); DistilBERT
    pre_classifier (h x h) + classifier (h x num_labels). ``head="none"`` (or
    ``num_labels=None``) leaves the head out. Biases, layer norms, softmax, activations and
    embedding look-ups are not multiply-adds of a matrix product and are not counted, as in
    :func:`fvcore_macs`.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if len(heads_per_layer) != len(ffn_per_layer):
        raise ValueError(f"{len(heads_per_layer)} layers of heads but {len(ffn_per_layer)} of FFN")
    if min([seq_len, batch, hidden, head_size, *heads_per_layer, *ffn_per_layer]) < 0:
        raise ValueError("sizes must be non-negative")
    per_token = 0
    for heads, ffn in zip(heads_per_layer, ffn_per_layer):
        width = heads * head_size
        per_token += (2 * hidden * width + 2 * hidden * (width // kv_groups) + 2 * seq_len * width
                      + ffn_matrices * hidden * ffn)
    if embedding_size is not None and embedding_size != hidden:
        per_token += embedding_size * hidden
    total = batch * seq_len * per_token
    if head != "none" and num_labels is not None:
        total += batch * (hidden * hidden + hidden * num_labels)
    return total


def architecture(model: nn.Module) -> dict:
    """Keyword arguments of :func:`analytic_macs` (all but seq_len and batch) read off a model.

    Per-layer head counts and FFN widths come from the actual tensor shapes (the query and FFN
    input projections), so a reshaped model is described as it is; a layer whose attention
    block was replaced because it has no heads left counts 0 heads. ``model`` must be a
    ``*ForSequenceClassification`` model of a supported family.
    """
    adapter = adapter_for(model.config)
    bare = model is model.base_model  # a bi-encoder: no classification head
    _, _, head_size, _ = dims(model.config, adapter)
    heads, ffn = [], []
    for layer in layer_stack(model, adapter):
        try:
            query = get_module(layer, adapter.query)
        except AttributeError:  # attention block replaced: no heads left
            query = None
        heads.append(0 if query is None else query.out_features // (head_size * adapter.qkv_parts))
        ffn.append(get_module(layer, adapter.ffn_in).out_features // adapter.ffn_in_parts)
    bare = bare or is_segment(model)  # the segment head scores by a cosine: no head matmuls
    return dict(hidden=getattr(model.config, adapter.cfg_hidden), head_size=head_size,
                heads_per_layer=heads, ffn_per_layer=ffn,
                num_labels=None if bare else model.config.num_labels,
                head="none" if bare else adapter.family, embedding_size=getattr(model.config, "embedding_size", None),
                ffn_matrices=3 if adapter.ffn_gate else 1 + adapter.ffn_in_parts,
                kv_groups=kv_groups(model.config, adapter))


# -- parameters and size -------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total``: every parameter (tied ones once); ``encoder``: the transformer layers only.

    The encoder excludes embeddings, the (ELECTRA) embedding projection and the classification
    head. The layer stack is found through the family adapter (``base_model.encoder.layer`` for
    BERT/RoBERTa/ELECTRA, ``base_model.transformer.layer`` for DistilBERT).
    """
    stack = layer_stack(model, adapter_for(model.config))
    return dict(total=sum(p.numel() for p in model.parameters()),
                encoder=sum(p.numel() for p in stack.parameters()))


def dir_size_mb(path: str | Path) -> float:
    """Size in MB (10^6 bytes) of a saved model.

    For a file, its size. For a directory, the ``*.safetensors`` weight files (one
    ``model.safetensors`` or shards) when there are any, else every file under it.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 1e6
    if not path.is_dir():
        raise FileNotFoundError(path)
    files = sorted(path.glob("*.safetensors")) or [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


# -- inputs, timing, machine ---------------------------------------------------------------------
def worst_case_inputs(tokenizer_or_vocab_size, n_pairs: int = 100, max_length: int = 256,
                      seed: int = 0, token_type_ids: bool | None = None,
                      cls_token_id: int = 2, sep_token_id: int = 3) -> dict[str, torch.Tensor]:
    """A synthetic batch of ``n_pairs`` query-passage pairs of exactly ``max_length`` tokens.

    Every sequence is full (no padding, ``attention_mask`` all ones), the worst case for cost.

    * With a tokenizer, random non-special vocabulary tokens are decoded into two long texts
      per pair and encoded as a pair with ``truncation="longest_first"``: the layout is the
      tokenizer's own pair template (``[CLS] a [SEP] b [SEP]`` for BERT, ``<s> a </s></s> b
      </s>`` for RoBERTa) with the two texts taking about half each. ``token_type_ids`` are
      returned when the tokenizer produces them (its ``model_input_names``) unless overridden.
    * With a vocabulary size, the layout ``[CLS] a [SEP] b [SEP]`` is built directly, ``a``
      taking (max_length - 3) // 2 tokens, with ``cls_token_id``/``sep_token_id`` (defaults
      avoid 0 and 1, the usual padding ids) and content ids drawn from [4, vocab_size);
      ``token_type_ids`` (0 up to and including the first [SEP], 1 after) are returned unless
      ``token_type_ids=False`` (RoBERTa's usual type vocabulary has one type only).
    """
    if n_pairs < 1 or max_length < 3:
        raise ValueError("need n_pairs >= 1 and max_length >= 3")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size
        if vocab <= max(4, cls_token_id, sep_token_id):
            raise ValueError(f"vocabulary of {vocab} ids is too small")
        first = (max_length - 3) // 2
        ids = torch.randint(4, vocab, (n_pairs, max_length), generator=generator)
        ids[:, 0] = cls_token_id
        ids[:, first + 1] = sep_token_id
        ids[:, -1] = sep_token_id
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if token_type_ids is not False:
            types = torch.zeros_like(ids)
            types[:, first + 2:] = 1
            batch["token_type_ids"] = types
        return batch
    return _tokenized_worst_case(tokenizer_or_vocab_size, n_pairs, max_length, generator,
                                 token_type_ids)


def _tokenized_worst_case(tokenizer, n_pairs: int, max_length: int, generator: torch.Generator,
                          token_type_ids: bool | None) -> dict[str, torch.Tensor]:
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    n_words = max_length
    for _ in range(6):  # decoded sub-words can merge on re-encoding: lengthen until full
        ids = torch.randint(0, len(tokenizer), (2 * n_pairs, n_words), generator=generator)
        ids = torch.where(torch.isin(ids, special), ids.new_tensor(len(tokenizer) - 1), ids)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        encoded = tokenizer(texts[:n_pairs], texts[n_pairs:], truncation="longest_first",
                            max_length=max_length, padding="max_length", return_tensors="pt")
        if bool(encoded["attention_mask"].all()) and encoded["input_ids"].shape[1] == max_length:
            break
        n_words *= 2
    else:
        raise RuntimeError(f"could not fill {max_length} tokens with this tokenizer")
    batch = dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    if token_type_ids is None:
        token_type_ids = "token_type_ids" in tokenizer.model_input_names
    if token_type_ids:
        if "token_type_ids" not in encoded:
            raise ValueError("this tokenizer does not produce token_type_ids")
        batch["token_type_ids"] = encoded["token_type_ids"]
    return batch


