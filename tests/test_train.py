"""The training loop: exact resume, output-dir safety, clear errors on a short stream."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.data.formats import DataError
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs, Trainer


def warmup_linear(trainer):
    return WarmupLinear(trainer.total_steps, 2)


def args_for(model_dir, triples, out, pairs, **kw):
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=pairs,
                num_checkpoint_samples=kw.pop("every", 0), model_tag=str(model_dir), batch_size=8,
                max_length=32, learning_rate=5e-4, seed=3)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_resume_equals_straight_run(family, tiny_models, toy_triples, tmp_path):
    """N pairs + resume + N pairs gives the same weights as 2N pairs straight (dropout on)."""
    straight = Trainer(args_for(tiny_models[family], toy_triples, tmp_path / "a", 48), "initial",
                       warmup_linear).train()
    first = Trainer(args_for(tiny_models[family], toy_triples, tmp_path / "b", 48, every=24),
                    "initial", warmup_linear)
    first.total_steps = 3  # stop after the first checkpoint, as a killed run would
    half = first.train()
    assert half.name == "seen_000000024"
    resumed = Trainer(args_for(tiny_models[family], toy_triples, tmp_path / "b", 48, every=24,
                               checkpoint_dir=str(half)), "initial", warmup_linear)
    assert resumed.seen_pairs == 24 and resumed.step == 3
    end = resumed.train()
    assert end.name == straight.name == "seen_000000048"
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    # the triples really moved the weights
    init = load_file(str(half / "model.safetensors"))
    assert any(not torch.equal(init[k], b[k]) for k in b)
    state = json.loads((end / "trainer_state.json").read_text())
    assert state["seen_pairs"] == 48 and state["versions"]["torch"] == torch.__version__
    assert (end / "optimizer.pt").exists() and (end / "rng.pt").exists()
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_pairs = [x["seen_pairs"] for x in lines if x["event"] == "train"]
    assert train_pairs == sorted(set(train_pairs)) == list(range(8, 49, 8))


def test_refuses_non_empty_output_dir(tiny_models, toy_triples, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        Trainer(args_for(tiny_models["bert"], toy_triples, out, 16), "initial", warmup_linear)
    # --overwrite replaces only what a run wrote: a foreign file is refused, and kept
    with pytest.raises(FileExistsError, match="keep.txt"):
        Trainer(args_for(tiny_models["bert"], toy_triples, out, 16, overwrite=True), "initial",
                warmup_linear)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    (out / "seen_000000008").mkdir()  # an old run's checkpoint
    Trainer(args_for(tiny_models["bert"], toy_triples, out, 16, overwrite=True), "initial",
            warmup_linear).train()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "seen_000000016"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_short_stream_is_an_error(tiny_models, toy_triples, tmp_path):
    trainer = Trainer(args_for(tiny_models["bert"], toy_triples, tmp_path / "o", 256), "initial",
                      warmup_linear)
    with pytest.raises(DataError, match="ended after 64 rows"):
        trainer.train()


def test_arguments_are_checked(tiny_models, toy_triples, tmp_path):
    with pytest.raises(ValueError, match="multiple of --batch_size"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 12).validate()
    with pytest.raises(ValueError, match="multiple of --group_size"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 12, batch_size=3).validate()
    with pytest.raises(ValueError, match="--distill_loss kl needs --distill_scores"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 16, distill_loss="kl").validate()
    with pytest.raises(ValueError, match="listwise"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 16, group_size=4).validate()


def write_groups(tmp_path, rows: int = 24, n: int = 4):
    """A listwise file (query + n passages) and teacher scores: passage i of a row gets
    score -i, so the teacher's order is the file order."""
    import pandas as pd

    from common.data.formats import write_triples_tsv

    groups = [(f"query {r} about topic {r % 5}", *[f"passage {r}.{i} text word{i}" for i in range(n)])
              for r in range(rows)]
    path = tmp_path / "groups.tsv"
    write_triples_tsv(groups, path, passages=n)
    scores = tmp_path / "group_scores.parquet"
    pd.DataFrame({f"teacher_{i}": [-float(i)] * rows for i in range(n)}).to_parquet(scores)
    return path, scores


def test_listwise_kl_trains_and_resumes_exactly(tiny_models, tmp_path):
    """Groups of 4 passages, KL to the teacher's softmax: the loss falls on a fixed target,
    seen pairs count passages, and resume from the middle equals a straight run."""
    groups, scores = write_groups(tmp_path, rows=120)
    kw = dict(group_size=4, distill_scores=str(scores), distill_loss="kl", distill_scale=2.0,
              batch_size=8, learning_rate=1e-3)
    Trainer(args_for(tiny_models["bert"], groups, tmp_path / "long", 480, **kw), "initial",
            warmup_linear).train()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "train"]
    assert len(losses) == 60 and sum(losses[-10:]) < 0.9 * sum(losses[:10])
    straight = Trainer(args_for(tiny_models["bert"], groups, tmp_path / "a", 96, **kw), "initial",
                       warmup_linear).train()
    first = Trainer(args_for(tiny_models["bert"], groups, tmp_path / "b", 96, every=48, **kw),
                    "initial", warmup_linear)
    first.total_steps = 6
    half = first.train()
    resumed = Trainer(args_for(tiny_models["bert"], groups, tmp_path / "b", 96, every=48,
                               checkpoint_dir=str(half), **kw), "initial", warmup_linear)
    end = resumed.train()
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    # 480 pairs = 120 groups of 4: one more step needs rows 121 and 122
    with pytest.raises(DataError, match="ended after 120 rows"):
        Trainer(args_for(tiny_models["bert"], groups, tmp_path / "c", 488, **kw), "initial",
                warmup_linear).train()


def test_listwise_needs_matching_teacher_columns(tiny_models, tmp_path):
    groups, _ = write_groups(tmp_path, n=4)
    import pandas as pd

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"teacher_0": [0.0] * 24, "teacher_1": [1.0] * 24}).to_parquet(bad)
    with pytest.raises(DataError, match=r"bad.parquet.*missing \['teacher_2', 'teacher_3'\]"):
        Trainer(args_for(tiny_models["bert"], groups, tmp_path / "o", 16, group_size=4, batch_size=8,
                         distill_scores=str(bad), distill_loss="kl"), "initial", warmup_linear)


def test_bf16_without_native_support_is_flagged(tiny_models, toy_triples, tmp_path, monkeypatch, capsys):
    """bf16 autocast on a CPU without AVX512-BF16 / AMX is emulated (tens of times slower): said."""
    import common.training.loop as trainer_module
    from common.training.schedules import WarmupLinear
    from common.training.loop import TrainArgs, Trainer

    assert trainer_module.cpu_has_native_bf16() in (True, False, None)
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: False)
    args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "o"), num_training_samples=8,
                     model_tag=str(tiny_models["bert"]), batch_size=8, max_length=16, precision="bf16")
    Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
    assert "without native bf16" in capsys.readouterr().out


def write_varied_triples(path, n: int = 96):
    """Rows of very different lengths, in no length order."""
    lines = []
    for i in range(n):
        words = " ".join(f"w{(i * 7 + j) % 50}" for j in range((i * 37) % 40 + 1))
        lines.append(f"query {i % 9} about t{i % 5}\tpositive {i} {words}\tnegative {(i * 3) % 11} "
                     f"{words[: (i * 13) % 60]}x")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_length_batches_are_windows_of_similar_lengths_in_a_seeded_order(tmp_path):
    from common.data.formats import LENGTH_WINDOW_BATCHES, TrainingBatches

    path = write_varied_triples(tmp_path / "v.tsv", n=300)
    lines = [tuple(x.split("\t")) for x in path.read_text().splitlines()]
    grouped = list(TrainingBatches(path, start_row=10, rows_per_batch=4, group_by_length=True, seed=5))
    plain = list(TrainingBatches(path, start_row=10, rows_per_batch=4))
    window = 4 * LENGTH_WINDOW_BATCHES
    assert all(row == lines[i] for batch in grouped for i, row in batch)  # indices are file rows
    for k in range(3):  # each window: its own rows, each once
        batches = grouped[k * LENGTH_WINDOW_BATCHES:(k + 1) * LENGTH_WINDOW_BATCHES]
        got = sorted(i for b in batches for i, _ in b)
        assert got == list(range(10 + k * window, min(300, 10 + (k + 1) * window))[:len(got)])
    assert len(grouped[-1]) == (300 - 10) % 4 == 2  # the file ends: a short last batch, last

    def padding(batches):  # characters of padding of every (query, passage) pair up to its batch's longest
        sizes = [[len(row[0]) + len(p) for _, row in b for p in row[1:]] for b in batches if len(b) == 4]
        return sum(max(s) * len(s) - sum(s) for s in sizes)
    assert padding(grouped) < 0.6 * padding(plain)
    # a seeded order: another seed, another order of the same batches; resume = skip
    other = list(TrainingBatches(path, start_row=10, rows_per_batch=4, group_by_length=True, seed=6))
    assert other != grouped and sorted(map(str, other)) == sorted(map(str, grouped))
    for skip in (1, LENGTH_WINDOW_BATCHES, LENGTH_WINDOW_BATCHES + 3):
        assert list(TrainingBatches(path, start_row=10, rows_per_batch=4, group_by_length=True, seed=5,
                                    skip_batches=skip)) == grouped[skip:]


def test_group_by_length_resumes_exactly_with_the_teacher_scores_of_its_rows(tiny_models, tmp_path, monkeypatch):
    """--group_by_length: N pairs + resume + N pairs == 2N straight; every step trains rows
    of the file as their indices say, with those rows' teacher scores."""
    import pandas as pd

    triples = write_varied_triples(tmp_path / "v.tsv")
    lines = [tuple(x.split("\t")) for x in triples.read_text().splitlines()]
    scores = tmp_path / "scores.parquet"
    pd.DataFrame({"teacher_pos": [float(i) for i in range(96)], "teacher_neg": [0.0] * 96}).to_parquet(scores)
    seen = []
    original = Trainer._teacher_rows

    def spy(self, n):
        got = original(self, n)
        seen.append((list(self._row_indices), got[:, 0].tolist()))
        return got
    monkeypatch.setattr(Trainer, "_teacher_rows", spy)
    kw = dict(group_by_length=True, distill_scores=str(scores), distill_scale=0.01, max_length=64)
    straight = Trainer(args_for(tiny_models["bert"], triples, tmp_path / "a", 48, **kw), "initial",
                       warmup_linear).train()
    assert all(indices == [round(s / 0.01) for s in used] for indices, used in seen)
    trained = [i for indices, _ in seen for i in indices]
    assert trained != sorted(trained) and len(set(trained)) == len(trained) == 24
    first = Trainer(args_for(tiny_models["bert"], triples, tmp_path / "b", 48, every=24, **kw),
                    "initial", warmup_linear)
    first.total_steps = 3
    half = first.train()
    seen.clear()
    end = Trainer(args_for(tiny_models["bert"], triples, tmp_path / "b", 48, every=24,
                           checkpoint_dir=str(half), **kw), "initial", warmup_linear).train()
    assert [i for indices, _ in seen for i in indices] == trained[12:]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert lines[trained[0]][0].startswith("query")
    from common.training.resume import training_throughput
    rate = training_throughput(tmp_path / "a")  # the first step is left out
    assert rate["pairs timed"] == 40 and rate["pairs/s"] > 0 and rate["device"] == "cpu"


@pytest.mark.parametrize("head", ["classifier", "segment_cosine"])
def test_length_chunks_compute_the_whole_batch_with_less_padding(head, tiny_models):
    """chunked_call: the batch's sequences in length-sorted chunks, each cut to its own longest,
    give the scores, embeddings and gradients of the whole padded batch, in the batch's order."""
    from common.kinds.base import chunked_call
    from common.kinds.loading import load_model
    from common.models.loading import encode_pairs

    loaded = load_model(str(tiny_models["bert"]), "cpu", kind="cross", head=head)
    model = loaded.model.eval()
    queries = [f"query {i}" for i in range(20)]
    passages = [" ".join(["word"] * (3 + (i * 7) % 40)) for i in range(20)]
    batch = encode_pairs(loaded.tokenizer, queries, passages, 64, model)
    widths = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    whole = model(**batch)
    whole.logits.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    chunked = chunked_call(model, batch, 8)
    chunked.logits.float().square().sum().backward()
    handle.remove()
    full = batch["input_ids"].shape[1]
    assert widths[0] == (20, full) and [w[0] for w in widths[1:]] == [8, 8, 4]
    assert sum(n * t for n, t in widths[1:]) < 20 * full and max(t for _, t in widths[1:]) == full
    mask = batch["attention_mask"].bool()
    for key, value in whole.items():
        if value is not None:
            assert chunked[key].shape == value.shape
            if value.dim() == 3:  # a token axis: what the padding positions hold is no output
                value, got = value[mask], chunked[key][mask]
            else:
                got = chunked[key]
            torch.testing.assert_close(got, value, atol=2e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], atol=2e-5, rtol=1e-3)
    assert chunked_call(model, batch, 0).logits.shape == whole.logits.shape  # 0: one call


def test_length_batches_bench_runs_a_script_stage_per_chunk_size(tiny_models, tmp_path, capsys, monkeypatch):
    """bench/length_batches.py --stage: the real 03c stage, file order and one grouped setting per
    --chunks, alternating; padding falls with the chunk size; each setting reports its speed-up."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("length_batches", Path(__file__).resolve().parents[1] / "bench"
                                                  / "length_batches.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from common.kinds.base import ModelKind

    chunks = []
    init = ModelKind.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        chunks.append(self.length_chunk)
    monkeypatch.setattr(ModelKind, "__init__", spy)
    triples = write_varied_triples(tmp_path / "v.tsv")
    model = str(tiny_models["bert"])
    bench.main(["--triples", str(triples), "--model", model, "--pairs", "96", "--batch_size", "16",
                "--max_length", "64", "--padding_pairs", "64", "--threads", "1", "--chunks", "8", "4",
                "--stage", "03c_prune_mixed.py", "--stage_args",
                f"initial --checkpoint_dir {model} --num_prune_cycles 2 --target_heads 9 --target_ffn 25 "
                "--importance activation --score_fraction 0.5"])
    lines = [x for x in capsys.readouterr().out.splitlines() if "padding" in x]
    assert [x.split(":")[0].strip() for x in lines] == ["file order", "group_by_length, chunks of 8",
                                                        "group_by_length, chunks of 4"]
    shares = [float(x.split("padding")[1].split("%")[0]) for x in lines]
    assert shares[0] > shares[1] > shares[2]
    assert all("speed-up" in x for x in lines) and lines[0].endswith("speed-up 1.00x")
    assert chunks == [0, 8, 4]  # each setting's stage ran its chunk size (batches of 16 sequences: all split)
    from common.training.loop import LENGTH_CHUNK
    assert LENGTH_CHUNK == 16  # the bench put the module's chunk back


def test_group_by_length_chunks_a_cross_encoder_batch(tiny_models, toy_triples, tmp_path):
    """--group_by_length runs a cross-encoder's batch in chunks (LENGTH_CHUNK sequences); not with
    --distill_hidden (one forward per step), nor without --group_by_length."""
    from common.training.loop import LENGTH_CHUNK

    chunked = Trainer(args_for(tiny_models["bert"], toy_triples, tmp_path / "a", 32, group_by_length=True,
                               batch_size=32), "initial", warmup_linear)
    assert chunked.training_kind.length_chunk == LENGTH_CHUNK
    plain = Trainer(args_for(tiny_models["bert"], toy_triples, tmp_path / "b", 32, batch_size=32), "initial",
                    warmup_linear)
    assert plain.training_kind.length_chunk == 0
    hidden = Trainer(args_for(tiny_models["bert"], toy_triples, tmp_path / "c", 32, group_by_length=True, batch_size=32,
                              distill_from=str(tiny_models["bert"]), distill_hidden=1.0), "initial", warmup_linear)
    assert hidden.training_kind.length_chunk == 0
    chunked.train()
    assert any(tmp_path.joinpath("a").glob("seen_*"))
