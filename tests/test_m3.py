"""BGE-M3 heads (common.models.m3): sparse weights, MaxSim, the self-distillation loss by hand,
FlagEmbedding's head files, and the three scores through masking, saving and reshaping."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from torch import nn

from common.models import m3
from common.training.losses import self_distill_loss
from common.kinds.loading import load_model, reshape_checkpoint, save_model
from common.models.structure import zero_dead_weights
from conftest import straight_and_resumed

QUERIES = ["what is a cat", "how tall is mount everest"]
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall", "the stock market fell today"]


def test_sparse_takes_the_max_per_token_id_and_ignores_special_tokens():
    heads = m3.M3Heads(hidden=4, vocab_size=10, special_ids=[0, 1, 2], heads=("dense", "sparse"))
    with torch.no_grad():
        heads.sparse_linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        heads.sparse_linear.bias.zero_()
    ids = torch.tensor([[1, 5, 7, 5, 9, 2, 0], [1, 9, 2, 0, 0, 0, 0]])  # CLS=1, SEP=2, PAD=0
    first = torch.tensor([[9.0, 0.5, -1.0, 2.0, 0.25, 3.0, 4.0], [7.0, 1.5, 6.0, 8.0, 8.0, 8.0, 8.0]])
    hidden = torch.zeros(2, 7, 4)
    hidden[..., 0] = first
    weights = heads.sparse(hidden, ids)
    want = torch.zeros(2, 10)
    want[0, 5], want[0, 9] = 2.0, 0.25  # id 5: max(0.5, 2.0); id 7: ReLU(-1) = 0
    want[1, 9] = 1.5  # CLS, SEP and PAD weigh 0 however large their own weights
    torch.testing.assert_close(weights, want)
    torch.testing.assert_close(m3.sparse_scores(weights, weights), torch.tensor(
        [[4.0 + 0.0625, 0.25 * 1.5], [1.5 * 0.25, 2.25]]))


def test_maxsim_matches_a_hand_computation():
    q = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 0.0]]])  # 2 real tokens + padding
    q_mask = torch.tensor([[1, 1, 0]])
    p = torch.tensor([[[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], [[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])
    p_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # passage 0: token 1 best 0.8 (with [0.8, 0.6]); token 2 best max(0.96, 0.8, -0.6) = 0.96
    # passage 1: token 1 best max(-1, 0) = 0; token 2 best max(-0.6, -0.8) = -0.6 (not the pad's 0)
    want = torch.tensor([[(0.8 + 0.96) / 2, (0.0 - 0.6) / 2]])
    torch.testing.assert_close(m3.maxsim(q, q_mask, p, p_mask), want)
    # the ColBERT head drops the first token, zeroes padding and normalises
    heads = m3.M3Heads(hidden=2, vocab_size=5, special_ids=[], heads=("dense", "colbert"))
    with torch.no_grad():
        heads.colbert_linear.weight.copy_(2 * torch.eye(2))
        heads.colbert_linear.bias.zero_()
    vectors, mask = heads.colbert(torch.tensor([[[5.0, 5.0], [3.0, 4.0], [1.0, 1.0]]]), torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(vectors, torch.tensor([[[0.6, 0.8], [0.0, 0.0]]]))
    assert mask.tolist() == [[1, 0]]


def test_self_distillation_loss_matches_a_hand_computation():
    scores = {"dense": torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]]),
              "sparse": torch.tensor([[1.0, 3.0, 0.0], [0.5, 0.5, 4.0]]),
              "colbert": torch.tensor([[0.3, 0.2, 0.1], [-0.5, 1.5, 0.0]])}
    target = torch.tensor([0, 1])

    def log_softmax(row):
        top = max(row)
        z = math.log(sum(math.exp(x - top) for x in row)) + top
        return [x - z for x in row]

    rows = {k: v.tolist() for k, v in scores.items()}
    ens = [[rows["dense"][i][j] + 0.3 * rows["sparse"][i][j] + rows["colbert"][i][j] for j in range(3)]
           for i in range(2)]

    def ce(matrix):
        return -sum(log_softmax(matrix[i])[target[i]] for i in range(2)) / 2

    def sce(matrix):
        total = 0.0
        for i in range(2):
            t = [math.exp(x) for x in log_softmax(ens[i])]
            total -= sum(tj * lj for tj, lj in zip(t, log_softmax(matrix[i])))
        return total / 2

    task = (ce(rows["dense"]) + ce(ens) + 0.1 * ce(rows["sparse"]) + ce(rows["colbert"])) / 4
    distill = (sce(rows["dense"]) + 0.1 * sce(rows["sparse"]) + sce(rows["colbert"])) / 3
    got = self_distill_loss(scores, target)
    assert got.item() == pytest.approx((task + distill) / 2, rel=1e-6)
    assert self_distill_loss(scores, target, self_distill=False).item() == pytest.approx(task, rel=1e-6)
    # the ensemble teaches without being taught: no gradient flows through the targets
    leaves = {k: v.clone().requires_grad_() for k, v in scores.items()}
    self_distill_loss(leaves, target).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in leaves.values())


def three_scores(loaded):
    model = loaded.model.eval()
    with torch.no_grad():
        q = m3.encode_all(model, loaded.tokenizer, QUERIES, "mean", max_length=32)
        p = m3.encode_all(model, loaded.tokenizer, PASSAGES, "mean", max_length=32)
        return m3.score_matrices(q, p)


def test_three_heads_survive_saving_and_reshape(tiny_models, tmp_path):
    torch.manual_seed(0)
    loaded = load_model(str(tiny_models["bert"]), kind="bi", heads="dense,sparse,colbert")
    assert loaded.model.config.slimrank_heads == ["dense", "sparse", "colbert"]
    state = loaded.state
    state.kept_heads[1] = []
    state.kept_heads[2] = [0, 3]
    state.kept_ffn[0] = []
    state.kept_ffn[2] = list(range(0, state.ffn_size, 3))
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, state)
    masked = three_scores(loaded)
    assert set(masked) == {"dense", "sparse", "colbert", "combined"} and masked["sparse"].abs().sum() > 0
    save_model(loaded.model, loaded.tokenizer, state, tmp_path / "masked")
    for name, linear in (("sparse", loaded.model.m3_heads.sparse_linear),
                         ("colbert", loaded.model.m3_heads.colbert_linear)):
        saved = torch.load(tmp_path / "masked" / m3.HEAD_FILES[name], weights_only=True)
        assert set(saved) == {"weight", "bias"}
        torch.testing.assert_close(saved["weight"], linear.weight.detach())
    reshaped, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    assert after < before
    for path in (tmp_path / "masked", reshaped):
        again = three_scores(load_model(str(path)))
        for name in masked:
            torch.testing.assert_close(again[name], masked[name], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="has the heads dense,sparse,colbert, not --heads dense"):
        load_model(str(reshaped), heads="dense")


def test_a_bge_m3_dir_gives_its_head_files(tiny_models, tmp_path):
    """A plain dir with FlagEmbedding's head files: --heads loads them; a file that is not plain
    tensors (a pickled object) is refused by weights_only loading."""
    import shutil

    source = tmp_path / "bge"
    shutil.copytree(tiny_models["bert"], source)
    sparse, colbert = nn.Linear(32, 1), nn.Linear(32, 16)  # a ColBERT width of its own
    torch.save(sparse.state_dict(), source / "sparse_linear.pt")
    torch.save(colbert.state_dict(), source / "colbert_linear.pt")
    heads = load_model(str(source), kind="bi", heads="dense,sparse,colbert").model.m3_heads
    torch.testing.assert_close(heads.sparse_linear.weight, sparse.weight)
    torch.testing.assert_close(heads.colbert_linear.bias, colbert.bias)
    assert heads.special_ids and 0 in heads.special_ids  # [PAD] of the BERT vocabulary
    torch.save({"weight": sparse.weight, "bias": sparse.bias, "extra": nn.ReLU()}, source / "sparse_linear.pt")
    with pytest.raises(ValueError, match="sparse_linear.pt: not a state dict of plain tensors"):
        load_model(str(source), kind="bi", heads="dense,sparse")
    with pytest.raises(ValueError, match="--heads must be dense"):
        load_model(str(source), kind="bi", heads="sparse")


def test_unified_training_trains_all_three_heads(tiny_models, toy_triples, tmp_path):
    """02's loop with --heads dense,sparse,colbert: the unified self-distillation loss, every head
    moves, the checkpoint carries FlagEmbedding's head files and reloads with its heads."""
    from common.training.loop import TrainArgs, Trainer
    from common.training.schedules import WarmupLinear

    args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "m3"),
                     num_training_samples=32, num_checkpoint_samples=0, model_tag=str(tiny_models["bert"]),
                     model_kind="bi", heads="dense,sparse,colbert", batch_size=8, max_length=32,
                     learning_rate=1e-3, seed=1)
    args.validate()
    trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
    assert trainer.loss.name == "m3_self_distill"
    start = {k: v.detach().clone() for k, v in trainer.model.m3_heads.state_dict().items()}
    final = trainer.train()
    for key, value in trainer.model.m3_heads.state_dict().items():
        assert not torch.equal(value, start[key]), key
    for name in m3.HEAD_FILES.values():
        assert (final / name).is_file()
    again = load_model(str(final))
    assert again.model.config.slimrank_heads == ["dense", "sparse", "colbert"]
    torch.testing.assert_close(again.model.m3_heads.colbert_linear.weight,
                               trainer.model.m3_heads.colbert_linear.weight.detach())
    bad = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "x"),
                    num_training_samples=32, model_tag="m", heads="colbert")
    with pytest.raises(ValueError, match="--heads must be dense"):
        bad.validate()


def test_ranker_and_05_score_every_head(tiny_models, tmp_path):
    """Ranker.head_scores gives each head's pair scores (dense = its plain score), and 05's
    evaluation adds a quality row per head and for the combination."""
    import pandas as pd

    from common.data.formats import write_candidates
    from common.evaluation.rerank import evaluate_model
    from common.serving.rank import Ranker

    torch.manual_seed(0)
    loaded = load_model(str(tiny_models["bert"]), kind="bi", heads="dense,sparse,colbert")
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "m3")
    ranker = Ranker.load(str(tmp_path / "m3"), max_length=32, batch_size=2)
    queries = [QUERIES[0]] * 3 + [QUERIES[1]] * 3
    passages = PASSAGES + PASSAGES[::-1]
    got = ranker.head_scores(queries, passages)
    assert set(got) == {"dense", "sparse", "colbert", "combined"}
    np.testing.assert_allclose(got["dense"], ranker.score(queries, passages), atol=1e-5)
    want = three_scores(load_model(str(tmp_path / "m3")))
    for name in ("sparse", "colbert", "combined"):
        np.testing.assert_allclose(got[name][:3], want[name][0].numpy(), atol=1e-5)
        np.testing.assert_allclose(got[name][3:], want[name][1].numpy()[::-1], atol=1e-5)

    candidates = pd.DataFrame({"qid": ["1"] * 3 + ["2"] * 3, "query": queries, "docid": ["a", "b", "c", "c", "b", "a"],
                               "rank": [1, 2, 3, 1, 2, 3], "first_stage_score": [3.0, 2, 1, 3, 2, 1],
                               "passage": passages})
    write_candidates(candidates, tmp_path / "cands.parquet")
    (tmp_path / "qrels.txt").write_text("1 0 a 2\n2 0 b 3\n")
    rows = evaluate_model(str(tmp_path / "m3"), str(tmp_path / "cands.parquet"), str(tmp_path / "qrels.txt"),
                          "toy", max_length=32, output_dir=str(tmp_path / "eval"))
    assert [r["checkpoint"].rsplit("+", 1)[-1] for r in rows[1:]] == ["head:sparse", "head:colbert", "head:combined"]
    assert all(r["method"] == "m3_head" and 0 <= r["ndcg@10"] <= 1 for r in rows[1:])


def test_training_with_heads_resumes_exactly(tiny_models, toy_triples, tmp_path):
    """Stopped at a checkpoint and resumed, unified training ends where a straight run ends:
    encoder and both heads (their optimizer state travels with the checkpoint)."""
    from common.training.loop import TrainArgs, Trainer
    from common.training.schedules import WarmupLinear

    def run(out, every=0, checkpoint_dir=None, stop=None):
        args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(out), num_training_samples=32,
                         num_checkpoint_samples=every, model_tag=str(tiny_models["bert"]),
                         checkpoint_dir=checkpoint_dir, model_kind="bi", heads="dense,sparse,colbert",
                         batch_size=8, max_length=32, learning_rate=1e-3, seed=2)
        trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
        if stop:
            trainer.total_steps = stop
        return trainer.train()

    straight, end, a, b = straight_and_resumed(run, tmp_path)
    assert not any(k.startswith("m3_heads") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    for name in m3.HEAD_FILES.values():
        x, y = torch.load(straight / name, weights_only=True), torch.load(end / name, weights_only=True)
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=0)


def test_pruning_with_heads_keeps_them(tiny_models, toy_triples, tmp_path):
    """02 --heads, then 03c prunes the encoder while the unified loss trains, then 04 reshapes:
    the heads travel through every stage and the reshaped model scores as the masked one."""
    import importlib

    common = ["--train_triples_file", str(toy_triples), "--max_length", "32", "--batch_size", "8",
              "--threads", "1", "--learning_rate", "1e-3"]
    importlib.import_module("02_train_initial").main(
        ["--model_tag", str(tiny_models["bert"]), "--model_kind", "bi", "--heads", "dense,sparse,colbert",
         "--output_dir", str(tmp_path / "initial"), "--num_training_samples", "16",
         "--num_checkpoint_samples", "16", *common])
    initial = tmp_path / "initial" / "seen_000000016"
    importlib.import_module("03c_prune_mixed").main(
        ["initial", "--checkpoint_dir", str(initial), "--output_dir", str(tmp_path / "mixed"),
         "--num_training_samples", "48", "--num_prune_cycles", "2", "--target_heads", "8",
         "--target_ffn", "24", "--exclude_layers", "", *common])
    (pruned,) = list((tmp_path / "mixed").glob("seen_*"))
    assert all((pruned / name).is_file() for name in m3.HEAD_FILES.values())
    importlib.import_module("04_reshape").main(["--checkpoint_dir", str(pruned), "--onnx", "--max_length", "32"])
    masked, reshaped = three_scores(load_model(str(pruned))), three_scores(load_model(str(pruned / "reshaped")))
    assert load_model(str(pruned)).state.total_heads == 8
    for name in masked:
        torch.testing.assert_close(reshaped[name], masked[name], atol=1e-5, rtol=0)
    # --onnx: the reshaped graph's three outputs are the torch model's, and score as the masked one
    from common.serving.rank import Ranker

    diffs = graph_vs_torch(pruned / "reshaped")
    assert max(diffs.values()) <= 1e-4, diffs
    queries, passages = [QUERIES[0]] * 3 + [QUERIES[1]] * 3, PASSAGES * 2
    want = Ranker.load(str(pruned), max_length=32).head_scores(queries, passages)
    got = Ranker.load(str(pruned / "reshaped"), "onnx", max_length=32).head_scores(queries, passages)
    assert set(got) == set(want) == {"dense", "sparse", "colbert", "combined"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the heads in ONNX


def graph_vs_torch(directory, texts=QUERIES + PASSAGES, file="model.onnx") -> dict:
    """The exported graph run as a plain onnxruntime user runs it, against the torch model of
    ``directory``: each head's max |difference| (dense embedding, per-id sparse vector, ColBERT
    vectors), after checking the graph zeroes special tokens and padding."""
    import onnxruntime

    loaded = load_model(str(directory))
    session = onnxruntime.InferenceSession(str(directory / "onnx" / file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output", "sparse_weights", "colbert_vecs"]
    batch = loaded.tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch has padding
    dense, weights, vecs = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert weights.shape == ids.shape and vecs.shape[:2] == (len(texts), ids.shape[1] - 1)
    special = np.isin(ids, loaded.tokenizer.all_special_ids) | (mask == 0)
    assert (weights[special] == 0).all() and (weights[~special] > 0).any()
    assert (vecs[mask[:, 1:] == 0] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(vecs[mask[:, 1:] == 1], axis=-1), 1, atol=1e-5)
    # the per-id max outside the graph, as FlagEmbedding's _process_token_weights does it
    lexical = np.zeros((len(texts), loaded.model.config.vocab_size), dtype=np.float32)
    for row in range(len(texts)):
        np.maximum.at(lexical[row], ids[row], weights[row])
    loaded.model.eval()
    with torch.no_grad():
        want = m3.encode_all(loaded.model, loaded.tokenizer, texts, "mean", max_length=32)
    return {"dense": float(np.abs(dense - want["dense"].numpy()).max()),
            "sparse": float(np.abs(lexical - want["sparse"].numpy()).max()),
            "colbert": float(np.abs(vecs - want["colbert"][0].numpy()).max())}


@pytest.fixture(params=["bert", "roberta"])
def m3_dir(request, tiny_models, tmp_path):
    """A saved bi-encoder with the three heads, exported to ONNX (fp32 and int8)."""
    from common.serving.onnx_export import export_onnx

    torch.manual_seed(0)
    loaded = load_model(str(tiny_models[request.param]), kind="bi", heads="dense,sparse,colbert")
    with torch.no_grad():  # random-init: make some lexical weights positive
        loaded.model.m3_heads.sparse_linear.bias.fill_(0.5)
    out = tmp_path / "m3"
    save_model(loaded.model, loaded.tokenizer, loaded.state, out)
    return out, export_onnx(load_model(str(out)), out, max_length=64)


def test_onnx_exports_the_three_heads(m3_dir):
    """model.onnx outputs output, sparse_weights and colbert_vecs, each torch's within 1e-4
    (checked at export time too, and recorded); the int8 graph has the same outputs."""
    out, info = m3_dir
    diffs = graph_vs_torch(out)
    assert max(diffs.values()) <= 1e-4, diffs
    assert list(info["outputs"]) == ["output", "sparse_weights", "colbert_vecs"]
    assert set(info["onnx"]["max_abs_diff_vs_torch_by_output"]) == set(info["outputs"])
    assert max(info["onnx"]["max_abs_diff_vs_torch_by_output"].values()) <= 1e-4
    assert info["onnx"]["max_abs_diff_vs_torch"] == info["onnx"]["max_abs_diff_vs_torch_by_output"]["output"]
    int8 = graph_vs_torch(out, file="model_int8.onnx")
    assert 0 < max(int8.values()) < 0.1, int8  # the quantized graph: close, not equal


def test_head_scores_run_on_the_onnx_outputs(m3_dir, tmp_path):
    """Ranker.head_scores on onnx == torch within 1e-4 for every head and the combination; on
    onnx-int8 it uses the quantized graph's outputs; a graph exported without the heads' outputs
    (an older export) falls back to torch for sparse and ColBERT."""
    import shutil

    from common.serving.onnx_export import export_onnx
    from common.serving.rank import Ranker

    out, _ = m3_dir
    queries = [QUERIES[0]] * 3 + [QUERIES[1]] * 3
    passages = PASSAGES + PASSAGES[::-1]
    scores = {backend: Ranker.load(str(out), backend, max_length=32, batch_size=2).head_scores(queries, passages)
              for backend in ("torch", "onnx", "onnx-int8")}
    assert set(scores["onnx"]) == {"dense", "sparse", "colbert", "combined"}
    assert (scores["torch"]["sparse"] > 0).any()
    for name, want in scores["torch"].items():
        np.testing.assert_allclose(scores["onnx"][name], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(scores["onnx-int8"][name], want, atol=0.05, rtol=0)
    assert not np.array_equal(scores["onnx-int8"]["colbert"], scores["onnx"]["colbert"])

    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.rmtree(old / "onnx")
    bare = load_model(str(old))
    del bare.model.m3_heads  # exported as before the heads had outputs
    export_onnx(bare, old, max_length=64)
    ranker = Ranker.load(str(old), "onnx", max_length=32, batch_size=2)
    assert ranker.runner.outputs == ["output"]
    got = ranker.head_scores(queries, passages)
    for name in ("sparse", "colbert"):  # the torch path, bit for bit
        np.testing.assert_array_equal(got[name], scores["torch"][name])
    np.testing.assert_allclose(got["dense"], scores["torch"]["dense"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["bi", "cross"])
def test_a_model_without_heads_exports_its_one_output(kind, tiny_models, tmp_path):
    import onnx

    from common.serving.onnx_export import export_onnx

    loaded = load_model(str(tiny_models["bert"]), kind=kind)
    out = tmp_path / kind
    save_model(loaded.model, loaded.tokenizer, loaded.state, out)
    info = export_onnx(load_model(str(out)), out, max_length=64)
    for file in ("model.onnx", "model_int8.onnx"):
        graph = onnx.load(str(out / "onnx" / file)).graph
        assert [o.name for o in graph.output] == ["output"]
        dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        assert dims[0] == "batch" and len(dims) == (2 if kind == "bi" else 1)
    assert "outputs" not in info and "max_abs_diff_vs_torch_by_output" not in info["onnx"]
