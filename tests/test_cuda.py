"""The CUDA paths, on a CUDA device: training under bf16 autocast, a prune event and exact
resume, reshape and masked == reshaped, 05's quality and GPU latency, the Ranker, torchrun
with NCCL, L0 gates with layer-wise distillation.

Every test is marked ``cuda`` and skips without CUDA. Each is written for one device,
``DEVICE``: ``cuda`` when CUDA is available, or whatever ``SLIMRANK_TEST_DEVICE`` names, so
that the same tests check their own logic on a machine without a GPU::

    SLIMRANK_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py -q    # the logic, on the CPU
    python -m pytest -m cuda -q                                        # on a GPU machine

On the CPU the device-specific parts take their CPU form (gloo instead of NCCL, wall-clock
timing instead of a spinning kernel); the tolerances stated in each test are the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# cuBLAS is deterministic only with a fixed workspace; set before CUDA initialises
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from common.data.formats import write_candidates  # noqa: E402
from common.hardware import time_callable  # noqa: E402
from common.evaluation.rerank import CostOptions, evaluate_model  # noqa: E402
from common.models.loading import resolve_model_path  # noqa: E402
from common.kinds.loading import load_model, reshape_checkpoint, score_pairs  # noqa: E402
from common.pruning.cycles import PruneArgs, PruneCallback  # noqa: E402
from common.pruning.l0 import L0Args, L0Callback  # noqa: E402
from common.serving.rank import Ranker  # noqa: E402
from common.training.loop import TrainArgs, Trainer  # noqa: E402
from common.training.schedules import WarmupLinear  # noqa: E402
from conftest import ROOT, tiny_config, write_toy_triples  # noqa: E402

DEVICE_ENV = "SLIMRANK_TEST_DEVICE"
DEVICE = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason=f"no CUDA device ({DEVICE_ENV}=cpu runs these on the CPU)")]

QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"] * 2
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty",
            "the stock market fell today", "bananas are yellow", "python is a language"]


@pytest.fixture(scope="module")
def triples(tmp_path_factory) -> Path:
    return write_toy_triples(tmp_path_factory.mktemp("cuda_data") / "triples.tsv")


@pytest.fixture(scope="module")
def nodrop(tmp_path_factory) -> str:
    """A tiny BERT without dropout: the same function on every device and precision."""
    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("nodrop") / "m"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(directory)
    return str(directory)


@contextmanager
def deterministic():
    """On CUDA: deterministic kernels (embedding backward, cuBLAS) and the math attention
    kernel, whose backward has no atomics; a no-op on the CPU, which is deterministic already."""
    if not ON_CUDA:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # bit-exactness is asserted, not assumed
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def train_args(model: str, triples: Path, out: Path, pairs: int, **kw) -> TrainArgs:
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=pairs,
                model_tag=str(model), batch_size=8, max_length=32, learning_rate=1e-3, seed=3, device=DEVICE)
    base.update(kw)
    return TrainArgs(**base)


def metrics(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


# -- 02: one step under bf16 autocast against CPU fp32 -----------------------------------------
def test_bf16_step_on_the_device_agrees_with_cpu_fp32(nodrop, triples, tmp_path):
    """One optimizer step (16 pairs, LR 1e-3, no warmup) under bf16 autocast on the device
    against fp32 on the CPU, from the same weights. Tolerances: the loss within 2 % (relative);
    AdamW's first step moves each weight by about +-LR, so every weight lies within 2 LR of the
    CPU's and >= 80 % of the weights the CPU step moved move the same way (bf16 flips the
    sign of the smallest gradients: 91 % agree under CPU bf16)."""
    lr = 1e-3

    def one_step(device: str, precision: str, out: str):
        args = train_args(nodrop, triples, tmp_path / out, 16, batch_size=16, learning_rate=lr,
                          device=device, precision=precision)
        end = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 0)).train()
        return metrics(tmp_path / out, "train")[0]["loss"], load_file(str(end / "model.safetensors"))

    ref_loss, ref = one_step("cpu", "fp32", "cpu")
    loss, got = one_step(DEVICE, "bf16", "device")
    start = load_file(str(Path(nodrop) / "model.safetensors"))
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    agree = moved = 0
    for key, value in ref.items():
        name = key if key in start else None
        assert (got[key] - value).abs().max() <= 2 * lr * 1.01 + 1e-6, key
        if name is None:
            continue
        d_ref, d_got = value - start[name], got[key] - start[name]
        mask = d_ref.abs() > lr / 2
        moved += int(mask.sum())
        agree += int((torch.sign(d_ref[mask]) == torch.sign(d_got[mask])).sum())
    assert moved > 1000 and agree >= 0.8 * moved, (agree, moved)


# -- 03c: a prune event, exact resume, 04 reshape, masked == reshaped -------------------------
def mixed_trainer(model: str, triples: Path, out: Path, **kw) -> Trainer:
    stop = kw.pop("stop", None)
    callback = PruneCallback("mixed", PruneArgs(target_heads=8, target_ffn=20, num_prune_cycles=2,
                                                score_fraction=1.0))
    trainer = Trainer(train_args(model, triples, out, 48, num_checkpoint_samples=24, **kw), "mixed",
                      callback.schedule, callback)
    if stop:
        trainer.total_steps = stop
    return trainer


@pytest.fixture(scope="module")
def pruned(tiny_models, triples, tmp_path_factory) -> Path:
    """A 03c run on the device (dropout on): 48 pairs, two prune cycles; its last checkpoint."""
    with deterministic():
        return mixed_trainer(str(tiny_models["bert"]), triples, tmp_path_factory.mktemp("mixed") / "a").train()


def test_prune_event_and_exact_resume_on_the_device(pruned, tiny_models, triples, tmp_path):
    """24 pairs, stop, resume, 24 pairs == 48 pairs straight, bit for bit (the same device,
    deterministic kernels); both prune events happen, the same heads go."""
    info = json.loads((pruned / "pruning.json").read_text())
    assert len(info["history"]) == 2 and sum(map(len, info["kept_heads"])) == 8
    with deterministic():
        half = mixed_trainer(str(tiny_models["bert"]), triples, tmp_path / "b", stop=3).train()
        end = mixed_trainer(str(tiny_models["bert"]), triples, tmp_path / "b", checkpoint_dir=str(half),
                            resume=True).train()
    assert end.name == pruned.name
    a, b = load_file(str(pruned / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed = json.loads((end / "pruning.json").read_text())
    assert resumed["kept_heads"] == info["kept_heads"] and resumed["kept_ffn"] == info["kept_ffn"]
    state = json.loads((end / "trainer_state.json").read_text())
    assert state["distributed"]["device"].startswith(torch.device(DEVICE).type)


def test_reshape_of_a_device_trained_checkpoint_scores_as_masked_on_the_device(pruned, tmp_path):
    """04 on the device-trained checkpoint; the reshaped model on the device scores as the
    masked one there (absolute 1e-4; fp32 on both)."""
    out, before, after = reshape_checkpoint(str(pruned), str(tmp_path / "reshaped"))
    assert after < before
    masked, reshaped = load_model(str(pruned), DEVICE), load_model(str(out), DEVICE)
    assert reshaped.state.is_reshaped and next(reshaped.model.parameters()).device.type == torch.device(DEVICE).type
    a = score_pairs(masked.model, masked.tokenizer, QUERIES, PASSAGES, max_length=32)
    b = score_pairs(reshaped.model, reshaped.tokenizer, QUERIES, PASSAGES, max_length=32)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-4, rtol=0)


# -- 05: quality on the device == CPU, GPU latency -------------------------------------------
def candidates_and_qrels(tmp_path: Path) -> tuple[str, str]:
    rows, qrels = [], []
    for q in range(3):
        for r in range(12):
            rows.append({"qid": f"q{q}", "query": QUERIES[q], "docid": f"d{q}_{r}", "rank": r + 1,
                         "first_stage_score": float(20 - r), "passage": f"{PASSAGES[(q + r) % 6]} {r}"})
            qrels.append(f"q{q} 0 d{q}_{r} {(r * 7 + q) % 3}")
    write_candidates(pd.DataFrame(rows), tmp_path / "cand.parquet")
    (tmp_path / "qrels.txt").write_text("\n".join(qrels) + "\n")
    return str(tmp_path / "cand.parquet"), str(tmp_path / "qrels.txt")


def run_scores(path: Path) -> dict[tuple[str, str], float]:
    return {(p[0], p[2]): float(p[4]) for p in (line.split() for line in path.read_text().splitlines())}


def test_05_quality_on_the_device_equals_cpu_and_times_the_device(tiny_models, tmp_path):
    """The same candidates scored on the device and on the CPU: every score within 1e-4
    (absolute), NDCG@10 within 1e-3; the row's latency columns are the device's (gpu_* on
    CUDA), fp32 and bf16, and its machine names the GPU."""
    cand, qrels = candidates_and_qrels(tmp_path)
    model = str(tiny_models["bert"])
    cpu = evaluate_model(model, cand, qrels, "toy", max_length=32, device="cpu", kind="cross",
                         output_dir=str(tmp_path / "cpu"))[0]
    opts = CostOptions(repeats=2, warmup=1, latency_queries=2, n_pairs=12, bf16=True)
    dev = evaluate_model(model, cand, qrels, "toy", max_length=32, device=DEVICE, kind="cross",
                         output_dir=str(tmp_path / "dev"), costs=opts)[0]
    assert dev["ndcg@10"] == pytest.approx(cpu["ndcg@10"], abs=1e-3)
    a, b = run_scores(tmp_path / "cpu" / "toy.run"), run_scores(tmp_path / "dev" / "toy.run")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4
    prefix = "gpu" if ON_CUDA else "cpu"
    for column in ("ms_worst", "ms_real", "bf16_ms_worst", "bf16_ms_real"):
        assert dev[f"{prefix}_{column}"] > 0, column
    assert ("GPU:" in dev["machine"]) == ON_CUDA


def test_time_callable_covers_the_device_work():
    """time_callable times the work the device does, not the launch: on CUDA a kernel that
    spins 40M cycles (20-40 ms) returns at once, yet is timed at >= 5 ms; on the CPU a 10 ms
    sleep is timed at >= 9 ms."""
    if ON_CUDA:
        device = torch.device(DEVICE)
        cycles = 40_000_000  # ~20 ms at 2 GHz, ~40 ms at 1 GHz

        def work():
            with torch.cuda.device(device):
                torch.cuda._sleep(cycles)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        work()
        launch_ms = (time.perf_counter() - started) * 1e3
        torch.cuda.synchronize(device)
        mean, _ = time_callable(work, repeats=3, warmup=1, device=device)
        assert mean >= 5.0 and launch_ms < mean / 2, (mean, launch_ms)
    else:
        mean, _ = time_callable(lambda: time.sleep(0.01), repeats=3, warmup=0, device=DEVICE)
        assert mean >= 9.0


# -- the Ranker on the device ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cross", "bi"])
def test_ranker_torch_and_bf16_on_the_device(kind, tiny_models):
    """torch on the device == CPU fp32 within 1e-4; torch-bf16 within 2e-2 (absolute and
    relative: bf16 keeps 8 bits of mantissa)."""
    model = str(tiny_models["bert"])
    ref = Ranker.load(model, "torch", device="cpu", kind=kind, max_length=32).score(QUERIES, PASSAGES)
    fp32 = Ranker.load(model, "torch", device=DEVICE, kind=kind, max_length=32)
    assert next(fp32.loaded.model.parameters()).device.type == torch.device(DEVICE).type
    torch.testing.assert_close(torch.tensor(fp32.score(QUERIES, PASSAGES)), torch.tensor(ref), atol=1e-4, rtol=0)
    bf16 = Ranker.load(model, "torch-bf16", device=DEVICE, kind=kind, max_length=32).score(QUERIES, PASSAGES)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(ref), atol=2e-2, rtol=2e-2)


# -- torchrun ----------------------------------------------------------------------------------
def test_torchrun_one_process_runs_02_with_nccl(nodrop, triples, tmp_path):
    """`torchrun --nproc_per_node 1 02_train_initial.py --device DEVICE`: the process group
    starts (NCCL on CUDA, gloo on the CPU), the stage trains and checkpoints, and its weights
    equal an in-process run's (no dropout; absolute 1e-5)."""
    out = tmp_path / "torchrun"
    argv = ["--model_tag", nodrop, "--train_triples_file", str(triples), "--output_dir", str(out),
            "--num_training_samples", "16", "--batch_size", "8", "--max_length", "32",
            "--learning_rate", "1e-3", "--seed", "3", "--device", DEVICE]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(ROOT / "02_train_initial.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "seen_000000016" / "trainer_state.json").read_text())
    assert state["distributed"]["backend"] == ("nccl" if ON_CUDA else "gloo")
    assert state["distributed"]["world_size"] == 1
    single = Trainer(train_args(nodrop, triples, tmp_path / "single", 16, warmup_fraction=0.1), "initial",
                     lambda t: WarmupLinear(t.total_steps, round(t.total_steps * 0.1))).train()
    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(out / "seen_000000016" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


# -- L0 gates with layer-wise distillation ---------------------------------------------------
def test_l0_gates_and_layerwise_distillation_on_the_device(tiny_models, triples, tmp_path):
    """03d on the device with --distill_hidden: the gates' Lagrangian and the layer loss are
    logged every step, the final masks meet the cost target, and the reshaped model scores as
    the masked one on the device (absolute 1e-4)."""
    model = str(tiny_models["bert"])
    callback = L0Callback(L0Args(target_macs_ratio=0.5, l0_learning_rate=0.2))
    args = train_args(model, triples, tmp_path / "l0", 64, distill_from=model, distill_hidden=1.0)
    last = Trainer(args, "l0", callback.schedule, callback).train()
    train = metrics(tmp_path / "l0", "train")
    assert len(train) == 8 and all("lagrangian" in r and "hidden" in r for r in train)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["hidden"]])).all() for r in train)
    event = json.loads((last / "pruning.json").read_text())["history"][-1]["l0"]
    assert event["macs_ratio"] <= 0.5
    out, _, _ = reshape_checkpoint(str(last), str(tmp_path / "reshaped"))
    masked, reshaped = load_model(str(last), DEVICE), load_model(str(out), DEVICE)
    a = score_pairs(masked.model, masked.tokenizer, QUERIES, PASSAGES, max_length=32)
    b = score_pairs(reshaped.model, reshaped.tokenizer, QUERIES, PASSAGES, max_length=32)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-4, rtol=0)
