"""Hostile inputs: each defect class refused with one ``error:`` line naming the flag or file,
and nothing deleted or half-written (issue: nothing lost, nothing silent)."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED, write_toy_triples

train = importlib.import_module("02_train_initial").main
prune_mixed = importlib.import_module("03c_prune_mixed").main
reshape = importlib.import_module("04_reshape").main
evaluate = importlib.import_module("05_eval_trec").main
prefetch = importlib.import_module("01_prefetch_passages").main

A = ["--batch_size", "8", "--max_length", "32", "--threads", "1", "--device", "cpu"]


def assert_refused(fn, argv, *needles) -> str:
    """``fn(argv)`` exits with one ``error:`` line containing every needle."""
    with pytest.raises(SystemExit) as err:
        fn(argv)
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_overwrite_never_deletes_an_input(tiny_models, tmp_path):
    d = tmp_path / "D"
    d.mkdir()
    triples = write_toy_triples(d / "tr.tsv", 16)
    assert_refused(train, ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
                    "--output_dir", str(d), "--num_training_samples", "16", "--overwrite", *A],
            "--train_triples_file", "holds the input")
    assert triples.exists()


def test_overwrite_keeps_the_old_run_when_the_new_one_fails(run, tiny_models, tmp_path):
    out, triples = run
    before = snapshot(out)
    (tmp_path / "not-a-model").mkdir()
    assert_refused(train, ["--model_tag", str(tmp_path / "not-a-model"), "--train_triples_file",
                    str(triples), "--output_dir", str(out), "--num_training_samples", "16",
                    "--overwrite", *A], "not a model directory")
    assert snapshot(out) == before
    # a source checkpoint inside the output dir is an input too
    assert_refused(prune_mixed, ["initial", "--checkpoint_dir", str(out / "seen_000000008"),
                          "--train_triples_file", str(triples), "--output_dir", str(out),
                          "--num_training_samples", "16", "--num_prune_cycles", "1",
                          "--target_heads", "10", "--overwrite", *A], "--checkpoint_dir")
    assert snapshot(out) == before
    # foreign files in the old dir are never deleted
    (out / "notes.txt").write_text("mine")
    assert_refused(train, ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
                    "--output_dir", str(out), "--num_training_samples", "8", "--overwrite", *A],
            "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_once_the_new_run_is_done(run, tiny_models, tmp_path):
    out, triples = run
    train(["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
           "--output_dir", str(out), "--num_training_samples", "8", "--overwrite", *A])
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "seen_000000008"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
    # the aside copy left by a killed overwrite is never deleted by the next one
    aside = out.with_name(f".{out.name}.replaced")
    aside.mkdir()
    (aside / "seen_000000016").mkdir()
    assert_refused(train, ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
                           "--output_dir", str(out), "--num_training_samples", "8", "--overwrite", *A],
                   "interrupted --overwrite")
    assert (aside / "seen_000000016").is_dir() and (out / "seen_000000008").is_dir()


def test_reshape_overwrite_never_removes_its_source(run, tmp_path):
    out, _ = run
    ckpt = out / "seen_000000016"
    before = snapshot(ckpt)
    assert_refused(reshape, ["--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--overwrite"],
            "source checkpoint")
    assert_refused(reshape, ["--checkpoint_dir", str(ckpt), "--output_dir", str(ckpt), "--overwrite"],
            "source checkpoint")
    assert snapshot(ckpt) == before
    reshape(["--checkpoint_dir", str(ckpt)])
    kept = snapshot(ckpt / "reshaped")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_refused(reshape, ["--checkpoint_dir", str(broken), "--output_dir", str(ckpt / "reshaped"),
                      "--overwrite"], "cannot load model", str(broken))
    assert snapshot(ckpt / "reshaped") == kept


def test_bad_calibration_triples_write_nothing(run, tmp_path):
    """04 --onnx --calibration_triples reads the file before anything is written: a bad line is
    one error line naming it, and no reshaped dir (nor half an export) appears."""
    out, _ = run
    bad = tmp_path / "calib.tsv"
    bad.write_text("a query\ta passage\tanother\nonly one field\n")
    target = tmp_path / "exported"
    assert_refused(reshape, ["--checkpoint_dir", str(out / "seen_000000016"), "--output_dir", str(target),
                             "--onnx", "--calibration_triples", str(bad)], str(bad), "line 2")
    assert not target.exists()


def test_resume_checks_its_arguments_and_state(run):
    out, triples = run
    half = out / "seen_000000008"
    base = ["--checkpoint_dir", str(half), "--resume", "--train_triples_file", str(triples),
            "--output_dir", str(out), "--num_training_samples", "16", "--num_checkpoint_samples", "8"]
    assert_refused(train, base + ["--batch_size", "4", "--max_length", "32", "--threads", "1",
                           "--device", "cpu"], "--batch_size 8 -> 4")
    assert_refused(train, base + A + ["--learning_rate", "1e-3"], "--learning_rate")
    (half / "trainer_state.json").write_text("{not json")
    assert_refused(train, base + A, "trainer_state.json", "not valid JSON")
    (half / "trainer_state.json").unlink()
    assert_refused(train, base + A, "trainer_state.json is missing")


@pytest.mark.parametrize("flag,value,script", [
    ("--num_training_samples", "0", "train"), ("--learning_rate", "-1", "train"),
    ("--warmup_fraction", "1.5", "train"), ("--max_length", "2", "train"),
    ("--score_fraction", "0", "prune"), ("--target_sparsity", "1.5", "prune"),
    ("--num_prune_cycles", "0", "prune"), ("--learning_rate", "nan", "train")])
def test_numbers_are_checked_at_parse_time(flag, value, script, tiny_models, tmp_path):
    common = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(tmp_path / "x.tsv"),
              "--output_dir", str(tmp_path / "o"), "--num_training_samples", "16", *A]
    args = [a for a in common]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    if script == "train":
        assert_refused(train, args, flag)
    else:
        assert_refused(prune_mixed, ["initial", *args, "--num_prune_cycles" if flag != "--num_prune_cycles"
                              else "--target_heads", "2"], flag)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")
def test_eval_refuses_another_topic_sets_qrels(tmp_path):
    dl20 = tmp_path / "dl20.parquet"
    prefetch(["json", "--input", str(SHARED / "dl20/bm25.json"), "--output", str(dl20)])
    results = tmp_path / "r.parquet"
    assert_refused(evaluate, ["--first_stage", "bm25", "--candidates", str(dl20), "--qrels",
                       str(SHARED / "dl21/qrels.txt"), "--topics", "dl20", "--results", str(results),
                       "--table", str(tmp_path / "t.md")], "judges only 0 of the 54 queries")
    assert not results.exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")
def test_training_on_evaluation_queries_is_refused(tiny_models, tmp_path):
    dl21 = tmp_path / "dl21.parquet"
    prefetch(["json", "--input", str(SHARED / "dl21/bm25.json"), "--output", str(dl21),
              "--max_queries", "3"])
    import pandas as pd

    c = pd.read_parquet(dl21)
    q = c["query"].iloc[0]
    triples = tmp_path / "leak.tsv"
    triples.write_text("".join(f"{q}\t{a}\t{b}\n" for a, b in zip(c["passage"][:8], c["passage"][8:16])))
    args = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(triples),
            "--output_dir", str(tmp_path / "o"), "--num_training_samples", "8",
            "--eval_candidates_file", str(dl21), "--eval_qrels_file", str(SHARED / "dl21/qrels.txt"), *A]
    assert_refused(train, args, "training queries are queries of", "--allow_eval_overlap")
    assert not (tmp_path / "o").exists()
    train(args + ["--allow_eval_overlap"])
    assert (tmp_path / "o" / "seen_000000008").is_dir()


def test_garbage_pruning_json_is_one_error_line(run):
    out, _ = run
    ckpt = out / "seen_000000016"
    (ckpt / "pruning.json").write_text("[1, 2")
    assert_refused(reshape, ["--checkpoint_dir", str(ckpt)], "pruning.json", "not valid JSON")
    (ckpt / "pruning.json").write_text(json.dumps({"format": "something else"}))
    assert_refused(reshape, ["--checkpoint_dir", str(ckpt)], "pruning.json", "format")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")
def test_prefetch_writes_both_outputs_or_neither(tmp_path):
    out, run_file = tmp_path / "c.parquet", tmp_path / "c.run"
    source = ["json", "--input", str(SHARED / "dl20/bm25.json"), "--output", str(out),
              "--run_file", str(run_file)]
    # a run tag with whitespace fails the run file: the parquet must not appear either
    assert_refused(prefetch, source + ["--tag", "two words"], "nothing written", str(out))
    assert not out.exists() and not run_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    prefetch(source)
    assert out.exists() and run_file.exists()


def test_checkpoint_without_pruning_json_is_refused(run):
    out, _ = run
    ckpt = out / "seen_000000016"
    (ckpt / "pruning.json").unlink()
    assert_refused(reshape, ["--checkpoint_dir", str(ckpt)], "without pruning.json")


def test_bad_bytes_and_empty_fields_name_their_line(tmp_path):
    from common.data.formats import DataError, TriplesStream

    path = tmp_path / "t.tsv"
    good = "q\tp\tn\n" * 3000  # more than one read-ahead buffer before the bad line
    path.write_bytes(good.encode() + b"q\tp \xff\xfe\tn\n")
    with pytest.raises(DataError, match="line 3001: not UTF-8"):
        list(TriplesStream(path))
    path.write_text("q\tp\tn\nq\t \tn\n")
    with pytest.raises(DataError, match="line 2: empty field: positive"):
        list(TriplesStream(path))


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")
def test_triples_from_the_evaluation_topics_are_refused_by_default(tmp_path):
    dl20 = tmp_path / "dl20.parquet"
    prefetch(["json", "--input", str(SHARED / "dl20/bm25.json"), "--output", str(dl20)])
    out = tmp_path / "t.tsv"
    args = ["triples", "--candidates", str(dl20), "--qrels", str(SHARED / "dl20/qrels.txt"),
            "--eval_qrels", str(SHARED / "dl20/qrels.txt"), "--output", str(out)]
    assert_refused(prefetch, args, "judged topics", "--allow_eval_overlap")
    assert not out.exists()
    prefetch(args + ["--allow_eval_overlap"])
    assert out.exists()


def test_corrupt_or_unsafe_optimizer_state_is_one_error_line(run):
    import pickle

    out, triples = run
    half = out / "seen_000000008"
    base = ["--checkpoint_dir", str(half), "--resume", "--train_triples_file", str(triples),
            "--output_dir", str(out), "--num_training_samples", "16", "--num_checkpoint_samples", "8", *A]
    (half / "optimizer.pt").write_bytes(b"garbage")
    assert_refused(train, base, "optimizer.pt", "unreadable or unsafe")
    (half / "optimizer.pt").write_bytes(pickle.dumps(print))  # a pickled callable: refused
    assert_refused(train, base, "optimizer.pt", "unreadable or unsafe")


@pytest.mark.parametrize("script,argv,flag", [
    ("eval", ["--repeats", "0"], "--repeats"), ("eval", ["--interpolate", "1.5"], "--interpolate"),
    ("prefetch", ["distill", "--pairs_per_query", "0"], "--pairs_per_query"),
    ("reshape", ["--checkpoint_dir", "x", "--keep_layers", "0"], "--keep_layers")])
def test_other_scripts_check_numbers(script, argv, flag, capsys):
    fn = {"eval": evaluate, "prefetch": prefetch, "reshape": reshape}[script]
    if script == "eval":
        argv = ["--first_stage", "bm25", "--candidates", "c", "--qrels", "q", "--topics", "t", *argv]
    with pytest.raises(SystemExit) as err:
        fn(argv)
    assert err.value.code == 2 and flag in capsys.readouterr().err  # argparse's one error line
