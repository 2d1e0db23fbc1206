"""Decoder LLMs (Llama, Mistral, Qwen2, Qwen3) as text encoders: what their tokenizer and config
need before a decoder embeds text (the bi kind) like an encoder does.

* Padding: a causal model's tokenizer often has no pad token; the EOS token pads then (every
  padded position is masked out, so which id fills it does not matter), said once on stderr.
* ``last`` pooling reads the hidden state of the last non-padding token, which should be an EOS
  token that closes the text (Qwen3-Embedding, e5-mistral): when the tokenizer does not end a
  text with a special token of its own, its post-processor is extended to append EOS, and the saved tokenizer keeps doing it, so that
  stock tools (sentence-transformers) feed the model the same tokens.
* The KV cache is of no use to an encoder and costs memory in training: ``use_cache`` is off.

The cross kind (a ``*ForSequenceClassification`` decoder, Qwen3-Reranker-style, or a fresh head on
a base decoder) needs nothing else: transformers' own head scores the last token that is not
``config.pad_token_id`` (right or left padding alike), so the pad id set here is all it reads, and
the saved config and tokenizer carry it to stock tools. The segment-cosine head is for encoders.
"""
from __future__ import annotations

import json
import sys

from common.models.arch import ADAPTERS


def is_decoder(config) -> bool:
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return adapter is not None and adapter.is_decoder


def check_cross_head(config, head: str | None, source: str) -> None:
    """A decoder's cross kind is its classification head (the segment head needs bidirectional
    attention and a separator token): one error otherwise."""
    if head == "segment_cosine" and is_decoder(config):
        raise ValueError(f"{source}: --head segment_cosine is for encoder families; a decoder LLM "
                         f"({config.model_type}) re-ranks with its classification head (--head classifier)")


def appends_eos(tokenizer) -> bool:
    """Does the tokenizer end a text with a special token (its EOS, or one of its own, as
    Qwen3-Embedding's ``<|endoftext|>``)? Then nothing is appended."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[-1] == tokenizer.eos_token_id or ids[-1] in set(tokenizer.all_special_ids))


def _template_with_eos(processor: dict | None, eos: str, eos_id: int) -> dict | None:
    """The post-processor (tokenizer.json form) with EOS appended to its template(s); None when
    it holds no TemplateProcessing to extend."""
    if processor is None:
        return None
    if processor.get("type") == "Sequence":
        inner = [_template_with_eos(p, eos, eos_id) for p in processor["processors"]]
        if not any(inner):
            return None
        return {**processor, "processors": [new or old for new, old in zip(inner, processor["processors"])]}
    if processor.get("type") != "TemplateProcessing":
        return None
    out = json.loads(json.dumps(processor))
    out["single"].append({"SpecialToken": {"id": eos, "type_id": 0}})
    out["pair"].append({"SpecialToken": {"id": eos, "type_id": 1}})
    out["special_tokens"][eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    return out


def append_eos(tokenizer, source: str) -> None:
    """Make ``tokenizer`` end every text with its EOS token (a no-op when it already does): its
    template post-processor is extended, or one is added after the post-processor it has."""
    if appends_eos(tokenizer):
        return
    backend = getattr(tokenizer, "_tokenizer", None)  # the `tokenizers` object: its template is saved
    if backend is not None:
        from tokenizers import Tokenizer, processors
        eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        data = json.loads(backend.to_str())
        extended = _template_with_eos(data.get("post_processor"), eos, eos_id)
        if extended is not None:
            data["post_processor"] = extended
            tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
        else:
            append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                                   special_tokens=[(eos, eos_id)])
            old = backend.post_processor
            backend.post_processor = append if old is None else processors.Sequence([old, append])
    if not appends_eos(tokenizer):
        raise ValueError(f"{source}: pooling 'lasttoken' needs the text to end with the EOS token, and this "
                         "tokenizer cannot be made to append it (use --pooling mean or weightedmean)")


def prepare_decoder(config, tokenizer, pooling: str, source: str) -> None:
    """Pad token, EOS for ``last`` pooling, no KV cache (see the module docstring)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{source}: the tokenizer has neither a pad nor an EOS token: give the "
                             "model directory a tokenizer with a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        print(f"note: {source}: the tokenizer has no pad token; padding with its EOS token "
              f"{tokenizer.eos_token!r} (padded positions are masked out)", file=sys.stderr)
    if pooling == "lasttoken":
        if tokenizer.eos_token is None:
            raise ValueError(f"{source}: pooling 'lasttoken' needs an EOS token and the tokenizer has none")
        append_eos(tokenizer, source)
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = False
