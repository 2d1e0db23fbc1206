"""Decoder-LLM text encoders (llama, mistral, qwen2, qwen3; tiny random-init configs): pooling and
padding, grouped-query heads and SwiGLU neurons, L3Prune from one forward pass, LoRA recovery,
and the saved dir in stock sentence-transformers with the query prompt."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common.evaluation import cost
from common.models.encoders import encode
from common.models.loading import keep_first_layers
from common.kinds.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.models.structure import analytic_param_count, zero_dead_weights
from common.pruning.l3prune import choose, layerwise_losses
from common.serving.onnx_export import export_onnx
from common.serving.rank import Ranker
from common.models.lora import add_lora

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import DECODERS, make_tiny_decoder, make_tiny_reranker  # noqa: E402

INSTRUCTION = "Instruct: given a web search query retrieve relevant passages that answer the query : "
QUERIES = ["what is topic 3 about", "what is topic 5", "topic 1"]
PASSAGES = ["passage about topic 3 and its details number 12", "unrelated text on subject 7",
            "passage about topic 5 with words 3 4 5 6 7 8 9"]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {f: make_tiny_decoder(f, root / f) for f in DECODERS}


def _padded(loaded, texts, pooling, side):
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = side
    try:
        return encode(loaded.model, tokenizer, texts, pooling=pooling, batch_size=len(texts))
    finally:
        tokenizer.padding_side = "right"


@pytest.mark.parametrize("family", DECODERS)
def test_pooling_is_the_same_for_left_right_and_no_padding(family, decoders):
    loaded = load_model(str(decoders[family]), kind="bi")
    assert loaded.model.config.slimrank_pooling == "lasttoken" and not loaded.model.config.use_cache
    texts = PASSAGES + QUERIES
    for pooling in ("last", "mean", "weighted_mean"):
        alone = torch.cat([encode(loaded.model, loaded.tokenizer, [t], pooling=pooling) for t in texts])
        for side in ("right", "left"):
            torch.testing.assert_close(_padded(loaded, texts, pooling, side), alone, atol=1e-5, rtol=0)
    # the poolings differ (a bug that ignored the choice would not)
    last, mean = (encode(loaded.model, loaded.tokenizer, texts, pooling=p) for p in ("last", "mean"))
    assert (last - mean).abs().max() > 1e-3


def test_tokenizer_without_pad_pads_with_eos_and_says_so(decoders, capsys):
    loaded = load_model(str(decoders["llama"]), kind="bi")
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if "no pad token" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    ids = tokenizer("what is topic 3")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # BOS kept, EOS appended
    assert ids.count(tokenizer.eos_token_id) == 1
    mean = load_model(str(decoders["llama"]), kind="bi", pooling="mean")  # no EOS needed without `last`
    assert mean.tokenizer("what is topic 3")["input_ids"][-1] != tokenizer.eos_token_id


def _prune_groups(state):
    """A layer without attention, a layer with one of its two key/value groups, partial FFNs."""
    state.kept_heads[1] = [1]
    state.kept_heads[2] = []
    state.kept_ffn[0] = list(range(0, state.ffn_size, 2))
    state.kept_ffn[3] = []


def _stock(path: Path, cwd: Path) -> dict:
    """sentence-transformers in a clean interpreter (isolated: slimrank is not importable)."""
    script = f"""
import json, sys
try:
    import common  # noqa: F401
    sys.exit("slimrank is importable")
except ImportError:
    pass
from sentence_transformers import SentenceTransformer
st = SentenceTransformer({str(path)!r}, trust_remote_code=True, device="cpu")
q = st.encode({QUERIES!r}, prompt_name="query", convert_to_numpy=True)
p = st.encode({PASSAGES!r}, convert_to_numpy=True)
print(json.dumps({{"queries": q.tolist(), "passages": p.tolist(), "prompts": st.prompts}}))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ours(path: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_model(str(path))
    ranker = Ranker.from_loaded(loaded)
    return ranker.encode(QUERIES, role="query"), ranker.encode(PASSAGES, role="passage")


@pytest.mark.parametrize("family", DECODERS)
def test_gqa_groups_and_swiglu_neurons_masked_equals_reshaped(family, decoders, tmp_path):
    loaded = load_model(str(decoders[family]), kind="bi", query_instruction=INSTRUCTION)
    model, state = loaded.model.eval(), loaded.state
    d = getattr(model.config, "head_dim", None) or 32 // 4
    assert state.num_heads == 2 and state.head_size == 2 * d  # a unit: one key/value group
    unpruned = sum(p.numel() for p in model.parameters())
    _prune_groups(state)
    loaded.masks.refresh()
    zero_dead_weights(model, state)
    masked = encode(model, loaded.tokenizer, QUERIES + PASSAGES)
    save_model(model, loaded.tokenizer, state, tmp_path / "masked")
    out, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    again = load_model(str(out))
    assert again.state.heads_per_layer == [2, 1, 0, 2] and again.state.ffn_per_layer == [24, 48, 48, 0]
    reshaped = encode(again.model, again.tokenizer, QUERIES + PASSAGES)
    torch.testing.assert_close(reshaped, masked, atol=1e-5, rtol=0)
    layer1 = again.model.layers[1].self_attn
    assert layer1.q_proj.out_features == 2 * d and layer1.k_proj.out_features == d  # groups stay uniform
    assert again.model.layers[1].mlp.gate_proj.out_features == 48 == again.model.layers[1].mlp.up_proj.out_features
    assert again.model.layers[0].mlp.down_proj.in_features == 24
    assert after == analytic_param_count(again.state, 32, unpruned, groups=2, qkv_bias=family == "qwen2",
                                         ffn_matrices=3, ffn_bias=False,
                                         attention_rest=2 * d if family == "qwen3" else 0)
    # fvcore (SDPA with grouped keys/values) == the analytic count, unpruned and reshaped
    for m in (model, again.model):
        inputs = cost.worst_case_inputs(again.tokenizer, n_pairs=2, max_length=16)
        arch = cost.architecture(m)
        assert arch["kv_groups"] == 2 and arch["ffn_matrices"] == 3
        assert cost.fvcore_macs(m, **inputs) == cost.analytic_macs(seq_len=16, batch=2, **arch)
    # stock sentence-transformers (the standalone modeling code, the query prompt) == slimrank
    stock = _stock(out, tmp_path)
    assert stock["prompts"]["query"] == INSTRUCTION
    q, p = _ours(out)
    np.testing.assert_allclose(np.array(stock["queries"]), q, atol=1e-5)
    np.testing.assert_allclose(np.array(stock["passages"]), p, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_layerwise_loss_in_one_pass_equals_the_cut_models(family, decoders, toy_triples):
    loaded = load_model(str(decoders[family]), kind="bi")
    losses = layerwise_losses(loaded, str(toy_triples), rows=16, batch_size=8, max_length=32)
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert loaded.state.num_layers == 4  # untouched
    for k in (1, 3):
        cut = load_model(str(decoders[family]), kind="bi")
        keep_first_layers(cut, k)
        assert layerwise_losses(cut, str(toy_triples), rows=16, batch_size=8, max_length=32)[-1] == \
            pytest.approx(losses[k - 1], rel=1e-5)


def test_keep_layers_fraction_count_and_bad_values(decoders, toy_triples, tmp_path, capsys):
    reshape = importlib.import_module("04_reshape")
    source = str(decoders["qwen3"])
    reshape.main(["--checkpoint_dir", source, "--model_kind", "bi", "--keep_layers", "0.3",
                  "--output_dir", str(tmp_path / "p30")])
    assert json.loads((tmp_path / "p30" / "config.json").read_text())["num_hidden_layers"] == 2  # int(4 * 0.7)
    assert len(load_model(str(tmp_path / "p30")).model.layers) == 2
    for bad in ("0.0", "1.5", "5", "0", "-1", "half"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            reshape.main(["--checkpoint_dir", source, "--model_kind", "bi", "--keep_layers", bad,
                          "--output_dir", str(tmp_path / f"bad{bad}")])
        if bad == "5":  # more layers than the model has: known once its config is read
            message = str(exit_info.value.code)
            assert message == "error: --keep_layers 5: the model has 4 layers (keep 1..4)"
        else:  # argparse: a usage line and one error line naming the flag
            assert exit_info.value.code == 2
            errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert len(errors) == 1 and "--keep_layers" in errors[0] and repr(bad) in errors[0], errors
        assert not (tmp_path / f"bad{bad}").exists()


def test_lora_merged_dir_computes_what_the_adapted_model_does(decoders, tmp_path):
    loaded = load_model(str(decoders["qwen2"]), kind="bi")
    adapted = add_lora(loaded.model, rank=4, alpha=8.0)
    assert len(adapted) == 4 * 7  # every projection of every layer
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    loaded.model.eval()
    expected = encode(loaded.model, loaded.tokenizer, QUERIES + PASSAGES)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "merged")
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    again = load_model(str(tmp_path / "merged"))
    torch.testing.assert_close(encode(again.model, again.tokenizer, QUERIES + PASSAGES), expected,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--lora_targets qkv: no such linear layer"):
        add_lora(load_model(str(decoders["qwen2"]), kind="bi").model, 4, 8.0, ["q_proj", "qkv"])


def _train(args: list[str]) -> None:
    importlib.import_module("02_train_initial").main(args)


def _train_losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def _noisy_deep_layers(source: Path, directory: Path) -> Path:
    """A copy of ``source`` whose last two layers add loud noise (attention and FFN outputs x30):
    a model in which L3Prune has layers to drop (with mean pooling and these seeds it keeps 1-3 of
    4), as a random-init model's loss need not rise with depth."""
    model = AutoModel.from_pretrained(source)
    with torch.no_grad():
        for i in (2, 3):
            model.layers[i].mlp.down_proj.weight.mul_(30.0)
            model.layers[i].self_attn.o_proj.weight.mul_(30.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def _repeated_triples(path: Path, source: Path) -> Path:
    """8 triples, repeated: every step of 16 pairs sees the same batch, so the loss must fall."""
    lines = source.read_text().splitlines()[:8]
    path.write_text("\n".join(lines * 16) + "\n")
    return path


@pytest.mark.parametrize("family", DECODERS)
def test_llm_l3prune_lora_recovery_end_to_end(family, decoders, toy_triples, tmp_path):
    """layerwise loss -> small / large -> LoRA recovery (the loss falls) -> merged plain dir ->
    stock SentenceTransformer with the query prompt == slimrank's embeddings."""
    reshape = importlib.import_module("04_reshape")
    source = _noisy_deep_layers(decoders[family], tmp_path / "source")
    dirs = {}
    for rule in ("small", "large"):
        dirs[rule] = tmp_path / rule
        reshape.main(["--checkpoint_dir", str(source), "--model_kind", "bi", "--pooling",
                      "mean", "--query_instruction", INSTRUCTION, "--keep_layers", rule,
                      "--layer_loss_triples", str(toy_triples), "--layer_loss_rows", "16",
                      "--output_dir", str(dirs[rule])])
    notes = {r: json.loads((d / "pruning.json").read_text())["history"][-1]["l3prune"] for r, d in dirs.items()}
    assert notes["small"]["losses"] == notes["large"]["losses"]  # one layerwise loss, two choices
    assert notes["small"]["small"] <= notes["large"]["large"] and notes["small"]["small"] < 4  # layers dropped
    assert choose(notes["small"]["losses"]) == {"small": notes["small"]["small"], "large": notes["large"]["large"]}
    for rule, d in dirs.items():
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == notes[rule][rule]
    run = tmp_path / "recover"
    triples = _repeated_triples(tmp_path / "repeated.tsv", toy_triples)
    _train(["--checkpoint_dir", str(dirs["small"]), "--stage", "recover", "--train_triples_file",
            str(triples), "--output_dir", str(run), "--num_training_samples", "128", "--batch_size", "16",
            "--learning_rate", "3e-3", "--warmup_fraction", "0", "--temperature", "0.1",
            "--lora_rank", "4", "--lora_alpha", "8", "--gradient_checkpointing", "--device", "cpu"])
    losses = _train_losses(run)
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    final = sorted(run.glob("seen_*"))[-1]
    weights = load_file(str(final / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # adapters merged: a plain model
    stock = _stock(final, tmp_path)
    assert stock["prompts"]["query"] == INSTRUCTION
    q, p = _ours(final)
    np.testing.assert_allclose(np.array(stock["queries"]), q, atol=1e-5)
    np.testing.assert_allclose(np.array(stock["passages"]), p, atol=1e-5)


def test_lora_targets_that_match_nothing_are_one_error_line(decoders, toy_triples, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _train(["--model_tag", str(decoders["llama"]), "--model_kind", "bi", "--train_triples_file",
                str(toy_triples), "--output_dir", str(tmp_path / "run"), "--num_training_samples", "16",
                "--batch_size", "16", "--lora_rank", "4", "--lora_targets", "q_proj", "query_key_value",
                "--device", "cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error: --lora_targets query_key_value: no such linear layer") and "\n" not in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_gradient_checkpointing_changes_memory_not_results(decoders, toy_triples, tmp_path):
    runs = {}
    for flag in ([], ["--gradient_checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        _train(["--model_tag", str(decoders["mistral"]), "--model_kind", "bi", "--train_triples_file",
                str(toy_triples), "--output_dir", str(out), "--num_training_samples", "32", "--batch_size", "16",
                "--learning_rate", "1e-3", "--device", "cpu", *flag])
        runs[bool(flag)] = _train_losses(out)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_onnx_fp32_of_a_pruned_decoder_equals_torch(family, decoders, tmp_path):
    """The reshaped decoder (one k/v group gone, an attention-free layer) exported by 04 --onnx:
    onnxruntime fp32 == PyTorch within 1e-4 on scored (query, passage) pairs, query prompt applied."""
    loaded = load_model(str(decoders[family]), kind="bi", query_instruction=INSTRUCTION)
    _prune_groups(loaded.state)
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    importlib.import_module("04_reshape").main(["--checkpoint_dir", str(tmp_path / "masked"), "--output_dir",
                                                str(tmp_path / "out"), "--onnx", "--max_length", "32"])
    export = json.loads((tmp_path / "out" / "onnx" / "export.json").read_text())
    assert export["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    pairs = (QUERIES * 2, PASSAGES * 2)
    torch_scores = Ranker.load(str(tmp_path / "out"), "torch").score(*pairs)
    onnx_scores = Ranker.load(str(tmp_path / "out"), "onnx").score(*pairs)
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)


def test_lora_in_bf16_keeps_frozen_weights_in_bf16_and_saves_a_plain_model(decoders, toy_triples, tmp_path):
    out = tmp_path / "run"
    _train(["--model_tag", str(decoders["qwen3"]), "--model_kind", "bi", "--train_triples_file",
            str(toy_triples), "--output_dir", str(out), "--num_training_samples", "32", "--batch_size", "16",
            "--learning_rate", "1e-3", "--lora_rank", "2", "--lora_targets", "q_proj", "v_proj",
            "--precision", "bf16", "--device", "cpu"])
    losses = _train_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses))
    final = sorted(out.glob("seen_*"))[-1]
    weights = load_file(str(final / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert weights["layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # frozen + merged: bf16
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["args"]["lora_targets"] == ["q_proj", "v_proj"]
    again = load_model(str(final))
    assert np.isfinite(Ranker.from_loaded(again).encode(PASSAGES)).all()


def test_a_tokenizer_that_closes_texts_with_a_special_token_gets_no_second_one():
    from transformers import AutoTokenizer

    from common.models.decoders import append_eos
    from common.models.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))  # [CLS] ... [SEP]
    tokenizer.eos_token = tokenizer.sep_token
    before = tokenizer("what is topic 3")["input_ids"]
    append_eos(tokenizer, "minilm")
    assert tokenizer("what is topic 3")["input_ids"] == before and before[-1] == tokenizer.sep_token_id


@pytest.mark.parametrize("importance", ["confidence", "activation", "l1"])
def test_importance_scores_one_value_per_key_value_group(importance, decoders):
    """Pruning criteria on a decoder score units (key/value groups with their query heads)."""
    from common.pruning.importance import get_importance

    loaded = load_model(str(decoders["qwen3"]), kind="bi")
    loaded.state.kept_heads[1] = [0]
    loaded.masks.refresh()
    scorer = get_importance(importance, loaded.state)
    batch = loaded.tokenizer(PASSAGES, padding=True, return_tensors="pt")
    if scorer.head_data:
        scorer.observe(loaded.model, dict(batch))
    heads = scorer.head_scores(loaded.model)
    ffn = scorer.ffn_scores(loaded.model)
    assert [len(row) for row in heads] == [2] * 4 and [len(row) for row in ffn] == [48] * 4
    assert all(np.isfinite(heads[0])) and np.isfinite(ffn[0]).all()
    assert heads[0][0] != heads[0][1]  # the two groups of a layer are told apart


# -- the cross kind: *ForSequenceClassification decoders (Qwen3-Reranker-style re-rankers) -----------
RERANKER_LABELS = {"llama": 1, "mistral": 2, "qwen2": 1, "qwen3": 1}  # 2 labels: the relevant logit

STOCK_CROSS = r"""
import json, sys
try:
    import common  # noqa: F401
    sys.exit("slimrank is importable")
except ImportError:
    pass
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, queries, passages = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
out = {}
with torch.no_grad():
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(queries, passages, padding=True, return_tensors="pt")
        logits = model(**batch).logits
        out[side] = (logits[:, 1] if logits.shape[-1] == 2 else logits[:, 0]).tolist()
out["cross_encoder"] = CrossEncoder(path, trust_remote_code=True, device="cpu").predict(
    list(zip(queries, passages))).tolist()
print(json.dumps(out))
"""


def _stock_cross(path: Path, cwd: Path) -> dict:
    """transformers (right and left padding) and sentence-transformers' CrossEncoder on the dir, in a
    clean interpreter (slimrank not importable)."""
    done = subprocess.run([sys.executable, "-I", "-c", STOCK_CROSS, str(path), json.dumps(QUERIES),
                           json.dumps(PASSAGES)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cross_scores(loaded, side: str = "right", queries=QUERIES, passages=PASSAGES) -> np.ndarray:
    loaded.tokenizer.padding_side = side
    try:
        return score_pairs(loaded.model, loaded.tokenizer, queries, passages)
    finally:
        loaded.tokenizer.padding_side = "right"


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_reranker_keeps_its_head_pads_either_side_and_reshapes_to_a_stock_model(family, tmp_path, capsys):
    """A trained 1- or 2-label ``*ForSequenceClassification`` decoder loads as a cross-encoder: its own
    head, scored at the last non-padding token (pad = EOS, said once), left == right == unpadded;
    masked == reshaped (1e-5); the reshaped dir in stock transformers / CrossEncoder (1e-5); ONNX (1e-4)."""
    labels = RERANKER_LABELS[family]
    source = make_tiny_reranker(family, tmp_path / "source", labels)
    had_pad = AutoTokenizer.from_pretrained(source).pad_token is not None  # (Qwen2's tokenizer class adds one)
    loaded = load_model(str(source))
    notes = [line for line in capsys.readouterr().err.splitlines() if "no pad token" in line]
    assert len(notes) == (0 if had_pad else 1)
    config = loaded.model.config
    assert loaded.kind == "cross" and config.num_labels == labels and not config.use_cache
    assert config.pad_token_id == loaded.tokenizer.pad_token_id is not None
    # the trained head, as transformers computes it (its own last-token pooling, pad id given)
    trained = AutoModelForSequenceClassification.from_pretrained(source, pad_token_id=config.pad_token_id).eval()
    batch = loaded.tokenizer(QUERIES, PASSAGES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = trained(**batch).logits[:, -1].numpy()
    right = _cross_scores(loaded)
    np.testing.assert_allclose(right, expected, atol=1e-5)
    np.testing.assert_allclose(_cross_scores(loaded, "left"), right, atol=1e-5)
    alone = np.array([_cross_scores(loaded, "right", [q], [p])[0] for q, p in zip(QUERIES, PASSAGES)])
    np.testing.assert_allclose(alone, right, atol=1e-5)
    assert np.ptp(right) > 1e-3  # the pairs are told apart (the pooled token is not padding)

    _prune_groups(loaded.state)
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    masked = _cross_scores(loaded)
    np.testing.assert_allclose(_cross_scores(loaded, "left"), masked, atol=1e-5)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    out, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    reshaped = load_model(str(out))
    assert after < before and reshaped.state.heads_per_layer == [2, 1, 0, 2]
    assert reshaped.model.config.num_labels == labels and reshaped.model.score.out_features == labels
    np.testing.assert_allclose(_cross_scores(reshaped), masked, atol=1e-5)
    np.testing.assert_allclose(_cross_scores(reshaped, "left"), masked, atol=1e-5)

    stock = _stock_cross(out, tmp_path)
    np.testing.assert_allclose(np.array(stock["right"]), masked, atol=1e-5)
    np.testing.assert_allclose(np.array(stock["left"]), masked, atol=1e-5)
    cross_encoder = np.array(stock["cross_encoder"])
    np.testing.assert_allclose(cross_encoder[:, 1] if labels == 2 else cross_encoder, masked, atol=1e-5)

    info = export_onnx(reshaped, out, max_length=32)
    assert info["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    np.testing.assert_allclose(Ranker.load(str(out), "onnx").score(QUERIES, PASSAGES), masked, atol=1e-4)
    np.testing.assert_allclose(Ranker.load(str(out), "torch").score(QUERIES, PASSAGES), masked, atol=1e-5)


def test_decoder_reranker_through_02_03abc_04_05(tmp_path):
    """A 2-label Qwen3 re-ranker: 02 trains its head and layers a few steps, 03a/03b/03c each take a
    prune step, 04 reshapes 03c's checkpoint (masked == reshaped) and exports ONNX, 05 scores it."""
    import pandas as pd

    from common.data.formats import read_candidates_json
    from conftest import SHARED, write_toy_triples

    script = lambda name: importlib.import_module(name).main  # noqa: E731
    source = make_tiny_reranker("qwen3", tmp_path / "source", labels=2)
    triples = write_toy_triples(tmp_path / "triples.tsv", 48)
    common = ["--train_triples_file", str(triples), "--batch_size", "8", "--max_length", "32",
              "--threads", "1", "--device", "cpu", "--num_checkpoint_samples", "16"]
    script("02_train_initial")(["--model_tag", str(source), "--output_dir", str(tmp_path / "02"),
                                "--num_training_samples", "16", "--learning_rate", "1e-3", *common])
    initial = tmp_path / "02" / "seen_000000016"
    start = load_model(str(source)).model
    trained = load_model(str(initial))
    assert trained.kind == "cross" and trained.model.score.out_features == 2
    assert not torch.equal(trained.model.score.weight, start.score.weight)  # the head trained
    assert not torch.equal(trained.model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert all(np.isfinite(_train_losses(tmp_path / "02")))
    stages = {"03a_prune_heads": ["--target_sparsity", "0.25"],
              "03b_prune_intermediates": ["--target_sparsity", "0.25", "--num_prune_cycles", "1"],
              "03c_prune_mixed": ["--target_heads", "2", "--target_ffn", "30", "--num_prune_cycles", "1"]}
    for name, extra in stages.items():
        script(name)(["--checkpoint_dir", str(initial), "--output_dir", str(tmp_path / name),
                      "--num_training_samples", "32", *common, *extra])
        pruned = load_model(str(sorted((tmp_path / name).glob("seen_*"))[-1]))
        assert (sum(pruned.state.heads_per_layer) < 8) == (name != "03b_prune_intermediates")
        assert (sum(pruned.state.ffn_per_layer) < 4 * 48) == (name != "03a_prune_heads")
    masked_dir = sorted((tmp_path / "03c_prune_mixed").glob("seen_*"))[-1]
    masked = load_model(str(masked_dir))
    masked_scores = _cross_scores(masked)
    script("04_reshape")(["--checkpoint_dir", str(masked_dir), "--onnx", "--max_length", "32"])
    reshaped = load_model(str(masked_dir / "reshaped"))
    assert reshaped.state.is_reshaped and reshaped.model.config.num_labels == 2
    np.testing.assert_allclose(_cross_scores(reshaped), masked_scores, atol=1e-5)
    export = json.loads((masked_dir / "reshaped" / "onnx" / "export.json").read_text())
    assert export["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    np.testing.assert_allclose(Ranker.load(str(masked_dir / "reshaped"), "onnx").score(QUERIES, PASSAGES),
                               masked_scores, atol=1e-4)
    cands = read_candidates_json(SHARED / "dl20" / "bm25.json")
    small = cands[cands["qid"].isin(cands["qid"].unique()[:2])].groupby("qid").head(10)
    small.to_parquet(tmp_path / "small.parquet")
    script("05_eval_trec")(["--checkpoint", str(masked_dir / "reshaped"), "--candidates",
                            str(tmp_path / "small.parquet"), "--qrels", str(SHARED / "dl20/qrels.txt"),
                            "--topics", "dl20", "--results", str(tmp_path / "r.parquet"), "--table",
                            str(tmp_path / "r.md"), "--max_length", "32", "--no_latency", "--threads", "1"])
    result = pd.read_parquet(tmp_path / "r.parquet").iloc[0]
    assert 0 <= result["ndcg@10"] <= 1
    with pytest.raises(ValueError, match="--head segment_cosine is for encoder families"):
        load_model(str(source), head="segment_cosine")


# -- LoRA under DDP ------------------------------------------------------------------------------------
def _lora_trainer(model: str, triples: str, scores: str, out: str, pairs: int = 48, **extra):
    from common.training.loop import TrainArgs, Trainer
    from common.training.schedules import WarmupLinear

    args = TrainArgs(train_triples_file=triples, output_dir=out, num_training_samples=pairs, model_tag=model,
                     model_kind="bi", distill_scores=scores, batch_size=16, max_length=32, learning_rate=1e-2,
                     seed=1, threads=1, lora_rank=4, lora_alpha=8.0, **extra)
    return Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))


def _lora_ddp_worker(rank: int, world: int, port: int, *args) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        _lora_trainer(*args).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _teacher_scores(triples: Path, path: Path) -> Path:
    import pandas as pd

    rows = len(triples.read_text().splitlines())
    rng = np.random.default_rng(0)
    pd.DataFrame({"teacher_pos": rng.normal(2, 1, rows), "teacher_neg": rng.normal(0, 1, rows)}).to_parquet(path)
    return path


def test_lora_under_ddp_two_gloo_ranks_equal_one_process(decoders, tmp_path):
    """A tiny llama bi-encoder, LoRA on every projection, margin-MSE on teacher scores (a loss per
    triple, so that a rank's half of the batch is the same function as the whole): 2 gloo ranks
    give the merged weights of 1 process. (The in-batch contrastive loss takes its negatives
    from the rank's own rows, so it is not the same function under DDP.)"""
    import torch.multiprocessing as mp

    from conftest import write_toy_triples
    from test_ddp import free_port

    triples = write_toy_triples(tmp_path / "t.tsv")
    scores = _teacher_scores(triples, tmp_path / "teacher.parquet")
    model = str(decoders["llama"])
    single_end = _lora_trainer(model, str(triples), str(scores), str(tmp_path / "single")).train()
    mp.spawn(_lora_ddp_worker, args=(2, free_port(), model, str(triples), str(scores), str(tmp_path / "ddp")),
             nprocs=2, join=True)
    ddp_end = tmp_path / "ddp" / single_end.name
    assert (ddp_end / "rng_rank1.pt").exists()
    start = load_file(str(decoders["llama"] / "model.safetensors"))
    a, b = load_file(str(single_end / "model.safetensors")), load_file(str(ddp_end / "model.safetensors"))
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    moved = [k for k in a if k in start and not torch.equal(a[k], start[k])]
    assert len(moved) == 4 * 7  # every adapted projection, nothing else
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


# -- exact resume of a LoRA stage ------------------------------------------------------------------------
def _final(run: Path) -> Path:
    return sorted(run.glob("seen_*"), key=lambda p: p.name)[-1]


@pytest.mark.parametrize("case", ["02-bi", "03c-cross-bf16"])
def test_lora_stage_resumed_from_its_midpoint_equals_the_straight_run(case, decoders, tmp_path):
    """N pairs straight vs N/2, then --resume of that checkpoint, then N/2: the same merged weights
    and adapters (1e-6). 03c prunes in both halves (the frozen weights of units pruned before the
    midpoint are zeroed again on resume), with bf16 frozen weights."""
    from conftest import write_toy_triples

    pairs, every = (64, 32) if case == "02-bi" else (128, 48)  # 03c: prune events at 32 and 64 pairs
    triples = write_toy_triples(tmp_path / "t.tsv", pairs)
    common = ["--train_triples_file", str(triples), "--batch_size", "16", "--max_length", "32", "--threads", "1",
              "--device", "cpu", "--num_training_samples", str(pairs), "--num_checkpoint_samples", str(every),
              "--learning_rate", "1e-2" if case == "02-bi" else "1e-3", "--lora_rank", "4", "--lora_alpha", "8"]
    if case == "02-bi":
        script = "02_train_initial"
        start = ["--model_tag", str(decoders["llama"]), "--model_kind", "bi"]
    else:
        script = "03c_prune_mixed"
        start = ["--checkpoint_dir", str(make_tiny_reranker("qwen3", tmp_path / "reranker", labels=1))]
        common += ["--target_heads", "5", "--target_ffn", "24", "--num_prune_cycles", "2", "--precision", "bf16"]
    main = importlib.import_module(script).main
    main([*start, "--output_dir", str(tmp_path / "straight"), *common])
    middle = sorted((tmp_path / "straight").glob(f"seen_{every:09d}*"))[0]
    state = json.loads((middle / "trainer_state.json").read_text())
    assert state["lora_base"]["model"] == str(Path(start[1]).resolve())
    main(["--checkpoint_dir", str(middle), "--resume", "--output_dir", str(tmp_path / "resumed"), *common])
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert a.name == b.name
    for name in ("model.safetensors", "lora_adapters.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key].float(), y[key].float(), atol=1e-6, rtol=0)
    adapters = load_file(str(a / "lora_adapters.safetensors"))
    assert any("lora_B" in k for k in adapters) and all(v.dtype == torch.float32 for v in adapters.values())
    if case != "02-bi":
        assert load_file(str(a / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
        assert (json.loads((a / "pruning.json").read_text())["kept_heads"]
                != json.loads((middle / "pruning.json").read_text())["kept_heads"])  # pruned after the midpoint
        assert sum(map(len, json.loads((middle / "pruning.json").read_text())["kept_heads"])) < 8  # and before
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "straight")[every // 16:]  # after it


def test_lora_resume_refuses_a_changed_start_model_and_a_checkpoint_without_adapters(decoders, tmp_path):
    import shutil

    from conftest import write_toy_triples

    source = tmp_path / "source"
    shutil.copytree(decoders["llama"], source)
    triples = write_toy_triples(tmp_path / "t.tsv", 32)
    common = ["--train_triples_file", str(triples), "--batch_size", "16", "--max_length", "32", "--threads", "1",
              "--device", "cpu", "--num_training_samples", "32", "--num_checkpoint_samples", "16",
              "--learning_rate", "1e-2", "--lora_rank", "4", "--lora_alpha", "8"]
    _train(["--model_tag", str(source), "--model_kind", "bi", "--output_dir", str(tmp_path / "run"), *common])
    middle = tmp_path / "run" / "seen_000000016"

    def refused(checkpoint: Path, out: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            _train(["--checkpoint_dir", str(checkpoint), "--resume", "--output_dir", str(tmp_path / out), *common])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message
        assert not (tmp_path / out).exists() or not any((tmp_path / out).iterdir())
        return message

    bare = tmp_path / "bare" / middle.name
    shutil.copytree(middle, bare)
    (bare / "lora_adapters.safetensors").unlink()
    assert "lora_adapters.safetensors: missing" in refused(bare, "out1")
    model = AutoModel.from_pretrained(source)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(1.01)
    model.save_pretrained(source)  # the start model changed after the stage began
    assert "the start model has changed" in refused(middle, "out2")
