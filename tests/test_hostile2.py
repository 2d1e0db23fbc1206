"""Hostile inputs, second pass (the surfaces added since test_hostile.py): one test per defect
class; each failed on the code before these guards. Data loss, silent wrong results, nonsense
refused late, tracebacks instead of one ``error:`` line, and paths or code from a model dir."""
from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, write_toy_triples
from test_hostile import A, assert_refused, snapshot

train = importlib.import_module("02_train_initial").main
prune_l0 = importlib.import_module("03d_prune_l0").main
reshape = importlib.import_module("04_reshape").main
evaluate = importlib.import_module("05_eval_trec").main
prefetch = importlib.import_module("01_prefetch_passages").main


def assert_lock_named(script, args, out):
    """A live holder of ``out``'s lock is refused naming its pid; a dead one's lock is named with
    the command that removes it, never taken."""
    from common.io import LOCK_FILE

    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / LOCK_FILE).write_text(f"{holder.pid}\n")
        assert_refused(script, args, "in use by process", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    assert_refused(script, args, "stale lock", f"rm {out / LOCK_FILE}")


def toy_candidates(path: Path, first_stage_score=None) -> Path:
    """A candidates parquet of 2 queries x 3 passages (written by the project's writer)."""
    from common.data.formats import write_candidates

    rows = [{"qid": str(q), "docid": f"d{q}{i}", "rank": i + 1, "first_stage_score": float(10 - i),
             "query": f"what is topic {q} about", "passage": f"passage about topic {q} number {i}"}
            for q in (1, 2) for i in range(3)]
    df = pd.DataFrame(rows)
    if first_stage_score is not None:
        df.loc[0, "first_stage_score"] = first_stage_score
    write_candidates(df, path)
    return path


def toy_qrels(path: Path) -> Path:
    path.write_text("1 0 d10 2\n2 0 d21 1\n")
    return path


@pytest.fixture()
def shipped(run, tmp_path):
    """A reshaped model dir (04 without --onnx)."""
    out, _ = run
    reshape(["--checkpoint_dir", str(out / "seen_000000016"), "--output_dir", str(tmp_path / "model")])
    return tmp_path / "model"


# -- data loss -------------------------------------------------------------------------------
def test_reshape_overwrite_keeps_inputs_and_foreign_files(run, shipped, tmp_path):
    out, triples = run
    ckpt = str(out / "seen_000000016")
    calib = shipped / "calib.tsv"
    shutil.copy(triples, calib)
    before = snapshot(shipped)
    assert_refused(reshape, ["--checkpoint_dir", ckpt, "--output_dir", str(shipped), "--overwrite", "--onnx",
                             "--calibration_triples", str(calib)], "--calibration_triples")
    assert_refused(reshape, ["--checkpoint_dir", ckpt, "--output_dir", str(shipped), "--overwrite",
                             "--keep_layers", "small", "--layer_loss_triples", str(calib)], "--layer_loss_triples")
    calib.unlink()
    (shipped / "notes.txt").write_text("mine")
    assert_refused(reshape, ["--checkpoint_dir", ckpt, "--output_dir", str(shipped), "--overwrite"], "notes.txt")
    assert (shipped / "notes.txt").read_text() == "mine"
    (shipped / "notes.txt").unlink()
    before.pop("calib.tsv")
    assert snapshot(shipped) == before
    reshape(["--checkpoint_dir", ckpt, "--output_dir", str(shipped), "--overwrite"])  # its own files: fine


def test_eval_outputs_never_name_an_input(tiny_models, tmp_path):
    cands, qrels = toy_candidates(tmp_path / "c.parquet"), toy_qrels(tmp_path / "q.txt")
    results = tmp_path / "r.parquet"
    base = ["--first_stage", "bm25", "--candidates", str(cands), "--qrels", str(qrels), "--topics", "t"]
    kept = cands.read_bytes()
    assert_refused(evaluate, [*base, "--results", str(results), "--table", str(cands)], "--table", "--candidates")
    assert_refused(evaluate, [*base, "--results", str(cands), "--table", str(tmp_path / "t.md")], "--results")
    evaluate([*base, "--results", str(results), "--table", str(tmp_path / "t.md")])
    table_before = results.read_bytes()
    assert_refused(evaluate, [*base, "--results", str(results), "--table", str(results)], "--table", "--results")
    assert cands.read_bytes() == kept and results.read_bytes() == table_before


KILL_DURING_EXPORT = r"""
import importlib, os, signal, sys
sys.path.insert(0, sys.argv[1])
script = importlib.import_module("04_reshape")
def killed(loaded, directory, *a, **k):
    (directory / "onnx").mkdir()
    (directory / "onnx" / "model.onnx").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
script.export_onnx = killed
script.main(sys.argv[2:])
"""


def test_onnx_overwrite_killed_midway_keeps_the_old_model(run, shipped, tmp_path):
    out, _ = run
    (shipped / "onnx").mkdir()
    (shipped / "onnx" / "model_int8.onnx").write_bytes(b"the old export")
    before = snapshot(shipped)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_EXPORT, str(ROOT), "--checkpoint_dir",
                           str(out / "seen_000000008"), "--output_dir", str(shipped), "--overwrite", "--onnx"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = snapshot(shipped)
    assert after.pop(".slimrank.lock").strip().isdigit()  # the killed 04's pid: a stale lock, named next time
    assert after == before  # the old model and its export, whole


def test_a_run_dir_is_held_by_one_process(tiny_models, tmp_path):
    LOCK_FILE = ".slimrank.lock"  # (common.io.LOCK_FILE)
    triples = write_toy_triples(tmp_path / "tr.tsv", 16)
    out = tmp_path / "run"
    out.mkdir()
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
            "--output_dir", str(out), "--num_training_samples", "8", "--overwrite", *A]
    assert_lock_named(train, args, out)  # named, not taken
    assert (out / LOCK_FILE).exists() and not (out / "seen_000000008").exists()
    (out / LOCK_FILE).unlink()
    train(args)
    assert (out / "seen_000000008").is_dir() and not (out / LOCK_FILE).exists()  # released


def test_reshape_holds_its_output_dir_like_a_training_stage(run, tmp_path):
    """04 holds <output_dir>/.slimrank.lock while it writes: a second 04 on that dir is refused
    naming the holder's pid, a stale lock is named with the command that removes it (nothing
    written either time), and the lock is gone once the new model is in place."""
    from common.io import LOCK_FILE
    from common.kinds.loading import reshape_checkpoint

    out_run, _ = run
    ckpt = str(out_run / "seen_000000016")
    out = tmp_path / "model"
    out.mkdir()
    args = ["--checkpoint_dir", ckpt, "--output_dir", str(out), "--overwrite"]
    assert_lock_named(reshape, args, out)
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written, the lock not taken
    (out / LOCK_FILE).unlink()
    held = []
    reshape_checkpoint(ckpt, str(out), overwrite=True,
                       finish=lambda tmp: held.append((out / LOCK_FILE).read_text().split()[0]))
    assert held == [str(os.getpid())] and (out / "config.json").is_file() and not (out / LOCK_FILE).exists()
    fresh = tmp_path / "fresh"  # a dir made only for the lock goes again when the write fails
    with pytest.raises(ValueError):
        reshape_checkpoint(ckpt, str(fresh), finish=lambda tmp: (_ for _ in ()).throw(ValueError("boom")))
    assert not fresh.exists() and not list(tmp_path.glob(".tmp-*"))


# -- silent wrong results ----------------------------------------------------------------------
def test_resume_compares_the_stage_arguments(tiny_models, tmp_path):
    triples = write_toy_triples(tmp_path / "tr.tsv", 32)
    out = tmp_path / "l0"
    base = ["--train_triples_file", str(triples), "--output_dir", str(out), "--num_training_samples", "32",
            "--num_checkpoint_samples", "16", "--max_length", "32", "--batch_size", "8", "--threads", "1",
            "--device", "cpu"]
    prune_l0(["--model_tag", str(tiny_models["bert"]), *base, "--target_heads", "8"])
    half = out / next(p.name for p in sorted(out.iterdir()) if (p / "l0_gates.pt").exists())
    assert_refused(prune_l0, ["continue", "--checkpoint_dir", str(half), *base, "--target_heads", "6"],
                   "--target_heads 8 -> 6")
    assert_refused(prune_l0, ["continue", "--checkpoint_dir", str(half), *base, "--target_heads", "8",
                              "--gate_init", "2.0"], "--gate_init 3.0 -> 2.0")
    # a garbage gates file is one error line naming it
    (half / "l0_gates.pt").write_bytes(b"garbage")
    assert_refused(prune_l0, ["continue", "--checkpoint_dir", str(half), *base, "--target_heads", "8"],
                   "l0_gates.pt", "unreadable")


@pytest.mark.parametrize("script,flag,value", [("l0", "--gate_init", "nan"), ("train", "--learning_rate", "inf"),
                                                ("train", "--distill_scale", "inf"), ("l0", "--gate_init", "-inf")])
def test_non_finite_numbers_are_refused_at_parse_time(script, flag, value, tiny_models, tmp_path):
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(write_toy_triples(tmp_path / "t.tsv", 8)),
            "--output_dir", str(tmp_path / "o"), "--num_training_samples", "8", *A, f"{flag}={value}"]
    if script == "l0":
        assert_refused(prune_l0, [*args, "--target_heads", "8"], flag, "finite")
    else:
        assert_refused(train, args, flag, "finite")
    assert not (tmp_path / "o").exists()


def test_weights_of_another_architecture_are_refused(tiny_models, tmp_path):
    from common.kinds.loading import load_model

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["bert"], bad)
    shutil.copy(tiny_models["distilbert"] / "config.json", bad / "config.json")
    with pytest.raises(ValueError, match="weights do not match its config.json"):
        load_model(str(bad))
    triples = write_toy_triples(tmp_path / "t.tsv", 8)
    assert_refused(train, ["--model_tag", str(bad), "--train_triples_file", str(triples), "--output_dir",
                           str(tmp_path / "o"), "--num_training_samples", "8", *A], "do not match", str(bad))
    assert not (tmp_path / "o").exists()
    assert_refused(reshape, ["--checkpoint_dir", str(bad), "--output_dir", str(tmp_path / "r")], "do not match")


def test_an_option_given_twice_is_an_error(tiny_models, tmp_path, capsys):
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", "x.tsv", "--output_dir",
            str(tmp_path / "o"), "--num_training_samples", "8", *A]
    assert_refused(train, [*args, "--learning_rate", "1e-3", "--learning_rate=1e-4"], "--learning_rate", "twice")
    assert_refused(train, [*args, "--learning_rate", "1e-3", "--learning-rate", "1e-4"], "--learning-rate", "twice")
    config = tmp_path / "c.toml"
    config.write_text("learning_rate = 1e-3\nlearning_rate = 1e-4\n")
    assert_refused(train, [*args, "--config", str(config)], str(config))
    with pytest.raises(SystemExit) as err:
        evaluate(["--first_stage", "a", "--candidates", "c", "--qrels", "q", "--topics", "t",
                  "--batch_size", "4", "--batch_size", "8"])
    assert err.value.code == 2 and "--batch_size is given twice" in capsys.readouterr().err


def test_interpolation_with_missing_first_stage_scores_is_refused(tiny_models, tmp_path):
    cands = toy_candidates(tmp_path / "c.parquet", first_stage_score=float("nan"))
    results = tmp_path / "r.parquet"
    assert_refused(evaluate, ["--checkpoint", str(tiny_models["bert"]), "--candidates", str(cands), "--qrels",
                              str(toy_qrels(tmp_path / "q.txt")), "--topics", "t", "--results", str(results),
                              "--table", str(tmp_path / "t.md"), "--interpolate", "0.5", "--no_costs",
                              "--device", "cpu"], "first_stage_score", str(cands))
    assert not results.exists()


def test_ranker_checks_its_input(tiny_models):
    from common.serving.rank import Ranker

    ranker = Ranker.load(str(tiny_models["bert"]), max_length=32, batch_size=4)
    with pytest.raises(TypeError, match="list of strings"):
        ranker.rank("a query", "a passage, not a list")
    assert ranker.rank("a query", []) == []
    assert [i for i, _ in ranker.rank("a query", ["x", "y", "z"], top_k=2)] and \
        len(ranker.rank("a query", ["x", "y", "z"], top_k=2)) == 2
    with pytest.raises(ValueError, match="top_k"):
        ranker.rank("a query", ["x", "y"], top_k=-1)
    for bad in ({"batch_size": -1}, {"batch_size": 0}, {"max_length": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Ranker.load(str(tiny_models["bert"]), **bad)


# -- nonsense refused up front ---------------------------------------------------------------
@pytest.mark.parametrize("target", [["--target_heads", "1000"], ["--target_layers", "9"],
                                    ["--target_ffn", "100000"]])
def test_shape_targets_beyond_the_model_are_refused_before_training(target, tiny_models, tmp_path):
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(write_toy_triples(tmp_path / "t.tsv", 8)),
            "--output_dir", str(tmp_path / "o"), "--num_training_samples", "16", *A, *target]
    assert_refused(prune_l0, args, target[0], "more than the model has")
    assert not (tmp_path / "o").exists()


def test_pruning_plans_beyond_the_model_are_refused_before_training(tiny_models, tmp_path):
    prune_mixed = importlib.import_module("03c_prune_mixed").main
    args = ["initial", "--model_tag", str(tiny_models["bert"]), "--train_triples_file",
            str(write_toy_triples(tmp_path / "t.tsv", 8)), "--output_dir", str(tmp_path / "o"),
            "--num_training_samples", "16", "--num_prune_cycles", "1", *A]
    assert_refused(prune_mixed, [*args, "--target_heads", "99", "--target_ffn", "8"], "--target_heads 99",
                   "more than the model has")
    assert_refused(prune_mixed, [*args, "--target_heads", "4", "--target_ffn", "8", "--exclude_layers", "0,7"],
                   "--exclude_layers")
    assert not (tmp_path / "o").exists()


def test_teacher_scores_must_have_one_row_per_triple(tiny_models, tmp_path):
    triples = write_toy_triples(tmp_path / "t.tsv", 16)
    for rows in (17, 15):
        scores = tmp_path / f"s{rows}.parquet"
        pd.DataFrame({"teacher_pos": np.ones(rows), "teacher_neg": np.zeros(rows)}).to_parquet(scores)
        assert_refused(train, ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
                               "--output_dir", str(tmp_path / "o"), "--num_training_samples", "16",
                               "--distill_scores", str(scores), *A], f"{rows} rows", "16 lines")
        assert not (tmp_path / "o").exists()


def test_eval_of_a_missing_run_dir_fails(tmp_path):
    cands, qrels = toy_candidates(tmp_path / "c.parquet"), toy_qrels(tmp_path / "q.txt")
    for flag in ("--all_checkpoints", "--checkpoint"):
        assert_refused(evaluate, [flag, str(tmp_path / "nothing"), "--candidates", str(cands), "--qrels", str(qrels),
                                  "--topics", "t", "--results", str(tmp_path / "r.parquet"), "--table",
                                  str(tmp_path / "t.md")], str(tmp_path / "nothing"))
    (tmp_path / "empty_run").mkdir()
    assert_refused(evaluate, ["--all_checkpoints", str(tmp_path / "empty_run"), "--candidates", str(cands),
                              "--qrels", str(qrels), "--topics", "t", "--results", str(tmp_path / "r.parquet"),
                              "--table", str(tmp_path / "t.md")], "no checkpoint")


def test_an_empty_candidate_list_writes_nothing(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "c.parquet"
    assert_refused(prefetch, ["json", "--input", str(empty), "--output", str(out)], "no candidates")
    assert not out.exists()
    no_triples = tmp_path / "t.tsv"
    no_triples.write_text("")
    scores = tmp_path / "s.parquet"
    assert_refused(prefetch, ["teacher", "--triples", str(no_triples), "--checkpoint", "all-MiniLM-L6-v2",
                              "--output", str(scores)], "no triples")
    assert not scores.exists()
    from common.data.formats import DataError, write_triples_tsv

    with pytest.raises(DataError, match="no rows"):
        write_triples_tsv([], tmp_path / "w.tsv")
    assert not list(tmp_path.glob("*w.tsv*"))


def test_calibration_on_evaluation_queries_is_refused_and_the_source_recorded(run, tmp_path):
    out, triples = run
    topics = toy_candidates(tmp_path / "eval.parquet")
    leak = tmp_path / "leak.tsv"
    leak.write_text("What is  topic 1 about\tsome passage\tanother passage\n" + triples.read_text())
    target = tmp_path / "exported"
    args = ["--checkpoint_dir", str(out / "seen_000000016"), "--output_dir", str(target), "--onnx",
            "--max_length", "32", "--calibration_pairs", "8"]
    assert_refused(reshape, [*args, "--calibration_triples", str(leak), "--eval_topics", str(topics)],
                   "evaluation queries", "--allow_eval_overlap")
    assert not target.exists()
    clean = tmp_path / "clean.tsv"
    clean.write_text("".join(f"a training query {i}\tpassage {i}\tother {i}\n" for i in range(8)))
    reshape([*args, "--calibration_triples", str(clean), "--eval_topics", str(topics), "--int8_keep_fp32", "ffn_out"])
    info = json.loads((target / "onnx" / "export.json").read_text())
    assert info["onnx-int8"]["smoothing"]["calibration_source"] == str(clean.resolve())


def test_fp16_and_missing_devices_are_refused(tiny_models, tmp_path):
    triples = write_toy_triples(tmp_path / "t.tsv", 8)
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
            "--output_dir", str(tmp_path / "o"), "--num_training_samples", "8", "--batch_size", "8",
            "--max_length", "32", "--threads", "1"]
    assert_refused(train, [*args, "--device", "cpu", "--precision", "fp16"], "--precision fp16")
    if not torch.cuda.is_available():
        assert_refused(train, [*args, "--device", "cuda"], "--device cuda", "not available")
    assert_refused(train, [*args, "--device", "gpu7"], "--device 'gpu7'")
    assert not (tmp_path / "o").exists()
    from common.serving.rank import Ranker

    with pytest.raises(ValueError, match="torch-fp16 needs a CUDA device"):
        Ranker.load(str(tiny_models["bert"]), "torch-fp16", device="cpu")


# -- tracebacks -> one error line --------------------------------------------------------------
def test_a_query_longer_than_max_length_is_truncated_not_a_crash(tiny_models):
    from common.models.loading import encode_pairs
    from common.kinds.loading import load_model
    from common.serving.rank import Ranker

    loaded = load_model(str(tiny_models["bert"]))
    tok = loaded.tokenizer
    long_query = " ".join(f"word{i}" for i in range(80))
    features = encode_pairs(tok, [long_query, "short query"], ["a passage " * 30, "a passage " * 30], 32,
                            padding=False)
    assert [len(x) for x in features["input_ids"]] == [32, 32]
    short = tok("short query", "a passage " * 30, truncation="only_second", max_length=32)["input_ids"]
    assert features["input_ids"][1] == short  # a query that fits: only the passage is cut, as before
    first = tok.decode(features["input_ids"][0])
    assert "word0" in first and "passage" in first  # both sides kept, the query cut
    ranker = Ranker.from_loaded(loaded, max_length=32)
    a = ranker.score([long_query, "short query"], ["a passage " * 30, "x"])
    b = ranker.score([long_query, "short query"], ["a passage " * 30, "x"])
    assert np.isfinite(a).all() and (a == b).all()  # deterministic


def test_a_failed_write_leaves_no_temporary_dir(run, tmp_path, monkeypatch):
    """A full disk as safetensors reports it (``SafetensorError``, no ``OSError``) is one error
    line naming the file, and nothing is left behind (04 and 02)."""
    import safetensors.torch
    from safetensors import SafetensorError

    out, _ = run

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "models" / "r"
    assert_refused(reshape, ["--checkpoint_dir", str(out / "seen_000000016"), "--output_dir", str(target)],
                   "No space left", "model.safetensors")
    assert not (tmp_path / "models").exists()  # nor the dirs made for it
    triples = write_toy_triples(tmp_path / "t.tsv", 8)
    run2 = tmp_path / "run2"
    assert_refused(train, ["--model_tag", str(out / "seen_000000016"), "--train_triples_file", str(triples),
                           "--output_dir", str(run2), "--num_training_samples", "8", *A], "No space left",
                   "model.safetensors")
    assert not [p.name for p in run2.iterdir() if p.name != "metrics.jsonl"]


def test_a_full_disk_under_torch_save_is_one_error_line(run, tmp_path, monkeypatch):
    """A full disk as ``torch.save`` reports it (a ``RuntimeError`` from its zip writer, as CI
    once printed in a traceback) is one error line naming optimizer.pt and the space left, and
    the stage leaves no checkpoint, finished or temporary."""
    import torch

    out, _ = run
    save = torch.save

    def full_on_optimizer(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 102447808 vs 102447696")
        return save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_on_optimizer)
    triples = write_toy_triples(tmp_path / "t.tsv", 8)
    run2 = tmp_path / "run2"
    assert_refused(train, ["--model_tag", str(out / "seen_000000016"), "--train_triples_file",
                                     str(triples), "--output_dir", str(run2), "--num_training_samples", "8", *A],
                             "optimizer.pt", "unexpected pos", "MiB free")
    assert not [p.name for p in run2.iterdir() if p.name != "metrics.jsonl"]
    # a RuntimeError that is not the writer's (a device error while the state is copied) stays itself
    from common.io import save_torch

    def device_error(obj, path, *a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch, "save", device_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        save_torch({}, tmp_path / "x.pt")


def test_a_truncated_metrics_line_is_tolerated_on_resume(run, capsys):
    out, triples = run
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"event": "train", "seen_pa')
    train(["--checkpoint_dir", str(out / "seen_000000008"), "--resume", "--train_triples_file", str(triples),
           "--output_dir", str(out), "--num_training_samples", "16", "--num_checkpoint_samples", "8", *A])
    captured = capsys.readouterr()
    assert "metrics.jsonl line" in captured.out + captured.err and "truncated" in captured.out + captured.err
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    # a bad line that is not the last is an error naming the file and line
    metrics.write_text("garbage\n" + metrics.read_text())
    assert_refused(train, ["--checkpoint_dir", str(out / "seen_000000008"), "--resume", "--train_triples_file",
                           str(triples), "--output_dir", str(out), "--num_training_samples", "16",
                           "--num_checkpoint_samples", "8", *A], "metrics.jsonl line 1")


def test_a_results_file_that_is_no_results_table_is_one_error_line(tmp_path):
    cands, qrels = toy_candidates(tmp_path / "c.parquet"), toy_qrels(tmp_path / "q.txt")
    other = toy_candidates(tmp_path / "other.parquet")
    kept = other.read_bytes()
    base = ["--first_stage", "bm25", "--candidates", str(cands), "--qrels", str(qrels), "--topics", "t",
            "--table", str(tmp_path / "t.md")]
    assert_refused(evaluate, [*base, "--results", str(other)], str(other), "not a results table")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    assert_refused(evaluate, [*base, "--results", str(garbage)], "not a results table")
    assert other.read_bytes() == kept


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_onnx_export_of_a_model_with_an_emptied_attention_layer(family, tiny_models, tmp_path):
    from common.kinds.loading import load_model, save_model
    from common.models.structure import zero_dead_weights

    loaded = load_model(str(tiny_models[family]))
    loaded.state.kept_heads[1] = []
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    out = tmp_path / "shipped"
    calib = tmp_path / "calib.tsv"
    calib.write_text("".join(f"a training query {i}\tpassage {i}\tother {i}\n" for i in range(8)))
    reshape(["--checkpoint_dir", str(tmp_path / "masked"), "--output_dir", str(out), "--onnx", "--max_length", "32",
             "--calibration_triples", str(calib), "--calibration_pairs", "8", "--int8_keep_fp32", "query", "ffn_out"])
    assert (out / "onnx" / "model_int8.onnx").is_file()
    # the shipping example: an already reshaped dir (its emptied layer an EmptySelfAttention) again
    again = tmp_path / "again"
    reshape(["--checkpoint_dir", str(out), "--output_dir", str(again), "--onnx", "--max_length", "32",
             "--int8_keep_fp32", "ffn_out"])
    assert (again / "onnx" / "model_int8.onnx").is_file()


def _chmod_binds(tmp_path: Path) -> bool:
    """Whether a read-only directory refuses this process (root with CAP_DAC_OVERRIDE writes anyway)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


def test_a_read_only_disk_is_one_error_line_and_leaves_nothing(run, tmp_path, monkeypatch):
    """02 writing a checkpoint into a run dir that turned read-only, 04 writing a new model or
    replacing one in a read-only dir, 05 writing --results or --table into one: one ``error:``
    line each, no ``.tmp-*`` left, nothing under a final name (05 refuses before it scores)."""
    from common.training.loop import Trainer

    if not _chmod_binds(tmp_path):
        pytest.skip("chmod does not bind this process (root with CAP_DAC_OVERRIDE)")
    out, triples = run
    ckpt = str(out / "seen_000000016")
    ro = tmp_path / "ro"
    ro.mkdir()
    reshape(["--checkpoint_dir", ckpt, "--output_dir", str(ro / "old")])  # for 04 --overwrite to replace
    before = snapshot(ro)
    save = Trainer.save_checkpoint

    def read_only_then_save(self):
        self.output_dir.chmod(0o555)
        return save(self)
    monkeypatch.setattr(Trainer, "save_checkpoint", read_only_then_save)
    run2 = tmp_path / "run2"
    ro.chmod(0o555)
    try:
        assert_refused(train, ["--model_tag", ckpt, "--train_triples_file", str(triples), "--output_dir", str(run2),
                               "--num_training_samples", "8", *A], "Permission denied")
        monkeypatch.undo()
        assert_refused(reshape, ["--checkpoint_dir", ckpt, "--output_dir", str(ro / "new")], "Permission denied")
        assert_refused(reshape, ["--checkpoint_dir", ckpt, "--output_dir", str(ro / "old"), "--overwrite"],
                       "Permission denied")
        cands, qrels = toy_candidates(tmp_path / "c.parquet"), toy_qrels(tmp_path / "q.txt")
        base = ["--checkpoint", ckpt, "--candidates", str(cands), "--qrels", str(qrels), "--topics", "t",
                "--max_length", "32", "--no_costs", "--threads", "1"]
        assert_refused(evaluate, [*base, "--results", str(ro / "r.parquet"), "--table", str(tmp_path / "t.md")],
                       "--results", str(ro))
        assert_refused(evaluate, [*base, "--results", str(tmp_path / "r.parquet"), "--table", str(ro / "t.md")],
                       "--table", str(ro))
        Path(ckpt).chmod(0o555)  # the model dir, where 05 keeps the run files (eval/)
        assert_refused(evaluate, [*base, "--results", str(tmp_path / "r.parquet"), "--table", str(tmp_path / "t.md")],
                       "the run file", ckpt)
    finally:
        Path(ckpt).chmod(0o755)
        ro.chmod(0o755)
        if run2.exists():
            run2.chmod(0o755)
    assert snapshot(ro) == before and sorted(p.name for p in ro.iterdir()) == ["old"]
    assert not [p.name for p in run2.iterdir() if p.name.startswith((".tmp-", "seen_"))]
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "t.md").exists()
    assert not list(Path(ckpt).glob("eval/t*"))  # 05 refused before it scored


# -- security ----------------------------------------------------------------------------------
def test_a_model_dirs_config_cannot_lead_outside_it(tiny_models, tmp_path):
    from common.kinds.loading import load_model, reshape_checkpoint, save_model
    from common.serving.rank import QUERY_ENCODER_FIELD, Ranker

    secret = tmp_path / "secret"
    shutil.copytree(tiny_models["bert"], secret)
    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    setattr(loaded.model.config, QUERY_ENCODER_FIELD, "../secret")
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "model")
    with pytest.raises(ValueError, match="leads outside the model directory"):
        Ranker.load(str(tmp_path / "model"))
    with pytest.raises(ValueError, match="leads outside the model directory"):
        reshape_checkpoint(str(tmp_path / "model"), str(tmp_path / "out" / "r"))
    assert not (tmp_path / "out").exists()
    os.symlink(secret, tmp_path / "model" / "link")  # a link out of the dir is refused too
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config[QUERY_ENCODER_FIELD] = "link"
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="leads outside the model directory"):
        Ranker.load(str(tmp_path / "model"))



def test_a_config_never_names_a_path_outside_its_dir(tiny_models, tmp_path, monkeypatch):
    """An absolute query-encoder path in a model dir's config.json (what training wrote before)
    is refused by every reader, naming the file and field; so is a hub-style name that is a path
    here (transformers would open it from the working directory). Naming the encoder on the
    command line still works, and a training stage named it again packs it into its checkpoints."""
    from common.kinds.loading import load_model, reshape_checkpoint, save_model
    from common.serving.rank import QUERY_ENCODER_FIELD, Ranker

    teacher = str(tiny_models["bert"])
    loaded = load_model(teacher, kind="bi")
    setattr(loaded.model.config, QUERY_ENCODER_FIELD, teacher)
    model = tmp_path / "model"
    save_model(loaded.model, loaded.tokenizer, loaded.state, model)
    message = f"{model / 'config.json'}: {QUERY_ENCODER_FIELD} {teacher!r} is not a relative path"
    for read in (lambda: Ranker.load(str(model)), lambda: reshape_checkpoint(str(model), str(tmp_path / "r"))):
        with pytest.raises(ValueError, match="is not a relative path inside the model dir") as err:
            read()
        assert str(err.value).startswith(message)
    assert not (tmp_path / "r").exists()
    triples = write_toy_triples(tmp_path / "t.tsv", 8)
    args = ["--checkpoint_dir", str(model), "--model_kind", "bi", "--train_triples_file", str(triples),
            "--num_training_samples", "8", *A]
    assert_refused(train, [*args, "--output_dir", str(tmp_path / "run")], "is not a relative path", "config.json")
    assert not (tmp_path / "run").exists()
    explicit = Ranker.from_loaded(load_model(str(model)), query_encoder=teacher)  # the user names it
    assert explicit.query_encoder == teacher
    train([*args, "--output_dir", str(tmp_path / "packed"), "--query_encoder", teacher])
    (ckpt,) = (tmp_path / "packed").glob("seen_*")
    assert json.loads((ckpt / "config.json").read_text())[QUERY_ENCODER_FIELD] == "query_encoder"
    assert Ranker.load(str(ckpt)).query_encoder == str(ckpt / "query_encoder")
    # a name shaped like a hub name that is a directory here, outside the model dir
    shutil.copytree(tiny_models["bert"], tmp_path / "org" / "name")
    config = json.loads((model / "config.json").read_text())
    config[QUERY_ENCODER_FIELD] = "org/name"
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is no directory inside the model dir but a path here"):
        Ranker.load(str(model))


def test_a_module_folder_of_modules_json_stays_inside_the_dir(tiny_models, tmp_path):
    """sentence-transformers' modules.json names its module folders (Pooling, Dense: weights that
    a save copies): one outside the dir, by ``..`` or an absolute path, is refused on load."""
    from common.kinds.loading import load_model, save_model

    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "saved")
    model = tmp_path / "model"  # a plain sentence-transformers dir: its modules.json is read
    shutil.copytree(tiny_models["bert"], model)
    shutil.copy(tmp_path / "saved" / "modules.json", model)
    shutil.copytree(tmp_path / "saved" / "1_Pooling", model / "1_Pooling")
    assert load_model(str(model), kind="bi").kind == "bi"
    shutil.copytree(model / "1_Pooling", tmp_path / "outside")
    modules = json.loads((model / "modules.json").read_text())
    for folder in ("../outside", str(tmp_path / "outside")):
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        pooling["path"] = folder
        (model / "modules.json").write_text(json.dumps(modules))
        with pytest.raises(ValueError, match=f"modules.json: module .* path '{folder}' leads outside"):
            load_model(str(model), kind="bi")

def test_slimrank_never_lets_a_model_dir_run_its_own_code():
    """Every from_pretrained / AutoConfig / AutoTokenizer call in slimrank says
    trust_remote_code=False (a dir with an auto_map must never make transformers prompt)."""
    calls = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "common").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config"):
                owner = ast.unparse(node.func.value)
                if owner.startswith("Auto") or owner in ("AutoConfig", "AutoTokenizer"):
                    if node.func.attr == "from_config":
                        continue  # builds from an already-read config: no code is fetched
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", keywords.get("trust_remote_code")))
    assert calls and all(value == "False" for _, value in calls), [c for c in calls if c[1] != "False"]


def test_files_slimrank_writes_into_a_model_dir_do_not_block_its_overwrite(run, tmp_path):
    """04 --overwrite replaces a model dir that holds what slimrank itself wrote there later:
    auto's backend choice (Ranker.load(dir, "auto")), an OpenVINO IR, M3 head files, Dense folders."""
    out, _ = run
    target = tmp_path / "model"
    args = ["--checkpoint_dir", str(out / "seen_000000016"), "--output_dir", str(target)]
    reshape(args)
    (target / "backend_choice.json").write_text("{}")
    (target / "openvino").mkdir()
    (target / "2_Dense").mkdir()
    (target / "sparse_linear.pt").write_bytes(b"")
    reshape(args + ["--overwrite"])
    assert (target / "model.safetensors").is_file() and not (target / "backend_choice.json").exists()
    (target / "notes.txt").write_text("mine")  # a user's file still blocks it
    assert_refused(reshape, args + ["--overwrite"], "notes.txt")
