#!/usr/bin/env python
"""How much of a bi-encoder's embedding survives one-shot masking, by importance criterion.

Scores heads and FFN neurons of the packaged all-MiniLM-L6-v2 bi-encoder on CALIB texts
(queries and passages of the distillation set), masks the lowest-scoring ones per layer in
layers 1-5 (no training), and prints the mean cosine between masked and unmasked embeddings
of HELD other texts, for the reference criteria (head confidence, FFN L1) and the activation
criteria (``common.pruning.importance.ActivationImportance``):

  python bench/importance_probe.py [--candidates data/distill/candidates.parquet] [--threads 1]
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from common.kinds import BiKind
from common.models.encoders import encode
from common.pruning.importance import ActivationImportance, HeadConfidence, ffn_l1_scores
from common.kinds.loading import load_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", default="data/distill/candidates.parquet")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--texts", type=int, default=600, help="queries and passages each, half held out")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cands = pd.read_parquet(args.candidates, columns=["query", "passage"])
    qs = cands["query"].drop_duplicates().sample(args.texts, random_state=0).tolist()
    ps = cands["passage"].drop_duplicates().sample(args.texts, random_state=0).tolist()
    half = args.texts // 2
    calib, held = qs[:half] + ps[:half], qs[half:] + ps[half:]

    loaded = load_model(args.model, kind=BiKind.name)
    model, tok, state = loaded.model.eval(), loaded.tokenizer, loaded.state
    reference = encode(model, tok, held, max_length=args.max_length)

    confidence, activation = HeadConfidence(state), ActivationImportance(state)
    for start in range(0, len(calib), 32):
        batch = dict(tok(calib[start:start + 32], truncation=True, max_length=args.max_length,
                         padding=True, return_tensors="pt"))
        confidence.observe(model, batch)
        activation.observe(model, batch)
    criteria = {"reference": (confidence.head_scores(), ffn_l1_scores(model, state)),
                "activation": (activation.head_scores(), activation.ffn_scores())}

    def cosine(head_scores, ffn_scores, heads: int, ffn: int) -> float:
        for i in range(state.num_layers):
            state.kept_heads[i] = list(range(state.num_heads))
            state.kept_ffn[i] = list(range(state.ffn_size))
        for i in range(1, state.num_layers):
            state.kept_heads[i] = sorted(np.argsort(head_scores[i])[::-1][:heads].tolist())
            state.kept_ffn[i] = sorted(np.argsort(ffn_scores[i])[::-1][:ffn].tolist())
        loaded.masks.refresh()
        masked = encode(model, tok, held, max_length=args.max_length)
        return float((masked * reference).sum(-1).mean())

    full_h, full_f = state.num_heads, state.ffn_size
    settings = [("FFN 40 %", full_h, int(0.4 * full_f)), ("FFN 30 %", full_h, int(0.3 * full_f)),
                ("heads 9/12", 9, full_f), ("heads 6/12", 6, full_f),
                ("heads 6/12 + FFN 40 %", 6, int(0.4 * full_f))]
    print(f"mean cosine to the unmasked embeddings of {len(held)} held-out texts; layers 1-5 masked")
    print(f"{'kept':<24}{'reference':>12}{'activation':>12}")
    for name, heads, ffn in settings:
        values = [cosine(*criteria[c], heads, ffn) for c in ("reference", "activation")]
        print(f"{name:<24}{values[0]:>12.3f}{values[1]:>12.3f}")


if __name__ == "__main__":
    main()
