"""Bring your own model: trained heads, sentence-transformers dirs, and the families of the
adapter table, each through load -> a prune step -> reshape -> stock load -> ONNX.

The matrix (``FAMILIES`` x ``KINDS``) builds each model the way its owner would have it:
``cross1``: a trained 1-label ``*ForSequenceClassification`` saved by sentence-transformers'
``CrossEncoder`` (sigmoid activation); ``cross2``: a 2-label transformers checkpoint; ``bi``: a
``SentenceTransformer`` dir with non-default pooling, a Dense layer, prompts and a max length.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common.evaluation.cost import analytic_macs, architecture, fvcore_macs, worst_case_inputs
from common.models.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.models.names import resolve_model_path
from common.models.structure import zero_dead_weights
from common.pruning.importance import ffn_l1_scores, head_l1_scores, select_ffn, select_heads
from common.serving.onnx_export import export_onnx
from common.serving.rank import Ranker
from conftest import tiny_config

FAMILIES = ["bert", "roberta", "xlm-roberta"]
KINDS = ["cross1", "cross2", "bi"]
POOLING = {"bert": "weightedmean", "roberta": "lasttoken", "xlm-roberta": "max"}
QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"]
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty"]
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def build(family: str, kind: str, directory: Path) -> Path:
    """A tiny random-init model of ``family`` as its owner saved it (module docstring)."""
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    config = tiny_config(family)
    raw = directory.with_name(directory.name + "-hf")
    tokenizer = _tokenizer()
    if kind == "bi":
        AutoModel.from_config(config).save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        modules = [Transformer(str(raw), max_seq_length=48), Pooling(32, pooling_mode=POOLING[family]),
                   Dense(32, 24)]
        if family != "roberta":  # roberta: a dot-product model (no Normalize)
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, prompts=PROMPTS, device="cpu",
                                 similarity_fn_name="cosine" if family != "roberta" else "dot")
        with torch.no_grad():  # a trained Dense is not at its init: make it matter
            st[2].linear.weight.normal_()
        st.save(str(directory))
        return directory
    config.num_labels = 1 if kind == "cross1" else 2
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # a trained head is not at its init
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] <= 2:
                p.normal_(std=0.5)
    if kind == "cross2":
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    CrossEncoder(str(raw), device="cpu").save(str(directory))
    return directory


def scores(loaded, queries=QUERIES, passages=PASSAGES) -> np.ndarray:
    return score_pairs(loaded.model, loaded.tokenizer, queries, passages)


def prune_step(loaded) -> None:
    """One prune event by weight magnitude: the 2 weakest heads and 7 neurons of each layer."""
    state = loaded.state
    for layer, head in select_heads(head_l1_scores(loaded.model, state), state, 2, exclude_layers=set()):
        state.kept_heads[layer].remove(head)
    for layer, neurons in select_ffn(ffn_l1_scores(loaded.model, state), state, 7, exclude_layers=set()).items():
        state.kept_ffn[layer] = [n for n in state.kept_ffn[layer] if n not in neurons]
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, state)


STOCK_SCRIPT = r"""
import json, sys
try:
    import common  # noqa: F401
    sys.exit("slimrank is importable: the test would prove nothing")
except ImportError:
    pass
import torch
path, kind = sys.argv[1], sys.argv[2]
queries, passages = json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {}
with torch.no_grad():
    if kind == "bi":
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(path, trust_remote_code=True, device="cpu")
        out["query"] = st.encode_query(queries).tolist()
        out["passage"] = st.encode_document(passages).tolist()
        out["scores"] = st.similarity_pairwise(st.encode_query(queries), st.encode_document(passages)).tolist()
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from sentence_transformers import CrossEncoder
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        batch = tokenizer(queries, passages, padding=True, truncation="only_second", return_tensors="pt")
        logits = model(**batch).logits
        out["transformers"] = (logits[:, 1] if logits.shape[-1] == 2 else logits[:, 0]).tolist()
        out["cross_encoder"] = CrossEncoder(path, trust_remote_code=True, device="cpu").predict(
            list(zip(queries, passages))).tolist()
print(json.dumps(out))
"""


def run_stock(path: Path, kind: str, cwd: Path) -> dict:
    """The script above in a clean interpreter (isolated mode, outside the repository)."""
    done = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, str(path), kind,
                           json.dumps(QUERIES), json.dumps(PASSAGES)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_load_prune_reshape_stock_onnx(family, kind, tmp_path):
    source = build(family, kind, tmp_path / "source")
    loaded = load_model(str(source), kind="bi" if kind == "bi" else None)
    config = loaded.model.config
    if kind != "bi":  # the trained head is kept, with its own label count
        assert config.num_labels == (1 if kind == "cross1" else 2)
        trained = AutoModelForSequenceClassification.from_pretrained(source).eval()
        batch = loaded.tokenizer(QUERIES, PASSAGES, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = trained(**batch).logits
        np.testing.assert_allclose(scores(loaded), logits[:, -1].numpy(), atol=1e-5)
    else:
        assert config.slimrank_pooling == POOLING[family]
        assert config.slimrank_embedding["prompts"]["query"] == "query: "
        assert config.slimrank_embedding["max_seq_length"] == 48

    prune_step(loaded)
    masked_scores = scores(loaded)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    out, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    assert after < before
    reshaped = load_model(str(out))
    assert reshaped.state.is_reshaped and reshaped.kind == ("bi" if kind == "bi" else "cross")
    np.testing.assert_allclose(scores(reshaped), masked_scores, atol=1e-5)

    stock = run_stock(out, kind, tmp_path)
    if kind == "bi":
        ranker = Ranker.from_loaded(reshaped)
        np.testing.assert_allclose(np.array(stock["query"]), ranker.encode(QUERIES, role="query"), atol=1e-5)
        np.testing.assert_allclose(np.array(stock["passage"]), ranker.encode(PASSAGES, role="passage"), atol=1e-5)
        np.testing.assert_allclose(np.array(stock["scores"]), masked_scores, atol=1e-5)
    else:
        np.testing.assert_allclose(np.array(stock["transformers"]), masked_scores, atol=1e-5)
        # a CrossEncoder dir keeps its activation (sigmoid); a transformers checkpoint: raw logits
        if kind == "cross1":
            np.testing.assert_allclose(np.array(stock["cross_encoder"]), 1 / (1 + np.exp(-masked_scores)), atol=1e-5)
        else:  # both labels' logits
            np.testing.assert_allclose(np.array(stock["cross_encoder"])[:, 1], masked_scores, atol=1e-5)

    info = export_onnx(reshaped, out, max_length=32)
    assert info["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    onnx_scores = Ranker.load(str(out), "onnx").score(QUERIES, PASSAGES)
    np.testing.assert_allclose(onnx_scores, masked_scores, atol=1e-4)


@pytest.mark.parametrize("kind", ["cross1", "bi"])
def test_xlm_roberta_macs_equal_the_analytic_count(kind, tmp_path):
    loaded = load_model(str(build("xlm-roberta", kind, tmp_path / "m")), kind="bi" if kind == "bi" else None)
    prune_step(loaded)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    out, _, _ = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    model = load_model(str(out)).model
    batch = worst_case_inputs(loaded.tokenizer, n_pairs=2, max_length=24)
    measured = fvcore_macs(model, **batch)
    arch = architecture(model)
    assert arch["heads_per_layer"] == loaded.state.heads_per_layer
    assert measured == analytic_macs(seq_len=24, batch=2, **arch)


def test_packaged_tokenizer_one_label_checkpoint_loads_with_its_logit(tmp_path):
    """The issue's reproduction: BertForSequenceClassification(num_labels=1) with the packaged
    tokenizer loads; its score is the logit; 02-style continued training takes a listwise loss."""
    from argparse import Namespace

    from common.models.kinds import CrossKind
    source = build("bert", "cross2", tmp_path / "two")
    config = tiny_config("bert")
    config.num_labels = 1
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "one")
    _tokenizer().save_pretrained(tmp_path / "one")
    loaded = load_model(str(tmp_path / "one"))
    assert loaded.model.classifier.out_features == 1
    assert CrossKind.label_loss(Namespace(), loaded.model).name == "row_softmax"
    assert CrossKind.label_loss(Namespace(), load_model(str(source)).model).name == "cross_entropy"
    # a base model (no trained head) still gets a fresh 2-label head
    base = load_model("all-MiniLM-L6-v2")
    assert base.model.config.num_labels == 2


def test_bad_input_is_one_error_naming_the_file(tmp_path):
    config = tiny_config("bert")
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    _tokenizer().save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match=r"three/config.json: a sequence-classification head with 3 labels"):
        load_model(str(tmp_path / "three"))
    bi = build("bert", "bi", tmp_path / "bi")
    modules = json.loads((bi / "modules.json").read_text())
    modules.append({"idx": 4, "name": "4", "path": "4_LayerNorm",
                    "type": "sentence_transformers.models.LayerNorm"})
    (bi / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"bi/modules.json: module 4 \(sentence_transformers.models.LayerNorm\) "
                                         "is not supported"):
        load_model(str(bi), kind="bi")
    pooling = bi / "1_Pooling" / "config.json"
    modules.pop()
    (bi / "modules.json").write_text(json.dumps(modules))
    pooling.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "mean_sqrt_len_tokens"}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: unsupported pooling 'mean_sqrt_len_tokens'"):
        load_model(str(bi), kind="bi")
    config = tiny_config("bert")
    config.model_type = "gpt2-like"
    with pytest.raises(ValueError, match="not supported"):
        from common.models.arch import adapter_for
        adapter_for(config)
