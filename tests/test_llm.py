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
from transformers import AutoModel, AutoTokenizer

from common.evaluation import cost
from common.models.encoders import encode
from common.models.loading import keep_first_layers
from common.kinds.loading import load_model, reshape_checkpoint, save_model
from common.models.structure import analytic_param_count, zero_dead_weights
from common.pruning.l3prune import choose, layerwise_losses
from common.serving.rank import Ranker
from common.models.lora import add_lora

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import DECODERS, make_tiny_decoder  # noqa: E402

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
