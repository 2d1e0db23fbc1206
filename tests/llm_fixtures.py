"""Tiny random-init decoder LLMs (llama, mistral, qwen2, qwen3) with a tiny word-level tokenizer
that has BOS/EOS but no pad token and appends no EOS (as many LLM tokenizers)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoModel, AutoModelForSequenceClassification, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 160
WORDS = ("what is topic about passage and its details number unrelated text on subject with words "
         "given a web search query retrieve relevant passages that answer the instruct : q p").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS, *map(str, range(100))])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_decoder_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)  # q/k/v with biases
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)  # head_dim != hidden / heads; q/k norms
    raise ValueError(family)


def make_tiny_decoder(family: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_decoder_config(family))
    with torch.no_grad():  # random RMSNorm weights, so that a norm left out would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def make_tiny_reranker(family: str, directory: Path, labels: int = 1) -> Path:
    """A ``*ForSequenceClassification`` decoder with a trained-looking head of ``labels`` labels
    (a Qwen3-Reranker-style re-ranker: scored at the last non-padding token); its tokenizer has
    no pad token (the config none either)."""
    torch.manual_seed(0)
    config = tiny_decoder_config(family)
    config.num_labels = labels
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        model.score.weight.normal_(std=0.5)  # a trained head is not at its init
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
