"""Shared fixtures: tiny random-init models of every supported family, small triples files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          DistilBertConfig, ElectraConfig, ModernBertConfig, RobertaConfig,
                          XLMRobertaConfig)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "trec-dl"

from common.models.loading import resolve_model_path  # noqa: E402

FAMILIES = ("bert", "distilbert", "roberta", "electra")
NO_TOKEN_TYPES = ("distilbert", "modernbert")  # families whose models take no token_type_ids


def tiny_config(family: str):
    common = dict(vocab_size=30522, num_labels=2)
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=128, **common)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                                max_position_embeddings=128, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=130, type_vocab_size=2,
                             pad_token_id=0, **common)
    if family == "xlm-roberta":  # BGE-M3 / bge-reranker-* (same layers as RoBERTa)
        return XLMRobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=130, type_vocab_size=2,
                                pad_token_id=0, **common)
    if family == "modernbert":  # fused Wqkv, gated FFN, rotary, alternating global / local attention
        return ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=128, global_attn_every_n_layers=2,
                                local_attention=8, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                                cls_token_id=101, sep_token_id=102, classifier_pooling="mean", **common)
    if family == "electra":
        return ElectraConfig(hidden_size=32, embedding_size=24, num_hidden_layers=3,
                             num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=128, **common)
    raise ValueError(family)


def make_tiny_model(family: str, directory: Path) -> Path:
    """A random-init model dir with the MiniLM (BERT uncased) tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family))
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    if family in NO_TOKEN_TYPES:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


def write_toy_triples(path: Path, n: int = 64) -> Path:
    lines = []
    for i in range(n):
        q = f"what is topic {i % 7} about"
        lines.append(f"{q}\tpassage about topic {i % 7} and its details number {i}\t"
                     f"unrelated text on subject {i * 3 % 11} with words {i}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def toy_triples(tmp_path) -> Path:
    return write_toy_triples(tmp_path / "triples.tsv")


@pytest.fixture()
def run(tiny_models, tmp_path):
    """A finished 02 run (two checkpoints) and its triples file (the hostile tests' starting point)."""
    import importlib

    triples = write_toy_triples(tmp_path / "tr.tsv", 32)
    out = tmp_path / "run"
    importlib.import_module("02_train_initial").main(
        ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples), "--output_dir", str(out),
         "--num_training_samples", "16", "--num_checkpoint_samples", "8",
         "--batch_size", "8", "--max_length", "32", "--threads", "1", "--device", "cpu"])
    return out, triples


def straight_and_resumed(run, root: Path):
    """One stage trained straight (``root/a``) and stopped at its first checkpoint (step 2), then
    resumed from it (``root/b``); ``run(out, every=0, checkpoint_dir=None, stop=None)`` trains it
    and returns its last checkpoint. Returns both last checkpoints and their weights."""
    from safetensors.torch import load_file

    straight = run(root / "a")
    half = run(root / "b", every=16, stop=2)
    end = run(root / "b", every=16, checkpoint_dir=str(half))
    return straight, end, load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
