"""The training loop: exact resume, output-dir safety, clear errors on a short stream."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.data import DataError
from common.schedules import WarmupLinear
from common.trainer import TrainArgs, Trainer


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
    Trainer(args_for(tiny_models["bert"], toy_triples, out, 16, overwrite=True), "initial",
            warmup_linear).train()
    assert not (out / "keep.txt").exists() and (out / "seen_000000016").is_dir()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_short_stream_is_an_error(tiny_models, toy_triples, tmp_path):
    trainer = Trainer(args_for(tiny_models["bert"], toy_triples, tmp_path / "o", 256), "initial",
                      warmup_linear)
    with pytest.raises(DataError, match="ended after 64 triples"):
        trainer.train()


def test_arguments_are_checked(tiny_models, toy_triples, tmp_path):
    with pytest.raises(ValueError, match="multiple of --batch_size"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 12).validate()
    with pytest.raises(ValueError, match="even"):
        args_for(tiny_models["bert"], toy_triples, tmp_path, 12, batch_size=3).validate()
