"""Figures of common.evaluation.plots / 06_plots.py from synthetic training logs and results."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also run as a script (see the end)

from common.evaluation import plots  # noqa: E402
from common.evaluation.results import append_results  # noqa: E402

NAMES = ("pruning_lr_schedule", "performance_vs_seen_pairs", "performance_vs_removed_flops",
         "ndcg_vs_latency")
HEADS, FFN = 144, 36864  # bert-base: 12 layers x 12 heads, 12 x 3072 neurons
MACS = 1.1e12  # per query (100 pairs)


def write_run(runs_dir: Path, stage: str, start: int, pairs: int, events: int, *,
              remove_heads: int = 0, remove_ffn: int = 0, batch: int = 32,
              checkpoint_every: int = 1024, ndcg0: float = 0.60, ndcg_drop: float = 0.0,
              eval_set: bool = True) -> Path:
    """A metrics.jsonl shaped like common.training.loop's: train lines every step, prune lines at
    every cycle start (cosine LR restarts after each), checkpoint lines with NDCG@10."""
    run = runs_dir / stage
    run.mkdir(parents=True)
    steps = pairs // batch
    cycles = events + 1
    cycle = steps // cycles if events else steps
    heads, ffn = HEADS, FFN
    lines = []
    for step in range(1, steps + 1):
        seen, stage_pairs = start + step * batch, step * batch
        pos = ((step - 1) % cycle) / cycle
        lr = 7e-6 * 0.5 * (1 + math.cos(math.pi * pos)) if events else 3e-5 * (1 - step / steps)
        base = {"stage": stage, "seen_pairs": seen, "stage_pairs": stage_pairs}
        lines.append({"event": "train", **base, "heads": heads, "ffn": ffn,
                      "loss": 0.7 - 0.3 * step / steps, "lr": lr})
        if events and step % cycle == 0 and step // cycle <= events:
            dh, df = remove_heads // events, remove_ffn // events
            heads, ffn = heads - dh, ffn - df
            lines.append({"event": "prune", **base, "heads": heads, "ffn": ffn, "lr": 7e-6,
                          "removed_heads": dh, "removed_ffn": df})
        if stage_pairs % checkpoint_every == 0 or step == steps:
            record = {"event": "checkpoint", **base, "heads": heads, "ffn": ffn,
                      "path": str(run / f"seen_{seen:09d}"), "seconds": 1.0}
            if eval_set:
                frac = stage_pairs / pairs
                record.update({"ndcg@10": ndcg0 + 0.05 * frac - ndcg_drop * frac,
                               "map@100": 0.4 + 0.02 * frac})
            lines.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def synthetic_runs(runs_dir: Path) -> None:
    write_run(runs_dir, "initial", 0, 6144, 0, ndcg0=0.55, checkpoint_every=2048)
    write_run(runs_dir, "heads", 6144, 4096, 10, remove_heads=40, ndcg0=0.60, ndcg_drop=0.04)
    write_run(runs_dir, "ffn", 6144, 4096, 8, remove_ffn=16384, ndcg0=0.60, ndcg_drop=0.03)
    write_run(runs_dir, "mixed", 6144, 4096, 8, remove_heads=48, remove_ffn=12288, ndcg0=0.60,
              ndcg_drop=0.06, eval_set=False)


def synthetic_results(path: Path, costs: bool = True) -> None:
    rows = []
    for topics, shift in (("dl20", 0.0), ("dl21", -0.05)):
        rows.append({"checkpoint": "bm25:data/x.parquet", "topics": topics, "run": "bm25",
                     "method": "bm25", "ndcg@10": 0.48 + shift, "map@100": 0.28 + shift})
        runs = [("initial", 0, 0, 6144, 3), ("heads", 40, 0, 10240, 3),
                ("ffn", 0, 16384, 10240, 3), ("mixed", 48, 12288, 10240, 3)]
        for method, dh, df, end, n in runs:
            start = 0 if method == "initial" else 6144
            for k in range(1, n + 1):
                seen = start + (end - start) * k // n
                heads, ffn = HEADS - dh * k // n, FFN - df * k // n
                share = (heads / HEADS) * 0.35 + (ffn / FFN) * 0.65
                row = {"checkpoint": f"runs/{method}/seen_{seen:09d}", "topics": topics,
                       "run": method, "method": method, "seen_pairs": seen, "heads": heads,
                       "ffn": ffn, "ndcg@10": 0.66 + shift + 0.01 * k - 0.1 * (1 - share),
                       "map@100": 0.45 + shift, "num_queries": 54}
                if costs:
                    row.update({"flops_macs": int(MACS * share), "cpu_ms_real": 400 * share + 20,
                                "cpu_ms_real_std": 12.0, "cpu_ms_worst": 900 * share,
                                "params": int(110e6 * share)})
                rows.append(row)
                if costs and method != "initial" and k == n:  # the reshaped final checkpoint
                    rows.append({**row, "checkpoint": row["checkpoint"] + "/reshaped",
                                 "run": Path(row["checkpoint"]).name,
                                 "method": method + "+reshape",
                                 "cpu_ms_real": row["cpu_ms_real"] * 0.9})
    append_results(path, rows)


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    runs_dir = tmp_path / "runs"
    synthetic_runs(runs_dir)
    results = runs_dir / "results.parquet"
    synthetic_results(results)
    return runs_dir, results


def test_all_figures_written(synthetic, tmp_path):
    runs_dir, results = synthetic
    out = tmp_path / "figures"
    written = plots.make_all(runs_dir, results, out, ["png", "svg"])
    expected = {out / f"{name}.{fmt}" for name in NAMES for fmt in ("png", "svg")}
    assert set(written) == expected
    for path in expected:
        assert path.stat().st_size > 10_000, path
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # again: replaced in place, still no leftovers
    assert set(plots.make_all(runs_dir, results, out, ["png"])) == {out / f"{n}.png" for n in NAMES}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected)


def test_script_prints_paths(synthetic, tmp_path, capsys):
    runs_dir, results = synthetic
    spec = importlib.util.spec_from_file_location("plots_script", ROOT / "06_plots.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "fig"
    script.main(["--runs_dir", str(runs_dir), "--results", str(results), "--out_dir", str(out),
                 "--formats", "png"])
    printed = capsys.readouterr().out.split()
    for name in NAMES:
        assert str(out / f"{name}.png") in printed


def test_pareto_frontier():
    points = [(10, 0.50), (5, 0.40), (7, 0.40), (20, 0.70), (15, 0.45), (12, 0.60),
              (20, 0.65), (25, 0.70), (2, float("nan")), (3, 0.30)]
    assert plots.pareto_frontier(points) == [(3, 0.30), (5, 0.40), (10, 0.50), (12, 0.60),
                                             (20, 0.70)]
    assert plots.pareto_indices([1.0, 1.0], [0.5, 0.5]) == [0]  # identical points: one kept
    assert plots.pareto_frontier([]) == []


def test_reference_flops(tmp_path):
    path = tmp_path / "r.parquet"
    append_results(path, [
        {"checkpoint": "a", "topics": "dl20", "method": "heads", "flops_macs": 50.0},
        {"checkpoint": "b", "topics": "dl20", "method": "initial", "flops_macs": 100.0},
        {"checkpoint": "teacher", "topics": "dl20", "method": "base", "flops_macs": 300.0},
        {"checkpoint": "bm25", "topics": "dl20", "method": "bm25"}])
    results = plots.load_results(path)
    assert plots.reference_flops(results) == 100.0  # the initial model, not a larger teacher
    assert plots.reference_flops(results[results["method"] != "initial"]) == 300.0
    assert plots.reference_flops(results[results["method"] == "bm25"]) is None


def test_missing_data_writes_nothing(tmp_path, capsys):
    out = tmp_path / "figures"
    assert plots.make_all(tmp_path / "no_runs", tmp_path / "no.parquet", out) == []
    assert not out.exists() or not list(out.iterdir())
    assert "skipping" in capsys.readouterr().out


def test_partial_data(tmp_path):
    """Runs without eval, results without costs: only what the data supports is drawn."""
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "heads", 0, 2048, 4, remove_heads=8, eval_set=False)
    (runs_dir / "heads" / "metrics.jsonl").open("a").write('{"event": "train", "se')  # cut off
    (runs_dir / "empty").mkdir()
    results = tmp_path / "results.parquet"
    synthetic_results(results, costs=False)
    out = tmp_path / "figures"
    written = plots.make_all(runs_dir, results, out, ["png"])
    assert sorted(p.name for p in written) == ["performance_vs_seen_pairs.png",
                                               "pruning_lr_schedule.png"]
    # only bm25 rows: no model to plot anywhere
    only_bm25 = tmp_path / "bm25.parquet"
    append_results(only_bm25, [{"checkpoint": "bm25", "topics": "dl20", "method": "bm25",
                                "ndcg@10": 0.48}])
    assert plots.make_all(tmp_path / "none", only_bm25, tmp_path / "f2", ["png"]) == []


def test_lr_schedule_falls_back_to_any_run(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "initial", 0, 2048, 0)
    written = plots.plot_lr_schedule(plots.load_runs(runs_dir), tmp_path / "f", ["png"])
    assert [p.name for p in written] == ["pruning_lr_schedule.png"]
    assert written[0].stat().st_size > 10_000


if __name__ == "__main__":  # render the synthetic figures somewhere to look at them
    import shutil

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/plots_check")
    shutil.rmtree(target / "runs", ignore_errors=True)
    synthetic_runs(target / "runs")
    synthetic_results(target / "runs" / "results.parquet")
    for p in plots.make_all(target / "runs", target / "runs" / "results.parquet", target):
        print(p)


def test_matched_cost_figure(tmp_path):
    """One marker per arm at its compute ratio and relative quality; skipped with one arm."""
    import pandas as pd

    rows = [dict(checkpoint="all-MiniLM-L6-v2", run="all-MiniLM-L6-v2", method="base", flops_macs=150e9)]
    for arm, flops in (("bi_l0_3x", 50e9), ("bi_activation_3x", 50e9), ("bi_first_n_3x", 50e9)):
        rows.append(dict(checkpoint=f"runs/matched/{arm}/prune/seen_000012288/reshaped", run=f"{arm}/prune",
                         method="mixed+reshape", flops_macs=flops))
        rows.append(dict(checkpoint=f"runs/matched/{arm}/recover/seen_000024576", run=f"{arm}/recover",
                         method="recover+reshape", flops_macs=flops))
    frame = pd.DataFrame([{**r, "topics": t, "ndcg@10": 0.6 - 0.01 * i} for t in ("dl20", "dl21")
                          for i, r in enumerate(rows)])
    assert plots.arm_of(frame.iloc[2]) == "bi_l0_3x"
    assert plots.arm_of(pd.Series({"run": "/x/runs/matched/bi_first_n_3x/dropped",
                                   "checkpoint": "/x/runs/matched/bi_first_n_3x/dropped"})) == "bi_first_n_3x"
    written = plots.plot_matched_cost(frame, tmp_path, ["png"])
    assert written == [tmp_path / "matched_cost.png"] and written[0].stat().st_size > 10_000
    one_arm = frame[~frame["checkpoint"].str.contains("activation|first_n")]
    assert plots.plot_matched_cost(one_arm, tmp_path / "none", ["png"]) == []
    # a cross-encoder study: its unpruned model is the main job's initial model
    cross = frame.replace({"method": {"base": "initial"}, "checkpoint": {"all-MiniLM-L6-v2": "runs/main/initial/seen_000002048"}})
    written = plots.plot_matched_cost(cross, tmp_path / "cross", ["png"])
    assert written == [tmp_path / "cross" / "matched_cost.png"] and written[0].stat().st_size > 10_000
