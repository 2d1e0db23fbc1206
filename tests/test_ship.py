"""Shipping a pruned model: every model dir declares its head, opens in stock transformers and
sentence-transformers without slimrank on the path, exports to ONNX (fp32 == torch, int8 close),
and scores through one ranking API on every backend."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from common.data.formats import read_candidates_json
from common.kinds.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.serving.onnx_export import SMOOTH_ALPHA, activation_maxima, export_onnx, smoothed_copy
from common.kinds import CrossKind
from common.serving.rank import Ranker
from common.models.structure import zero_dead_weights
from conftest import SHARED

FAMILIES = ["bert", "distilbert", "roberta", "electra"]
ROLES = ["classifier", "segment_cosine", "bi"]
QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"] * 2
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty",
            "the stock market fell today", "bananas are yellow", "python is a language"]


def _load(path, role):
    if role == "bi":
        return load_model(str(path), kind="bi")
    return load_model(str(path), head=role)


def pruned_dir(tiny_models, family: str, role: str, tmp_path: Path) -> Path:
    """A reshaped tiny model with per-layer widths: 4 / 0 / 2 heads, a partial FFN."""
    loaded = _load(tiny_models[family], role)
    model, state = loaded.model.eval(), loaded.state
    if role == "segment_cosine":
        with torch.no_grad():
            model.cross_gate.fill_(0.3)  # cross-segment attention open
            model.cls_linear.weight.normal_()
    state.kept_heads[1] = []
    state.kept_heads[2] = [0, 3]
    state.kept_ffn[2] = list(range(0, state.ffn_size, 3))
    loaded.masks.refresh()
    zero_dead_weights(model, state)
    save_model(model, loaded.tokenizer, state, tmp_path / "masked")
    out, _, _ = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    return out


STOCK_SCRIPT = r"""
import json, sys
try:
    import common  # noqa: F401
    sys.exit("slimrank is importable: the test would prove nothing")
except ImportError:
    pass
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
path, role = sys.argv[1], sys.argv[2]
queries, passages = json.loads(sys.argv[3]), json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(path)
out = {}
with torch.no_grad():
    if role == "bi":
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        batch = tokenizer(passages, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out["transformers"] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(path, trust_remote_code=True, device="cpu")
        out["sentence_transformers"] = st.encode(passages, convert_to_numpy=True).tolist()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        batch = tokenizer(queries, passages, padding=True, truncation="only_second", return_tensors="pt")
        logits = model(**batch).logits
        out["transformers"] = (logits[:, 1] if logits.shape[-1] == 2 else logits[:, 0]).tolist()
        out["class"] = type(model).__name__
        if role == "segment_cosine":
            from sentence_transformers import CrossEncoder
            ce = CrossEncoder(path, trust_remote_code=True, device="cpu")
            out["sentence_transformers"] = ce.predict(list(zip(queries, passages))).tolist()
print(json.dumps(out))
"""


def run_stock(path: Path, role: str, cwd: Path) -> dict:
    """The script above in a fresh interpreter: isolated mode (no script dir, no PYTHONPATH,
    no user site), started outside the repository, so ``common`` cannot be imported."""
    done = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, str(path), role,
                           json.dumps(QUERIES), json.dumps(PASSAGES)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ROLES)
def test_pruned_dir_opens_in_stock_tools_without_slimrank(family, role, tiny_models, tmp_path):
    if role == "bi" and family == "distilbert":
        pytest.skip("covered by bert/roberta/electra: same code path")
    out = pruned_dir(tiny_models, family, role, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["slimrank_layout"]["heads_per_layer"] == [4, 0, 2]
    assert (out / "modeling_slimrank.py").is_file() and config["auto_map"]
    ours = _load(out, role)
    stock = run_stock(out, role, tmp_path)
    if role == "bi":
        expected = Ranker.from_loaded(ours).encode(PASSAGES)
        np.testing.assert_allclose(np.array(stock["transformers"]), expected, atol=1e-5)
        np.testing.assert_allclose(np.array(stock["sentence_transformers"]), expected, atol=1e-5)
        return
    expected = score_pairs(ours.model, ours.tokenizer, QUERIES, PASSAGES)
    assert stock["class"] == config["architectures"][0]
    np.testing.assert_allclose(np.array(stock["transformers"]), expected, atol=1e-5)
    if role == "segment_cosine":  # raw scores: the config asks for no activation
        np.testing.assert_allclose(np.array(stock["sentence_transformers"]), expected, atol=1e-5)


def test_every_checkpoint_declares_its_head(tiny_models, tmp_path):
    """An unpruned classifier checkpoint opens in stock transformers with no remote code at
    all; labels, architectures and (bi) the sentence-transformers files are written."""
    loaded = load_model(str(tiny_models["bert"]))
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "cross")
    config = json.loads((tmp_path / "cross" / "config.json").read_text())
    assert config["id2label"] == {"0": "not_relevant", "1": "relevant"}
    assert config["architectures"] == ["SlimrankBertForSequenceClassification"]
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cross").eval()
    batch = loaded.tokenizer(QUERIES, PASSAGES, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(stock(**batch).logits[:, 1].numpy(),
                                   score_pairs(loaded.model, loaded.tokenizer, QUERIES, PASSAGES), atol=1e-5)
    bi = load_model(str(tiny_models["bert"]), kind="bi", pooling="cls")
    save_model(bi.model, bi.tokenizer, bi.state, tmp_path / "bi")
    modules = json.loads((tmp_path / "bi" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((tmp_path / "bi" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert load_model(str(tmp_path / "bi")).model.config.slimrank_pooling == "cls"


def test_segment_tokenizer_pairs_are_the_segment_layout(tiny_models, tmp_path):
    """Stock tools tokenise (query, passage) pairs; the saved tokenizer makes that the layout
    the segment head was trained on."""
    loaded = load_model(str(tiny_models["bert"]), head="segment_cosine")
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    pair = again.tokenizer("what is a cat", "a cat is an animal")["input_ids"]
    alone = [again.tokenizer(t)["input_ids"] for t in ("what is a cat", "a cat is an animal")]
    assert pair == alone[0] + alone[1]
    assert again.tokenizer(PASSAGES)["input_ids"] == loaded.tokenizer(PASSAGES)["input_ids"]


@pytest.mark.parametrize("family,role", [("bert", "segment_cosine"), ("roberta", "classifier"),
                                         ("distilbert", "classifier"), ("electra", "bi")])
def test_onnx_equals_torch_on_real_dl20_pairs(family, role, tiny_models, tmp_path):
    out = pruned_dir(tiny_models, family, role, tmp_path)
    info = export_onnx(load_model(str(out)), out, max_length=64)
    assert info["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    cands = read_candidates_json(SHARED / "dl20" / "bm25.json").head(40)
    queries, passages = cands["query"].tolist(), cands["passage"].tolist()
    torch_scores = Ranker.load(str(out), "torch", max_length=128, batch_size=16).score(queries, passages)
    onnx_scores = Ranker.load(str(out), "onnx", max_length=128, batch_size=16).score(queries, passages)
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)
    int8 = Ranker.load(str(out), "onnx-int8", max_length=128, batch_size=16).score(queries, passages)
    assert int8.shape == torch_scores.shape and np.isfinite(int8).all()
    assert not np.array_equal(int8, onnx_scores)  # it is the quantized graph


@pytest.mark.parametrize("family,role", [("bert", "bi"), ("distilbert", "classifier")])
def test_int8_keeps_the_named_projections_in_fp32(family, role, tiny_models, tmp_path):
    """``keep_fp32``: exactly the named projection of every layer stays an fp32 MatMul, the rest
    are quantized; the stock attention is traced in its eager form (no per-score IsNaN guard)
    and the model gets its SDPA attention back; an unknown role writes nothing."""
    import onnx

    out = pruned_dir(tiny_models, family, role, tmp_path)
    loaded = load_model(str(out))
    with pytest.raises(ValueError, match="unknown projection"):
        export_onnx(loaded, out, max_length=64, keep_fp32=("ffn_middle",))
    assert not (out / "onnx").exists() and not list(out.glob(".tmp-*"))
    info = export_onnx(loaded, out, max_length=64, keep_fp32=("ffn_out",))
    assert all(m.config._attn_implementation == "sdpa" for m in loaded.model.modules()
               if isinstance(m, PreTrainedModel))
    layers = len(loaded.state.kept_heads)
    kept = info["onnx-int8"]["fp32_nodes"]
    assert len(kept) == layers and all(("ffn/lin2" if family == "distilbert" else "output/dense") in n for n in kept)
    int8 = {n.name: n.op_type for n in onnx.load(str(out / "onnx" / "model_int8.onnx")).graph.node}
    assert all(int8[n] == "MatMul" for n in kept)  # the excluded projections: plain fp32 MatMuls
    quantized = [n for n, op in int8.items() if op in ("DynamicQuantizeMatMul", "MatMulInteger")]
    assert len(quantized) >= 3 * layers  # q, k, v, attention output and FFN input stay int8
    fp32_ops = {n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node}
    assert "IsNaN" not in fp32_ops and info["onnx"]["max_abs_diff_vs_torch"] <= 1e-4


def test_smoothed_int8_keeps_the_function_and_loses_less(tiny_models, tmp_path):
    """SmoothQuant before int8: the smoothed model is the same function (1e-5), and on a model
    with outlier activation channels (as trained BERTs have) its int8 scores stay closer to fp32
    than the unsmoothed int8 graph's, on average over three random draws of the tiny model's head
    (on one draw either may win); export.json says which recipe made the int8 file."""
    cands = read_candidates_json(SHARED / "dl20" / "bm25.json")
    calib, held = cands.iloc[:64], cands.iloc[200:320]  # calibration and scoring pairs apart
    queries, passages = held["query"].tolist(), held["passage"].tolist()
    errors = {"plain": [], "smoothed": []}
    for seed in range(3):
        torch.manual_seed(seed)  # pruned_dir draws the head's weights
        draw = tmp_path / f"draw{seed}"
        out = pruned_dir(tiny_models, "bert", "segment_cosine", draw)
        loaded = load_model(str(out))
        with torch.no_grad():  # three outlier channels in every layer's input, as trained BERTs have
            for norm in (m for m in loaded.model.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight[[3, 17, 29]] *= 20.0
        save_model(loaded.model, loaded.tokenizer, loaded.state, draw / "outliers")
        maxima = activation_maxima(loaded, calib["query"].tolist(), calib["passage"].tolist(), 64)
        assert len(maxima) >= 6 * 2  # every linear the pairs reach (q, k, v, out, FFN in / out, head)
        smoothed = smoothed_copy(loaded.model, maxima, SMOOTH_ALPHA)
        plain_scores = Ranker.from_loaded(loaded, "torch", max_length=64).score(queries, passages)
        loaded.model = smoothed
        np.testing.assert_allclose(Ranker.from_loaded(loaded, "torch", max_length=64).score(queries, passages),
                                   plain_scores, rtol=1e-5, atol=1e-5)  # scores near -50 here
        for name, calibration in [("plain", None),
                                  ("smoothed", (calib["query"].tolist(), calib["passage"].tolist()))]:
            export = draw / name
            shutil.copytree(draw / "outliers", export)
            info = export_onnx(load_model(str(export)), export, max_length=64, calibration=calibration)
            assert ("smoothed" in info["onnx-int8"]["recipe"]) == (calibration is not None)
            fp32 = Ranker.load(str(export), "onnx", max_length=64).score(queries, passages)
            np.testing.assert_allclose(fp32, plain_scores, rtol=1e-5, atol=1e-4)
            int8 = Ranker.load(str(export), "onnx-int8", max_length=64).score(queries, passages)
            errors[name].append(float(np.nan_to_num(np.abs(int8 - fp32), nan=np.inf).mean()))  # a NaN: inf
        assert info["onnx-int8"]["smoothing"]["max_abs_diff_vs_torch_fp32"] <= 1e-4
    mean = {name: float(np.mean(e)) for name, e in errors.items()}
    assert np.isfinite(mean["plain"]) and np.isfinite(mean["smoothed"]), errors
    assert mean["smoothed"] < 0.9 * mean["plain"], errors


def test_ranker_torch_equals_score_pairs_and_ranks(tiny_models):
    cross = load_model(str(tiny_models["bert"]), head="segment_cosine")
    ranker = Ranker.from_loaded(cross, "torch", batch_size=4)
    assert ranker.kind is CrossKind
    expected = score_pairs(cross.model, cross.tokenizer, QUERIES, PASSAGES, batch_size=4)
    np.testing.assert_array_equal(ranker.score(QUERIES, PASSAGES), expected)
    ranked = ranker.rank("what is a cat", PASSAGES)
    scores = [s for _, s in ranked]
    assert sorted(i for i, _ in ranked) == list(range(len(PASSAGES))) and scores == sorted(scores, reverse=True)
    assert len(ranker.rank("what is a cat", PASSAGES, top_k=2)) == 2
    bi = load_model(str(tiny_models["bert"]), kind="bi")
    bi_ranker = Ranker.from_loaded(bi, "torch", batch_size=4)
    np.testing.assert_array_equal(bi_ranker.score(QUERIES, PASSAGES),
                                  score_pairs(bi.model, bi.tokenizer, QUERIES, PASSAGES, batch_size=4))


@pytest.mark.parametrize("fastest", ["onnx-int8", "torch-bf16"])
def test_teacher_scores_on_every_backend(fastest, tiny_models, tmp_path, monkeypatch):
    """01 teacher: torch is score_pairs bit for bit, onnxruntime fp32 within 1e-4 of it, and
    ``auto`` takes a shipped dir's backend measured fastest here (common.serving.choose)."""
    import pandas as pd

    from common.serving import choose, rank
    from common.data.distill import score_triples
    monkeypatch.setattr(choose, "candidate_backends", lambda path: ["torch", "torch-bf16", "onnx-int8"])
    monkeypatch.setattr(choose, "measure_backend", lambda loaded, backend, batch: 1.0 if backend == fastest else 2.0)
    out = pruned_dir(tiny_models, "bert", "segment_cosine", tmp_path)
    export_onnx(load_model(str(out)), out, max_length=64)
    triples = tmp_path / "triples.tsv"
    triples.write_text("".join(f"{q}\t{p}\t{n}\n" for q, p, n in zip(QUERIES, PASSAGES, PASSAGES[::-1])))
    scores = {}
    for backend in ("torch", "onnx", "onnx-int8", "torch-bf16", "auto"):
        n = score_triples(triples, str(out), tmp_path / f"{backend}.parquet", batch_size=4,
                          max_length=64, backend=backend, progress=False)
        assert n == len(QUERIES)
        scores[backend] = pd.read_parquet(tmp_path / f"{backend}.parquet")
    loaded = load_model(str(out))
    expected = score_pairs(loaded.model, loaded.tokenizer, QUERIES, PASSAGES, batch_size=4, max_length=64)
    np.testing.assert_array_equal(scores["torch"]["teacher_pos"].to_numpy(), expected)
    np.testing.assert_allclose(scores["onnx"].to_numpy(), scores["torch"].to_numpy(), atol=1e-4)
    pd.testing.assert_frame_equal(scores["auto"], scores[fastest])
    assert rank.resolve_backend(tiny_models["bert"], "auto") == "torch"  # no export: fp32 everywhere
    assert not scores["onnx-int8"].equals(scores["onnx"])


def test_ranker_refuses_bad_input(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["bert"]))
    with pytest.raises(ValueError, match="backend must be one of"):
        Ranker.from_loaded(loaded, "tensorrt")
    with pytest.raises(ValueError, match="04_reshape.py --onnx"):
        Ranker.from_loaded(loaded, "onnx")
    ranker = Ranker.from_loaded(loaded)
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        ranker.score(["a", "b"], ["c"])
    with pytest.raises(TypeError):
        ranker.score("a", "b")
