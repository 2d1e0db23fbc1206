#!/usr/bin/env python
"""Does sentence-transformers' ``CrossEncoder(dir, backend="openvino")`` score a shipped re-ranker
as slimrank does? Two halves, two interpreters: sentence-transformers' OpenVINO backend needs
optimum-intel, whose pins exclude slimrank's transformers, so the first half runs in a venv of
stock tools with no slimrank on the path and writes its scores; the second, in slimrank's venv,
scores the same pairs with slimrank's backends and prints the differences.

  python -m venv /tmp/st && /tmp/st/bin/pip install torch "sentence-transformers==6.2.*" "optimum-intel[openvino]==2.2.*"
  /tmp/st/bin/python -I bench/st_openvino_check.py st DIR --triples data/distill_fused/triples.tsv --out st.json
  PYTHONPATH=. python bench/st_openvino_check.py compare DIR --triples data/distill_fused/triples.tsv --st st.json

The pairs are each triple's (query, positive) and (query, negative), from the start of a
training-side triples file (never evaluation topics), ``--pairs`` in all; both IRs of the dir
(``openvino_model.xml`` and the NNCF int8 ``openvino_model_qint8_quantized.xml``) are scored.
"""
from __future__ import annotations

import argparse
import json
import sys

IRS = {"openvino": "openvino_model.xml", "openvino-int8": "openvino_model_qint8_quantized.xml"}


def read_pairs(path: str, n: int) -> tuple[list[str], list[str]]:
    queries, passages = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                sys.exit(f"error: {path}:{number}: a triple is query<TAB>positive<TAB>negative")
            queries += [fields[0], fields[0]]
            passages += [fields[1], fields[2]]
            if len(queries) >= n:
                break
    return queries[:n], passages[:n]


def stock_scores(directory: str, queries: list[str], passages: list[str], max_length: int) -> dict:
    """sentence-transformers' own loading and scoring of each IR (run with no slimrank on the path)."""
    try:
        import common  # noqa: F401
        sys.exit("error: slimrank is importable here: run the st half with `python -I` in a venv of stock tools")
    except ImportError:
        pass
    import sentence_transformers
    from sentence_transformers import CrossEncoder

    out = {"sentence_transformers": sentence_transformers.__version__}
    for backend, name in IRS.items():
        model = CrossEncoder(directory, backend="openvino", max_length=max_length, model_kwargs={"file_name": name})
        out[backend] = [float(s) for s in model.predict(list(zip(queries, passages)))]
    return out


def compare(directory: str, queries: list[str], passages: list[str], max_length: int, stock: dict) -> None:
    import numpy as np

    from common.serving.rank import Ranker

    print(f"sentence-transformers {stock['sentence_transformers']} CrossEncoder(backend='openvino') against "
          f"slimrank's backends, {len(queries)} training-side pairs, {directory}")
    for backend in ("torch", *IRS):
        ours = Ranker.load(directory, backend, max_length=max_length).score(queries, passages)
        for ir in IRS:
            diff = np.abs(np.asarray(stock[ir]) - ours)
            print(f"  slimrank {backend:14s} vs CrossEncoder {ir:14s}: max |diff| {diff.max():.2e}, "
                  f"mean {diff.mean():.2e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("half", choices=("st", "compare"))
    p.add_argument("directory", help="a shipped dir (04_reshape.py --openvino)")
    p.add_argument("--triples", required=True, help="training-side triples (query, positive, negative)")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--out", help="st: where its scores go (JSON)")
    p.add_argument("--st", help="compare: the st half's JSON")
    a = p.parse_args(argv)
    if a.pairs < 1:
        p.error(f"--pairs must be positive, got {a.pairs}")
    try:
        queries, passages = read_pairs(a.triples, a.pairs)
        stock = json.loads(open(a.st).read()) if a.half == "compare" and a.st else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        sys.exit(f"error: {err}")
    if a.half == "st":
        if not a.out:
            sys.exit("error: --out: the st half writes its scores there")
        with open(a.out, "w") as f:
            json.dump(stock_scores(a.directory, queries, passages, a.max_length), f)
    else:
        if not a.st:
            sys.exit("error: --st: the st half's JSON")
        compare(a.directory, queries, passages, a.max_length, stock)


if __name__ == "__main__":
    main()
