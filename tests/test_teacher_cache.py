"""--cache_teacher: a bi-encoder stage embeds its rows' texts with the frozen teacher once and looks
them up at each step; the same training as without it (up to rounding), the teacher not run per
step, the same cache when a stage resumes, refused where it cannot hold."""
from __future__ import annotations

import json
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from common.data.formats import TriplesStream
from common.training.loop import TrainArgs, Trainer
from common.training.schedules import WarmupLinear


def _args(tiny_models, triples, out, **kw):
    base = {"train_triples_file": str(triples), "output_dir": str(out), "num_training_samples": 32,
            "num_checkpoint_samples": 0, "model_tag": str(tiny_models["bert"]), "model_kind": "bi",
            "batch_size": 8, "max_length": 32, "learning_rate": 2e-3, "seed": 3,
            "distill_from": str(tiny_models["bert"]), "distill_target": "embeddings", "contrastive_weight": 0.0}
    base.update(kw)
    return TrainArgs(**base)


def _trainer(args):
    return Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))


def _events(out, event):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == event]


def _distinct_texts(triples, rows, skip=0):
    found = list(islice(TriplesStream(triples, skip_triples=skip), rows))
    return len({r[0] for r in found}) + len({p for r in found for p in r[1:]})


def test_cached_training_equals_the_teacher_run_at_each_step(tiny_models, toy_triples, tmp_path):
    plain = _trainer(_args(tiny_models, toy_triples, tmp_path / "plain"))
    last_plain = plain.train()  # each trainer seeds the RNG (dropout) when made: made, then trained
    cached = _trainer(_args(tiny_models, toy_triples, tmp_path / "cached", cache_teacher=True))
    calls = []
    cached.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    last_cached = cached.train()
    # the teacher ran only to fill the cache: one batch of queries and one of passages (16 rows: 7
    # distinct queries, 32 passages), never in the 4 steps (2 calls each without the cache)
    assert len(calls) == 2
    [event] = _events(tmp_path / "cached", "teacher_cache")
    assert event["texts"] == _distinct_texts(toy_triples, 16) == 7 + 32
    a, b = (_events(tmp_path / name, "train") for name in ("plain", "cached"))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["distill"] == pytest.approx(x["distill"], rel=1e-4, abs=1e-7)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (last_plain, last_cached))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    # the looked-up embeddings are what the teacher computes on the batch
    rows = list(islice(TriplesStream(toy_triples), 4))
    with torch.no_grad():
        looked_up = cached.training_kind.teacher_forward(cached.teacher, rows, None)
        computed = plain.training_kind.teacher_forward(plain.teacher, rows, None)
    for key in ("query_embeddings", "passage_embeddings"):
        torch.testing.assert_close(looked_up[key], computed[key], atol=1e-5, rtol=0)


def test_the_cache_covers_the_stage_rows_and_resume_is_exact(tiny_models, toy_triples, tmp_path):
    # a second stage starts at row 16 of the file (seen 32 pairs): its cache holds rows 16-31 only
    straight = _trainer(_args(tiny_models, toy_triples, tmp_path / "a", cache_teacher=True,
                              num_checkpoint_samples=16, seen_pairs=32))
    last = straight.train()
    [event] = _events(tmp_path / "a", "teacher_cache")
    assert event["texts"] == _distinct_texts(toy_triples, 16, skip=16)
    half = sorted((tmp_path / "a").glob("seen_*"))[0]
    resumed = _trainer(_args(tiny_models, toy_triples, tmp_path / "b", cache_teacher=True, model_tag=None,
                             checkpoint_dir=str(half), resume=True, num_checkpoint_samples=16, seen_pairs=32))
    end = resumed.train()
    [again] = _events(tmp_path / "b", "teacher_cache")
    assert again["texts"] == event["texts"]  # the stage's rows, not the rows left
    assert end.name == last.name
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (last, end))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_length_grouped_stages_cache_whole_windows(tiny_models, toy_triples, tmp_path):
    # 4 steps of 4 rows, one window of 32 batches: the window's rows (the whole 64-row file here)
    trainer = _trainer(_args(tiny_models, toy_triples, tmp_path / "g", cache_teacher=True, group_by_length=True))
    trainer.train()
    [event] = _events(tmp_path / "g", "teacher_cache")
    assert event["texts"] == _distinct_texts(toy_triples, 128) == 7 + 128


def test_cache_teacher_is_refused_where_it_cannot_hold(tiny_models, toy_triples, tmp_path):
    with pytest.raises(ValueError, match="caches the embeddings of --distill_from"):
        _args(tiny_models, toy_triples, tmp_path / "x", cache_teacher=True, distill_from=None,
              distill_target="scores").validate()
    with pytest.raises(ValueError, match="--distill_hidden needs its layers"):
        _args(tiny_models, toy_triples, tmp_path / "x", cache_teacher=True, distill_hidden=1.0).validate()
    with pytest.raises(ValueError, match="reads each pair whole"):
        _trainer(_args(tiny_models, toy_triples, tmp_path / "x", cache_teacher=True, model_kind="cross",
                       distill_target="scores", contrastive_weight=1.0))
    assert not (tmp_path / "x").exists()  # refused before the output dir was made


def test_the_bench_alternates_both_settings_and_counts_the_cache(tiny_models, toy_triples, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("teacher_cache_bench", Path(__file__).resolve().parents[1]
                                                  / "bench" / "teacher_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = str(tiny_models["bert"])
    bench.main(["--model", model, "--teacher", model, "--triples", str(toy_triples), "--pairs", "32",
                "--batch_size", "8", "--max_length", "32", "--threads", "1", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [x for x in lines if "steps' pairs/s" in x]
    assert [x.split(":")[0].strip() for x in rows] == ["teacher per step", "--cache_teacher"]
    assert all(len(x.split("pairs/s ")[1].split(" (")[0].split()) == 2 for x in rows)  # one rate per round
    assert "(1.00x)" in rows[0] and "cache 0.00 s" in rows[0]
    steps, stage = (float(rows[1].split(key)[1].split()[0].rstrip(";")) for key in ("(median ", "the stage with it "))
    assert stage < steps  # the cache's seconds are counted in the stage's rate
    with pytest.raises(SystemExit):
        bench.main(["--model", model, "--triples", str(toy_triples), "--pairs", "12", "--batch_size", "8"])
