"""Bring your own model: trained heads, sentence-transformers dirs, and the families of the
adapter table, each through load -> a prune step -> reshape -> stock load -> ONNX.

The matrix (``FAMILIES`` x ``KINDS``) builds each model the way its owner would have it:
``cross1``: a trained 1-label ``*ForSequenceClassification`` saved by sentence-transformers'
``CrossEncoder`` (sigmoid activation); ``cross2``: a 2-label transformers checkpoint; ``bi``: a
``SentenceTransformer`` dir with non-default pooling, a Dense layer, prompts and a max length.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common.evaluation.cost import analytic_macs, architecture, fvcore_macs, worst_case_inputs
from common.kinds.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.models.names import resolve_model_path
from common.models.structure import zero_dead_weights
from common.pruning.importance import ffn_l1_scores, head_l1_scores, select_ffn, select_heads
from common.serving.onnx_export import export_onnx
from common.serving.rank import Ranker
from conftest import NO_TOKEN_TYPES, tiny_config

FAMILIES = ["bert", "roberta", "xlm-roberta", "modernbert"]
KINDS = ["cross1", "cross2", "bi"]
POOLING = {"bert": "weightedmean", "roberta": "lasttoken", "xlm-roberta": "max", "modernbert": "cls"}
QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"]
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty " * 6]  # > 48 tokens
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _tokenizer(family: str = "bert"):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    if family in NO_TOKEN_TYPES:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "mlp_dropout",
                "embedding_dropout", "classifier_dropout")


def build(family: str, kind: str, directory: Path, dropout: float | None = None, **config_values) -> Path:
    """A tiny random-init model of ``family`` as its owner saved it (module docstring);
    ``dropout``: every dropout rate of the config (ModernBERT's default is 0, BERT's 0.1);
    ``config_values``: other config attributes."""
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    config = tiny_config(family)
    if dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, dropout)
    for key, value in config_values.items():
        setattr(config, key, value)
    raw = directory.with_name(directory.name + "-hf")
    tokenizer = _tokenizer(family)
    if kind == "bi":
        AutoModel.from_config(config).save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        modules = [Transformer(str(raw), max_seq_length=48),
                   Pooling(config.hidden_size, pooling_mode=POOLING[family]), Dense(config.hidden_size, 24)]
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
from sentence_transformers import CrossEncoder, SentenceTransformer
from transformers import AutoModelForSequenceClassification, AutoTokenizer
cells, queries, passages = (json.loads(a) for a in sys.argv[1:4])
results = {}
with torch.no_grad():
    for path, kind in cells:
        out = results[path] = {}
        if kind == "bi":
            st = SentenceTransformer(path, trust_remote_code=True, device="cpu")
            q, p = st.encode_query(queries), st.encode_document(passages)
            out.update(query=q.tolist(), passage=p.tolist(), scores=st.similarity_pairwise(q, p).tolist())
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
            batch = tokenizer(queries, passages, padding=True, truncation="only_second", return_tensors="pt")
            logits = model(**batch).logits
            out["transformers"] = (logits[:, 1] if logits.shape[-1] == 2 else logits[:, 0]).tolist()
            out["cross_encoder"] = CrossEncoder(path, trust_remote_code=True, device="cpu").predict(
                list(zip(queries, passages))).tolist()
print(json.dumps(results))
"""


class StockRun:
    """The script above on every (dir, kind) at once, in a clean interpreter (isolated mode,
    outside the repository: ``common`` cannot be imported), started now and read when first
    asked for, so that it runs beside the cells' own checks."""

    def __init__(self, cells: list[tuple[str, str]], cwd: Path):
        self.process = subprocess.Popen([sys.executable, "-I", "-c", STOCK_SCRIPT, json.dumps(cells),
                                         json.dumps(QUERIES), json.dumps(PASSAGES)],
                                        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._results = None

    def __getitem__(self, path: str) -> dict:
        if self._results is None:
            out, err = self.process.communicate(timeout=600)
            assert self.process.returncode == 0, err[-2000:]
            self._results = json.loads(out.strip().splitlines()[-1])
        return self._results[path]


def prepare(family: str, kind: str, root: Path) -> dict:
    """build -> load -> a prune step -> save masked -> reshape, with what each step gave."""
    source = build(family, kind, root / "source")
    loaded = load_model(str(source), kind="bi" if kind == "bi" else None)
    cell = {"config": loaded.model.config, "loaded_scores": scores(loaded)}
    if kind != "bi":
        trained = AutoModelForSequenceClassification.from_pretrained(source).eval()
        batch = loaded.tokenizer(QUERIES, PASSAGES, padding=True, return_tensors="pt")
        with torch.no_grad():
            cell["trained_logits"] = trained(**batch).logits.numpy()
    prune_step(loaded)
    cell["heads_per_layer"] = loaded.state.heads_per_layer
    cell["masked_scores"] = scores(loaded)
    save_model(loaded.model, loaded.tokenizer, loaded.state, root / "masked")
    cell["out"], cell["before"], cell["after"] = reshape_checkpoint(str(root / "masked"), str(root / "reshaped"))
    return cell


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """Every cell prepared; one clean interpreter opens all reshaped dirs (``cell["stock"]``)."""
    root = tmp_path_factory.mktemp("byo")
    cells = {(f, k): prepare(f, k, root / f"{f}-{k}") for f in FAMILIES for k in KINDS}
    stock = StockRun([(str(c["out"]), k) for (_f, k), c in cells.items()], root)
    yield cells | {"stock": stock}
    if stock.process.poll() is None:  # a failing first cell never read it
        stock.process.kill()
        stock.process.communicate()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_load_prune_reshape_stock_onnx(family, kind, matrix):
    cell = matrix[family, kind]
    config = cell["config"]
    if kind != "bi":  # the trained head is kept, with its own label count: score = its logit
        assert config.num_labels == (1 if kind == "cross1" else 2)
        np.testing.assert_allclose(cell["loaded_scores"], cell["trained_logits"][:, -1], atol=1e-5)
    else:
        assert config.slimrank_pooling == POOLING[family]
        assert config.slimrank_embedding["prompts"]["query"] == "query: "
        assert config.slimrank_embedding["max_seq_length"] == 48
        assert config.slimrank_embedding["normalize"] == (family != "roberta")
    out, masked_scores = cell["out"], cell["masked_scores"]
    assert cell["after"] < cell["before"]
    reshaped = load_model(str(out))
    assert reshaped.state.is_reshaped and reshaped.kind == ("bi" if kind == "bi" else "cross")
    if kind != "bi":  # the written config declares the head it has
        labels = json.loads((out / "config.json").read_text())["id2label"]
        assert labels == ({"0": "relevance"} if kind == "cross1" else {"0": "not_relevant", "1": "relevant"})
    np.testing.assert_allclose(scores(reshaped), masked_scores, atol=1e-5)

    info = export_onnx(reshaped, out, max_length=32)  # (meanwhile the stock interpreter runs)
    assert info["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    onnx_scores = Ranker.load(str(out), "onnx").score(QUERIES, PASSAGES)
    np.testing.assert_allclose(onnx_scores, masked_scores, atol=1e-4)

    stock = matrix["stock"][str(out)]
    if kind == "bi":
        ranker = Ranker.from_loaded(reshaped)
        np.testing.assert_allclose(np.array(stock["query"]), ranker.encode(QUERIES, role="query"), atol=1e-5)
        np.testing.assert_allclose(np.array(stock["passage"]), ranker.encode(PASSAGES, role="passage"), atol=1e-5)
        np.testing.assert_allclose(np.array(stock["scores"]), masked_scores, atol=1e-5)
    else:
        np.testing.assert_allclose(np.array(stock["transformers"]), masked_scores, atol=1e-5)
        if kind == "cross1":  # a CrossEncoder dir keeps its activation (sigmoid)
            np.testing.assert_allclose(np.array(stock["cross_encoder"]), 1 / (1 + np.exp(-masked_scores)), atol=1e-5)
        else:  # a transformers checkpoint: both labels' raw logits
            np.testing.assert_allclose(np.array(stock["cross_encoder"])[:, 1], masked_scores, atol=1e-5)


@pytest.mark.parametrize("family,kind", [("xlm-roberta", "cross1"), ("xlm-roberta", "bi"),
                                         ("modernbert", "cross2"), ("modernbert", "bi")])
def test_macs_equal_the_analytic_count(family, kind, matrix):
    cell = matrix[family, kind]
    reshaped = load_model(str(cell["out"]))
    batch = worst_case_inputs(reshaped.tokenizer, n_pairs=2, max_length=24)
    measured = fvcore_macs(reshaped.model, **batch)
    arch = architecture(reshaped.model)
    assert arch["heads_per_layer"] == cell["heads_per_layer"]
    assert measured == analytic_macs(seq_len=24, batch=2, **arch)


def test_packaged_tokenizer_one_label_checkpoint_loads_with_its_logit(tmp_path):
    """The issue's reproduction: BertForSequenceClassification(num_labels=1) with the packaged
    tokenizer loads; its score is the logit; 02-style continued training takes a listwise loss."""
    from argparse import Namespace

    from common.kinds import CrossKind
    source = build("bert", "cross2", tmp_path / "two")
    config = tiny_config("bert")
    config.num_labels = 1
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "one")
    _tokenizer().save_pretrained(tmp_path / "one")
    loaded = load_model(str(tmp_path / "one"))
    assert loaded.model.classifier.out_features == 1
    assert CrossKind.label_loss(Namespace(), loaded.model)[0] == "row_softmax"
    assert CrossKind.label_loss(Namespace(), load_model(str(source)).model)[0] == "cross_entropy"
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
    with pytest.raises(ValueError, match="segment_cosine head is not available for modernbert"):
        load_model(str(build("modernbert", "cross2", tmp_path / "mb")), head="segment_cosine")
    config = tiny_config("bert")
    config.model_type = "gpt2-like"
    with pytest.raises(ValueError, match="not supported"):
        from common.models.arch import adapter_for
        adapter_for(config)


@pytest.mark.parametrize("kind,target", [("cross1", "per_layer"), ("bi", "per_layer"), ("cross1", "total")])
def test_l0_seed_shape_on_xlm_roberta(kind, target, tmp_path):
    """03d --target_layers 6 --target_heads_per_layer 6 on an 8-layer x 8-head XLM-RoBERTa (BGE-M3's
    24 x 16 -> 18 x 12, scaled), a 1-label re-ranker (bge-reranker-*) and a bi-encoder (BGE-M3):
    exactly 6 layers of exactly 6 heads after the stage, and masked == reshaped (1e-5). ``total``:
    --target_heads 36 counts heads over all layers (the split is learned)."""
    import importlib

    from conftest import write_toy_triples
    source = build("xlm-roberta", kind, tmp_path / "source", hidden_size=64, num_hidden_layers=8,
                   num_attention_heads=8, intermediate_size=48)
    triples = write_toy_triples(tmp_path / "triples.tsv", 32)
    heads = ["--target_heads_per_layer", "6"] if target == "per_layer" else ["--target_heads", "36"]
    bi = ["--model_kind", "bi", "--distill_from", str(source), "--distill_target", "embeddings",
          "--contrastive_weight", "0"] if kind == "bi" else []
    importlib.import_module("03d_prune_l0").main([
        "--model_tag", str(source), "--train_triples_file", str(triples), "--output_dir",
        str(tmp_path / "l0"), "--num_training_samples", "32", "--batch_size", "8", "--max_length", "32",
        "--num_checkpoint_samples", "32", "--threads", "1", "--device", "cpu",
        "--target_layers", "6", *heads, "--l0_learning_rate", "0.2", *bi])
    last = sorted((tmp_path / "l0").glob("seen_*"))[-1]
    info = json.loads((last / "pruning.json").read_text())
    kept_layers = [h or f for h, f in zip(info["heads_per_layer"], info["ffn_per_layer"])]
    assert sum(1 for k in kept_layers if k) == 6 and sum(info["heads_per_layer"]) == 36
    if target == "per_layer":
        assert sorted(info["heads_per_layer"]) == [0, 0] + [6] * 6
        assert info["history"][-1]["l0"]["targets"] == {"heads": 36 / 64, "layers": 6 / 8}
    masked = load_model(str(last), kind="bi" if kind == "bi" else None)
    if kind == "cross1":
        assert masked.model.config.num_labels == 1
    out, _, _ = reshape_checkpoint(str(last))
    reshaped = load_model(str(out))
    assert reshaped.state.heads_per_layer == info["heads_per_layer"]
    np.testing.assert_allclose(scores(reshaped), scores(masked), atol=1e-5)


def test_pipeline_on_a_trained_one_label_cross_encoder(tmp_path):
    """A sentence-transformers CrossEncoder (1 logit) through the stages: 01 teacher scores with
    it, 02 continues its training on those scores (margin-MSE), 03a prunes heads, 04 reshapes,
    05 evaluates; its trained head is kept all the way (1 label, raw logit = the score)."""
    import importlib

    import pandas as pd

    from common.data.formats import read_candidates_json
    from conftest import SHARED, write_toy_triples

    def script(name):
        return importlib.import_module(name).main

    source = build("bert", "cross1", tmp_path / "ce")
    triples = write_toy_triples(tmp_path / "triples.tsv", 48)
    teacher = tmp_path / "teacher.parquet"
    script("01_prefetch_passages")(["teacher", "--triples", str(triples), "--checkpoint", str(source),
                                    "--output", str(teacher), "--max_length", "32"])
    rows = [line.split("\t") for line in triples.read_text().splitlines()]
    loaded = load_model(str(source))
    expected = score_pairs(loaded.model, loaded.tokenizer, [r[0] for r in rows], [r[1] for r in rows], max_length=32)
    np.testing.assert_allclose(pd.read_parquet(teacher)["teacher_pos"].to_numpy(), expected, atol=1e-5)

    common = ["--train_triples_file", str(triples), "--batch_size", "8", "--max_length", "32",
              "--threads", "1", "--device", "cpu", "--num_checkpoint_samples", "16"]
    script("02_train_initial")(["--model_tag", str(source), "--output_dir", str(tmp_path / "02"),
                                "--num_training_samples", "16", "--distill_scores", str(teacher),
                                "--learning_rate", "1e-3", *common])
    trained = load_model(str(tmp_path / "02" / "seen_000000016"))
    assert trained.model.classifier.out_features == 1
    assert not torch.equal(trained.model.classifier.weight, loaded.model.classifier.weight)  # it trained
    script("03a_prune_heads")(["--checkpoint_dir", str(tmp_path / "02" / "seen_000000016"), "--output_dir",
                               str(tmp_path / "03a"), "--num_training_samples", "32", "--target_sparsity", "0.25",
                               *common])
    pruned = sorted((tmp_path / "03a").glob("seen_*"))[-1]
    script("04_reshape")(["--checkpoint_dir", str(pruned)])
    reshaped = load_model(str(pruned / "reshaped"))
    assert reshaped.state.is_reshaped and reshaped.model.config.num_labels == 1
    cands = read_candidates_json(SHARED / "dl20" / "bm25.json")
    small = cands[cands["qid"].isin(cands["qid"].unique()[:2])].groupby("qid").head(10)
    small.to_parquet(tmp_path / "small.parquet")
    script("05_eval_trec")(["--checkpoint", str(pruned / "reshaped"), "--candidates", str(tmp_path / "small.parquet"),
                            "--qrels", str(SHARED / "dl20/qrels.txt"), "--topics", "dl20", "--results",
                            str(tmp_path / "r.parquet"), "--table", str(tmp_path / "r.md"), "--max_length", "32",
                            "--no_costs"])
    assert 0 <= pd.read_parquet(tmp_path / "r.parquet").iloc[0]["ndcg@10"] <= 1


# -- the docs' table of families x kinds x what is tested, against the tests' parametrisation ---
DOC = Path(__file__).resolve().parents[1] / "docs" / "bring_your_own.md"
TABLE_KINDS = {"cross 1 label": "cross1", "cross 2 labels": "cross2", "bi": "bi", "segment": "segment"}


def doc_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """(header, {family: {column: cell}}) of the table (a row may name several families)."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        for family in cells[0].split(" (")[0].split(", "):
            rows[family] = dict(zip(header[1:], cells[1:]))
    return header, rows


def parametrised(test) -> list[dict]:
    """The arguments of each case of ``test`` (the product of its parametrize marks)."""
    cases = [{}]
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names = [n.strip() for n in mark.args[0].split(",")]
            values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
            cases = [case | dict(zip(names, v)) for case in cases for v in values]
    return cases


def named_tests(cell: str) -> list[str]:
    """The test files a cell names: ``✓ ... (test_a, test_b)``."""
    found = re.search(r"\((test_\w+(?:, test_\w+)*)\)$", cell)
    return found.group(1).split(", ") if found else []


def test_docs_table_is_the_test_matrix():
    """docs/bring_your_own.md's table: a bare ✓ in a kind column is a cell of this file's matrix and
    every cell of the matrix is one; the MACs, DDP and resume columns list what the
    parametrisations of test_byo, test_ddp and test_pruning run; a ✓ naming a file names one that
    exists and tests that family."""
    import test_ddp
    import test_pruning

    header, rows = doc_table()
    assert header[1:4] == ["cross, 1 label (CrossEncoder dir)", "cross, 2 labels", "bi (SentenceTransformer dir)"]
    macs_column, ddp_column, resume_column = header[5:8]
    assert (macs_column, ddp_column, resume_column) == ("MACs fvcore == analytic", "DDP 2 gloo ranks == 1",
                                                      "exact resume")
    matrix = {(case["family"], case["kind"]) for case in parametrised(test_matrix_load_prune_reshape_stock_onnx)}
    assert matrix == {(f, k) for f in FAMILIES for k in KINDS}
    marked = {(family, kind) for family, cells in rows.items() for kind, column in zip(KINDS, header[1:4])
              if cells[column].startswith("✓") and not named_tests(cells[column])}
    assert marked == matrix
    for family in FAMILIES:  # the bi cell says the pooling the matrix builds
        assert POOLING[family] in rows[family][header[3]]

    macs = {case["family"] for case in parametrised(test_macs_equal_the_analytic_count)}
    assert {f for f, cells in rows.items() if named_tests(cells[macs_column]) == ["test_byo"]} == macs
    for column, test, file in ((ddp_column, test_ddp.test_two_ranks_equal_one_process_on_byo_families, "test_ddp"),
                               (resume_column, test_pruning.test_prune_and_resume_equals_straight_run_on_byo_families,
                                "test_pruning")):
        kinds: dict[str, set] = {}
        for case in parametrised(test):
            kinds.setdefault(case["family"], set()).add(case["model_kind"].split("-")[0])  # bi-contrastive: bi
        for family, tested in kinds.items():
            cell = rows[family][column]
            listed = {TABLE_KINDS[k] for k in cell.removeprefix("✓").split(" (")[0].strip().split(", ")}
            assert cell.startswith("✓") and listed == tested and file in named_tests(cell), (family, column, cell)
    for family, cells in rows.items():
        for column, cell in cells.items():
            for name in named_tests(cell):
                assert cell.startswith("✓"), (family, column, cell)
                text = (Path(__file__).with_name(f"{name}.py")).read_text()
                assert f'"{family}"' in text, f"{name}.py does not test {family} ({column})"
