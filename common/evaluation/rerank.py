"""Evaluate one model on one topic set: re-rank, TREC measures, and (optionally) its costs.

Returns one row for ``runs/results.parquet`` (see ``common.evaluation.results`` for the columns) and
writes the run file and per-query measures beside the checkpoint (``<checkpoint>/eval/``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from common.evaluation import cost
from common import layout
from common.io import atomic_output, check_writable
from common.hardware import machine_description, time_callable
from common.data.formats import DataError, candidates_to_run, read_candidates, read_qrels
from common.data.trec import check_fusable, evaluate_run, interpolate, write_trec_run
from common.models.loading import pick_device
from common.kinds.loading import load_model
from common.serving.rank import Ranker, describe_backend
from common.models.segment import is_segment, mean_cross_attention
from common.models.structure import reshape

CROSS_ATTENTION_QUERIES = 3  # segment head: cross-segment attention over these queries' candidates


@dataclass
class CostOptions:
    latency: bool = True
    repeats: int = 3
    warmup: int = 1
    latency_queries: int = 10  # real-lengths regime: the first N queries, 100 candidates each
    n_pairs: int = 100  # candidates re-ranked per query
    bf16: bool = False  # also time bf16 autocast (own row columns)


def _describe(ranker: Ranker) -> dict:
    loaded = ranker.loaded
    state = loaded.state
    trainer_state = {}
    path = Path(loaded.path, layout.STATE_FILE)
    if path.exists():
        trainer_state = json.loads(path.read_text())
    stage = trainer_state.get("stage", "base")
    return {"method": stage + ("+reshape" if state.is_reshaped and state.history else ""),
            "model_kind": loaded.kind, "head": getattr(loaded.model.config, "slimrank_head", None)
            or ranker.kind.default_head, "family": state.family, "seen_pairs": trainer_state.get("seen_pairs", 0),
            "heads": state.total_heads, "ffn": state.total_ffn,
            "heads_per_layer": ",".join(map(str, state.heads_per_layer)),
            "ffn_per_layer": ",".join(map(str, state.ffn_per_layer))}


def judged_overlap(candidates: pd.DataFrame, qrels: dict, candidates_path: str,
                   qrels_path: str) -> dict:
    """Queries of the run and how many of them are judged; an error when fewer than half of
    the run's queries are judged (another topic set's qrels, say), which would otherwise
    score near 0 silently."""
    run_queries = set(candidates["qid"].astype(str))
    judged = run_queries & {q for q, docs in qrels.items() if docs}
    if len(judged) * 2 < len(run_queries):
        raise DataError(f"{qrels_path}: judges only {len(judged)} of the {len(run_queries)} queries "
                        f"of {candidates_path}: qrels of another topic set?")
    return {"run_queries": len(run_queries), "judged_run_queries": len(judged)}


def evaluate_first_stage(candidates_path: str, qrels_path: str, topics: str, name: str = "bm25") -> dict:
    candidates = read_candidates(candidates_path)
    qrels = read_qrels(qrels_path)
    overlap = judged_overlap(candidates, qrels, candidates_path, qrels_path)
    means, _ = evaluate_run(candidates_to_run(candidates), qrels)
    return {"checkpoint": f"{name}:{candidates_path}", "run": name, "method": name,
            "topics": topics, **means, **overlap}


def result_key(checkpoint: str, backend: str, query_encoder: str | None = None) -> str:
    """A model row's key in the results table: the checkpoint, ``@<backend>`` for a backend other
    than torch fp32, ``+queries:<name>`` for an explicit query encoder."""
    return (f"{checkpoint}" + ("" if backend == "torch" else f"@{backend}")
            + (f"+queries:{query_encoder}" if query_encoder else ""))


def evaluate_model(checkpoint: str, candidates_path: str, qrels_path: str, topics: str, *,
                   max_length: int = 256, batch_size: int = 64, device: str = "auto",
                   backend: str = "torch", costs: CostOptions | None = None,
                   output_dir: str | None = None, kind: str | None = None,
                   interpolate_weights: tuple[float, ...] = (), query_encoder: str | None = None) -> list[dict]:
    """The model's row, then one quality-only row per interpolation weight (``interpolate``;
    run name ``<run>+<first stage>@<weight>``, method ``interpolate``). ``backend`` (see
    ``common.serving.rank``) scores and is timed; a backend other than ``torch`` is part of the row's key
    (``<checkpoint>@<backend>``) and of its run and per-query file names. ``query_encoder``
    (bi): embed the queries with that encoder instead (part of the row's key, ``+queries:<name>``);
    a bi model whose config names a query encoder uses it either way, and its run name says so."""
    dev = pick_device(device)
    loaded = load_model(checkpoint, dev, kind=kind)
    ranker = Ranker.from_loaded(loaded, backend, max_length=max_length, batch_size=batch_size,
                                query_encoder=query_encoder)
    backend = ranker.backend  # "auto" resolved
    candidates = read_candidates(candidates_path)
    qrels = read_qrels(qrels_path)
    overlap = judged_overlap(candidates, qrels, candidates_path, qrels_path)
    if interpolate_weights:  # refused before the model scores, not after
        check_fusable(candidates, candidates_path)
    ours = Path(loaded.path, layout.PRUNING_FILE).exists()  # never write into a package or hub cache
    out = Path(output_dir) if output_dir else layout.eval_dir(loaded.path)
    if output_dir or ours:  # a read-only model dir is refused before the scoring, not after
        check_writable(out / f"{topics}.run", "the run file")
    scores = ranker.score(candidates["query"].tolist(), candidates["passage"].tolist(), progress=True)
    suffix = result_key("", backend, query_encoder)
    queries_note = f" [queries: {ranker.query_encoder}]" if getattr(ranker, "query_encoder", None) else ""
    reranked = candidates.assign(score=scores)
    run = candidates_to_run(reranked, "score")
    means, per_query = evaluate_run(run, qrels)
    files = suffix.replace(":", "_").replace("/", "_")
    if output_dir or ours:
        write_trec_run(run, out / f"{topics}{files}.run", tag="slimrank")
        with atomic_output(out / f"{topics}{files}.per_query.tsv") as tmp:
            per_query.to_csv(tmp, sep="\t", index=False)
    row = {"checkpoint": f"{checkpoint}{suffix}", "run": layout.run_name(checkpoint) + queries_note, "topics": topics,
           "query_encoder": getattr(ranker, "query_encoder", None),
           **_describe(ranker), **describe_backend(loaded.path, backend), **means, **overlap}
    if is_segment(loaded.model):  # is it still a bi-encoder? (common.models.segment)
        first = candidates[candidates["qid"].isin(candidates["qid"].unique()[:CROSS_ATTENTION_QUERIES])]
        row["cross_attention"] = mean_cross_attention(
            loaded.model, loaded.tokenizer, first["query"].tolist(), first["passage"].tolist(),
            max_length)
    fused_rows = []
    if getattr(loaded.model, "m3_heads", None) is not None:
        # BGE-M3 heads (common.models.m3): a quality-only row for each head and their combination
        for name, values in ranker.head_scores(candidates["query"].tolist(), candidates["passage"].tolist()).items():
            if name == "dense":
                continue
            head_means, _ = evaluate_run(candidates_to_run(candidates.assign(score=values), "score"), qrels)
            fused_rows.append({**row, **head_means, "checkpoint": f"{checkpoint}{suffix}+head:{name}",
                               "run": f"{row['run']}+{name}", "method": "m3_head", "head": name})
    for weight in interpolate_weights:
        fused = candidates.assign(score=interpolate(candidates, scores, weight))
        fused_means, _ = evaluate_run(candidates_to_run(fused, "score"), qrels)
        name = f"{row['run']}+first_stage@{weight:g}"
        fused_rows.append({**row, **fused_means, "checkpoint": f"{checkpoint}{suffix}+first_stage@{weight:g}",
                           "run": name, "method": "interpolate", "fusion_weight": float(weight)})
    if costs:
        if not loaded.state.is_reshaped:
            # a masked model computes what its reshaped form computes: measure that form
            loaded.masks.remove()
            loaded.state = reshape(loaded.model, loaded.state)
        row.update(measure_costs(ranker, candidates, max_length, costs, dev))
    return [row, *fused_rows]


def measure_costs(ranker: Ranker, candidates: pd.DataFrame, max_length: int,
                  opts: CostOptions, device: torch.device) -> dict:
    """Latency per query of ``opts.n_pairs`` candidates (worst case and real lengths) on the
    ranker's backend, MACs, parameters, size. Latency includes tokenisation in the real regime
    (what a re-ranker pays)."""
    loaded = ranker.loaded
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    one = cost.worst_case_inputs(tokenizer, n_pairs=1, max_length=max_length)
    per_sequence = cost.fvcore_macs(model, **one)
    macs = per_sequence * ranker.sequences_per_query(opts.n_pairs)
    params = cost.count_parameters(model)
    extra = {}
    query_ranker = getattr(ranker, "query_ranker", None)
    if query_ranker is not None:  # the query's sequence goes through the query encoder
        query_macs = cost.fvcore_macs(query_ranker.loaded.model.eval(), **one)
        macs += query_macs - per_sequence
        extra = {"query_encoder_macs_per_sequence": query_macs,
                 "query_encoder_params": cost.count_parameters(query_ranker.loaded.model)["total"]}
    row = {"flops_macs": macs, "macs_per_sequence": per_sequence, **extra,
           "params": params["total"], "encoder_params": params["encoder"],
           "machine": machine_description(device), "torch_version": torch.__version__,
           "max_length": max_length}
    if Path(loaded.path).is_dir():
        row["size_mb"] = cost.dir_size_mb(loaded.path)
    if not opts.latency:
        return row
    prefix = "gpu" if device.type == "cuda" else "cpu"
    worst = {k: v.to(device) for k, v in
             cost.worst_case_inputs(tokenizer, n_pairs=opts.n_pairs, max_length=max_length).items()}
    groups = [g.head(opts.n_pairs) for _, g in candidates.groupby("qid", sort=False)]
    groups = groups[:opts.latency_queries]

    def time_regimes(timed: Ranker) -> tuple[tuple[float, float], tuple[float, float]]:
        inputs = {k: v for k, v in worst.items() if k in getattr(timed.runner, "inputs", worst)}
        w = time_callable(lambda: timed.run(inputs), opts.repeats, opts.warmup, device)
        timings = []
        for group in groups:
            q, p = group["query"].tolist(), group["passage"].tolist()
            mean, _std = time_callable(lambda: timed.score(q, p), opts.repeats, opts.warmup, device)
            timings.append(mean)
        real = torch.tensor(timings)
        return w, (float(real.mean()), float(real.std()) if len(timings) > 1 else 0.0)

    query_encoder = getattr(ranker, "query_encoder", None)
    timed = ranker.with_batch_size(opts.n_pairs)
    row.update(timed.extra_costs(candidates, opts, device))  # bi: corpus-encoding throughput
    (w_mean, w_std), (r_mean, r_std) = time_regimes(timed)
    row.update({f"{prefix}_ms_worst": w_mean, f"{prefix}_ms_worst_std": w_std,
                f"{prefix}_ms_real": r_mean, f"{prefix}_ms_real_std": r_std,
                "latency_threads": torch.get_num_threads()})
    if opts.bf16:
        bf16 = Ranker.from_loaded(loaded, "torch-bf16", max_length=max_length, batch_size=opts.n_pairs,
                                  query_encoder=query_encoder)
        (bw, bws), (br, brs) = time_regimes(bf16)
        row.update({f"{prefix}_bf16_ms_worst": bw, f"{prefix}_bf16_ms_worst_std": bws,
                    f"{prefix}_bf16_ms_real": br, f"{prefix}_bf16_ms_real_std": brs})
    return row


def checkpoints_of(run_dir: str) -> list[Path]:
    """Every checkpoint below a run directory (``seen_*`` and their ``reshaped`` children); a
    run dir that does not exist, or holds no checkpoint, is an error (not an empty sweep)."""
    if not Path(run_dir).is_dir():
        raise ValueError(f"--all_checkpoints {run_dir}: no such directory")
    if not layout.checkpoints(run_dir):
        raise ValueError(f"--all_checkpoints {run_dir}: no checkpoint in it (seen_*/ with {layout.PRUNING_FILE})")
    found = []
    for path in layout.checkpoints(run_dir):
        found.append(path)
        if (path / layout.RESHAPED / layout.PRUNING_FILE).exists():
            found.append(path / layout.RESHAPED)
    return found
