"""Figures from the training logs (``runs/<run>/metrics.jsonl``) and the results store.

Four figures, each written as ``<out_dir>/<name>.<fmt>`` for every requested format:

* ``pruning_lr_schedule`` -- learning rate against seen pairs of every pruning run (stage
  ``heads``/``ffn``/``mixed``; any run when there is none), prune events as dotted lines;
  one panel per run.
* ``performance_vs_seen_pairs`` -- NDCG@10 against seen pairs, one line per run; one panel per
  topic set of the results (rows of ``05_eval_trec.py``; reshaped models are left out, they
  score as their masked checkpoint), plus one panel for the in-training eval set when the
  ``checkpoint`` lines of ``metrics.jsonl`` carry ``ndcg@10``. BM25 as a dashed line.
* ``performance_vs_removed_flops`` -- NDCG@10 against the share of multiply-adds removed
  relative to the unpruned model (:func:`reference_flops`), one marker style per method.
* ``ndcg_vs_latency`` -- NDCG@10 against CPU ms per query (real input lengths, std error bars)
  of every evaluated model; the unpruned model and BM25 marked, the Pareto frontier (lowest
  latency for a given quality, :func:`pareto_frontier`) drawn as a step line.

Every ``plot_*`` function returns the paths it wrote and writes nothing (printing a note) when
its data is absent. Files are saved under a temporary name and ``os.replace``-d, so a reader
never sees a half-written figure. Only ``matplotlib.figure.Figure`` is used (no pyplot, no
global state): PNGs go through the Agg canvas, SVGs through the SVG one.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from common.io import atomic_output
from common.evaluation.results import load_results
from common.layout import METRICS_FILE, PRUNING_STAGES, STAGE_ORDER, STATE_FILE

METRIC = "ndcg@10"
METRIC_LABEL = "NDCG@10"
FORMATS = ("png", "svg")
DPI = 150

# One colour per stage (a method's colour is its stage's); runs beyond these take the rest.
STAGE_COLORS = {"initial": "#444444", "heads": "tab:blue", "ffn": "tab:orange",
                "mixed": "tab:green", "l0": "tab:olive", "recover": "tab:cyan", "bm25": "tab:red", "base": "tab:purple"}
_SPARE_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:purple", "tab:gray")
STAGE_MARKERS = {"initial": "o", "heads": "s", "ffn": "^", "mixed": "D", "l0": "*", "base": "P",
                 "reshaped": "v"}
_SPARE_MARKERS = ("X", "p", "h", "<", ">", "8", "*")
RESHAPE_SUFFIX = "+reshape"


def _note(message: str) -> None:
    print(f"plots: {message}")


# --------------------------------------------------------------------------- inputs


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """The lines of one ``metrics.jsonl`` as a frame (unparseable lines, e.g. a line cut off
    while being written, are skipped). Columns: whatever the lines carry."""
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
    if bad:
        _note(f"{path}: skipped {bad} unparseable line(s)")
    frame = pd.DataFrame.from_records(records)
    for column in ("event", "stage"):
        if column not in frame:
            frame[column] = pd.Series(dtype="object")
    return frame


def load_runs(runs_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """``{run name: metrics frame}`` for every subdirectory of ``runs_dir`` holding a
    ``metrics.jsonl`` (sorted by name; empty when the directory is absent)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return {}
    runs = {}
    for path in sorted(runs_dir.glob(f"*/{METRICS_FILE}")):
        frame = read_metrics(path)
        if len(frame):
            runs[path.parent.name] = frame
    return runs


def run_stage(frame: pd.DataFrame) -> str:
    """The stage a run trained (its most frequent ``stage``; ``"?"`` if none is logged)."""
    stages = frame["stage"].dropna() if "stage" in frame else pd.Series(dtype="object")
    return str(stages.mode().iloc[0]) if len(stages) else "?"


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def _by_stage(runs: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Runs ordered initial, heads, ffn, mixed, then the others (by name within a stage)."""
    return dict(sorted(runs.items(), key=lambda kv: (_stage_rank(run_stage(kv[1])), kv[0])))


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """``frame[column]`` as float64 (missing column or values: NaN)."""
    if column not in frame:
        return pd.Series(np.nan, index=frame.index, dtype="float64")
    return pd.to_numeric(frame[column], errors="coerce").astype("float64")


def _events(frame: pd.DataFrame, event: str) -> pd.DataFrame:
    return frame[frame["event"] == event]


def base_method(method: object) -> str:
    """``"mixed+reshape"`` -> ``"mixed"``."""
    method = str(method)
    return method[:-len(RESHAPE_SUFFIX)] if method.endswith(RESHAPE_SUFFIX) else method


def _is_bm25(methods: pd.Series) -> pd.Series:
    return methods.astype(str).str.lower() == "bm25"


def _methods(results: pd.DataFrame) -> pd.Series:
    if "method" not in results:
        return pd.Series("?", index=results.index, dtype="object")
    return results["method"].astype("object").where(results["method"].notna(), "?").astype(str)


def _topics(results: pd.DataFrame) -> list[str]:
    """Topic sets with at least one metric value, in first-appearance order."""
    if not len(results) or METRIC not in results or "topics" not in results:
        return []
    valued = results[_numeric(results, METRIC).notna()]
    return list(dict.fromkeys(valued["topics"].astype(str)))


def _topic_title(topics: str) -> str:
    return topics.upper() if len(topics) <= 8 else topics


# --------------------------------------------------------------------------- helpers


def pareto_indices(costs: Sequence[float], qualities: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (cost <= and quality >=, one strictly),
    ordered by increasing cost (hence increasing quality). Points with a NaN are ignored; of
    identical points only the first is kept."""
    order = sorted((i for i, (c, q) in enumerate(zip(costs, qualities))
                    if not (math.isnan(float(c)) or math.isnan(float(q)))),
                   key=lambda i: (float(costs[i]), -float(qualities[i]), i))
    frontier, best = [], -math.inf
    for i in order:
        if float(qualities[i]) > best:
            frontier.append(i)
            best = float(qualities[i])
    return frontier


def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, quality) points on the Pareto frontier (lower cost, higher quality),
    by increasing cost."""
    points = list(points)
    return [points[i] for i in pareto_indices([c for c, _ in points], [q for _, q in points])]


def reference_flops(results: pd.DataFrame) -> float | None:
    """Multiply-adds of the unpruned model: the most ``flops_macs`` among the ``initial``
    rows, or among all non-BM25 rows when no initial row has a value; None if none has."""
    if not len(results):
        return None
    flops = _numeric(results, "flops_macs")
    methods = _methods(results)
    for mask in (methods == "initial", ~_is_bm25(methods)):
        values = flops[mask].dropna()
        if len(values):
            return float(values.max())
    return None


def _reference_row(rows: pd.DataFrame) -> pd.Series | None:
    """The unpruned model among ``rows`` (one topic set): the ``initial`` row with the most
    FLOPs (then the most seen pairs), else the non-BM25 row with the most FLOPs."""
    methods = _methods(rows)
    flops, seen = _numeric(rows, "flops_macs"), _numeric(rows, "seen_pairs")
    for mask in (methods == "initial", ~_is_bm25(methods)):
        candidates = rows[mask & flops.notna()]
        if len(candidates):
            key = pd.DataFrame({"f": flops[candidates.index], "s": seen[candidates.index].fillna(-1)})
            return rows.loc[key.sort_values(["f", "s"]).index[-1]]
    return None


def _thousands(value: float, _pos=None) -> str:
    return f"{value / 1000:,.4g}k" if value else "0"


def _pairs_axis(ax) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("seen training pairs (k = thousands)")


def _grid(ax) -> None:
    ax.grid(True, which="major", alpha=0.35)
    ax.set_axisbelow(True)


def _panels(n: int, max_cols: int = 2, width: float = 6.4, height: float = 4.4,
            sharey: bool = False) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


class _Palette:
    """A colour per key: its stage's colour the first time a stage is seen, spare ones after."""

    def __init__(self) -> None:
        self.assigned: dict[str, str] = {}
        self.spare = list(_SPARE_COLORS)

    def color(self, key: str, stage: str) -> str:
        if key not in self.assigned:
            preferred = STAGE_COLORS.get(stage)
            if preferred and preferred not in self.assigned.values():
                self.assigned[key] = preferred
            else:
                free = [c for c in self.spare if c not in self.assigned.values()]
                self.assigned[key] = free[0] if free else f"C{len(self.assigned) % 10}"
        return self.assigned[key]


def method_style(method: str) -> dict:
    """Matplotlib marker keywords of a method: marker shape and colour from its stage, hollow
    for reshaped models (``"<stage>+reshape"``)."""
    stage = base_method(method)
    marker = STAGE_MARKERS.get(stage)
    if marker is None:
        marker = _SPARE_MARKERS[sum(map(ord, stage)) % len(_SPARE_MARKERS)]
    color = STAGE_COLORS.get(stage, _SPARE_COLORS[sum(map(ord, stage)) % len(_SPARE_COLORS)])
    hollow = method.endswith(RESHAPE_SUFFIX)
    return {"marker": marker, "markeredgecolor": color, "color": color,
            "markerfacecolor": "white" if hollow else color,
            "markeredgewidth": 1.6 if hollow else 0.8, "markersize": 7, "linestyle": "none"}


def _method_order(methods: Iterable[str]) -> list[str]:
    rank = {m: i for i, m in enumerate(STAGE_ORDER + ("reshaped", "base"))}
    return sorted(set(methods), key=lambda m: (rank.get(base_method(m), 99), base_method(m),
                                               m.endswith(RESHAPE_SUFFIX), m))


def _bm25_value(rows: pd.DataFrame, column: str = METRIC) -> float | None:
    values = _numeric(rows[_is_bm25(_methods(rows))], column).dropna()
    return float(values.iloc[-1]) if len(values) else None


def _bm25_line(ax, rows: pd.DataFrame) -> bool:
    value = _bm25_value(rows)
    if value is None:
        return False
    ax.axhline(value, color=STAGE_COLORS["bm25"], linestyle="--", linewidth=1.4,
               label=f"BM25 ({value:.3f})")
    return True


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str,
                formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` per format, each atomically (temp file in the
    same directory, then ``os.replace``). Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in dict.fromkeys(f.lower().lstrip(".") for f in formats):
        final = out_dir / f"{name}.{fmt}"
        with atomic_output(final) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        written.append(final)
    return written


# --------------------------------------------------------------------------- figure 1


def plot_lr_schedule(runs: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike,
                     formats: Iterable[str] = FORMATS,
                     name: str = "pruning_lr_schedule") -> list[Path]:
    """LR over seen pairs of every pruning run (any run when none prunes), prune events as
    dotted vertical lines; one panel per run."""
    with_lr = {run: frame for run, frame in _by_stage(runs).items()
               if _numeric(_events(frame, "train"), "lr").notna().any()}
    chosen = {run: f for run, f in with_lr.items() if run_stage(f) in PRUNING_STAGES} or with_lr
    if not chosen:
        _note(f"skipping {name}: no run logged a learning rate (train lines of {METRICS_FILE})")
        return []
    fig, axes = _panels(len(chosen), max_cols=1, width=10, height=3.3)
    palette = _Palette()
    for ax, (run, frame) in zip(axes, chosen.items()):
        stage = run_stage(frame)
        train = _events(frame, "train")
        x, lr = _numeric(train, "seen_pairs"), _numeric(train, "lr")
        keep = x.notna() & lr.notna()
        order = np.argsort(x[keep].to_numpy(), kind="stable")
        color = palette.color(run, stage)
        ax.plot(x[keep].to_numpy()[order], lr[keep].to_numpy()[order], color=color,
                linewidth=1.4, label="learning rate")
        prunes = _events(frame, "prune")
        px = _numeric(prunes, "seen_pairs").dropna()
        for i, value in enumerate(px):
            ax.axvline(value, color="black", linestyle=":", linewidth=1.2,
                       label=f"prune event ({len(px)})" if i == 0 else None)
        heads, ffn = _numeric(frame, "heads").dropna(), _numeric(frame, "ffn").dropna()
        kept = []
        if len(heads) and heads.iloc[0] != heads.iloc[-1]:
            kept.append(f"heads {heads.iloc[0]:.0f}→{heads.iloc[-1]:.0f}")
        if len(ffn) and ffn.iloc[0] != ffn.iloc[-1]:
            kept.append(f"FFN neurons {ffn.iloc[0]:,.0f}→{ffn.iloc[-1]:,.0f}")
        title = f"run '{run}' (stage {stage}): {len(px)} prune events"
        ax.set_title(title + (f"; {', '.join(kept)}" if kept else ""), fontsize=11)
        _pairs_axis(ax)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_ylim(0, float(lr[keep].max()) * 1.3 or None)  # headroom for the legend
        _grid(ax)
        ax.legend(loc="upper right", ncol=2, fontsize=9, framealpha=0.95)
    fig.suptitle("Cyclic learning rate while pruning (LR restarts after every prune event)",
                 fontsize=13)
    try:
        return save_figure(fig, out_dir, name, formats)
    finally:
        fig.clear()


# --------------------------------------------------------------------------- figure 2


def _eval_set_name(frame: pd.DataFrame) -> str | None:
    """The eval candidates file a run evaluated on, from a checkpoint's trainer_state.json."""
    for path in _events(frame, "checkpoint").get("path", pd.Series(dtype="object")).dropna():
        state = Path(str(path), STATE_FILE)
        try:
            name = json.loads(state.read_text()).get("args", {}).get("eval_candidates_file")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return Path(name).name
    return None


def plot_performance_vs_seen_pairs(runs: Mapping[str, pd.DataFrame], results: pd.DataFrame,
                                   out_dir: str | os.PathLike, formats: Iterable[str] = FORMATS,
                                   name: str = "performance_vs_seen_pairs") -> list[Path]:
    """NDCG@10 against seen pairs, one line per run; a panel per topic set of the results and
    one for the in-training eval (``checkpoint`` lines of metrics.jsonl)."""
    results = results if results is not None else pd.DataFrame()
    panels: list[tuple[str, list[tuple[str, str, pd.DataFrame]], pd.DataFrame | None]] = []
    if len(results) and "seen_pairs" in results:
        methods = _methods(results)
        usable = results[~_is_bm25(methods) & ~methods.str.endswith(RESHAPE_SUFFIX)
                         & _numeric(results, METRIC).notna() & _numeric(results, "seen_pairs").notna()]
        runs_col = (usable["run"].astype("object").where(usable["run"].notna(), "?").astype(str)
                    if "run" in usable else _methods(usable))
        for topics in _topics(results):
            in_topics = usable[usable["topics"].astype(str) == topics]
            lines = []
            for run in dict.fromkeys(runs_col[in_topics.index]):
                rows = in_topics[runs_col[in_topics.index] == run]
                stage = base_method(_methods(rows).mode().iloc[0])
                lines.append((run, stage, pd.DataFrame({"x": _numeric(rows, "seen_pairs"),
                                                        "y": _numeric(rows, METRIC)})))
            lines.sort(key=lambda line: (_stage_rank(line[1]), line[0]))
            if lines:
                topic_rows = results[results["topics"].astype(str) == topics]
                panels.append((f"{_topic_title(topics)} (evaluated checkpoints)", lines, topic_rows))
    in_training, eval_sets = [], []
    for run, frame in _by_stage(runs).items():
        ckpt = _events(frame, "checkpoint")
        data = pd.DataFrame({"x": _numeric(ckpt, "seen_pairs"), "y": _numeric(ckpt, METRIC)})
        if data.dropna().empty:
            continue
        in_training.append((run, run_stage(frame), data))
        eval_sets.append(_eval_set_name(frame))
    if in_training:
        sets = sorted({s for s in eval_sets if s})
        panels.append(("In-training eval set" + (f" ({', '.join(sets)})" if sets else "")
                       + f" ({METRICS_FILE})", in_training, None))
    if not panels:
        _note(f"skipping {name}: no {METRIC} for checkpoints (results rows with seen_pairs, "
              f"or checkpoint lines of {METRICS_FILE})")
        return []
    fig, axes = _panels(len(panels))
    palette = _Palette()
    for ax, (title, lines, topic_rows) in zip(axes, panels):
        for run, stage, data in lines:
            data = data.dropna().sort_values("x", kind="stable")
            label = run if run == stage else f"{run} ({stage})"
            ax.plot(data["x"], data["y"], marker=STAGE_MARKERS.get(stage, "o"), markersize=5,
                    linewidth=1.6, color=palette.color(run, stage), label=label)
        if topic_rows is not None:
            _bm25_line(ax, topic_rows)
        ax.set_title(title, fontsize=11)
        _pairs_axis(ax)
        ax.set_ylabel(METRIC_LABEL)
        _grid(ax)
        ax.legend(fontsize=9, loc="best", framealpha=0.9)
    fig.suptitle(f"{METRIC_LABEL} during training and pruning", fontsize=13)
    try:
        return save_figure(fig, out_dir, name, formats)
    finally:
        fig.clear()


# --------------------------------------------------------------------------- figure 3


def plot_performance_vs_removed_flops(results: pd.DataFrame, out_dir: str | os.PathLike,
                                      formats: Iterable[str] = FORMATS,
                                      name: str = "performance_vs_removed_flops") -> list[Path]:
    """NDCG@10 against the share of multiply-adds removed relative to the unpruned model
    (:func:`reference_flops`); a panel per topic set, a marker style per method."""
    reference = reference_flops(results) if results is not None else None
    if not reference:
        _note(f"skipping {name}: no model with flops_macs in the results")
        return []
    methods = _methods(results)
    usable = results[~_is_bm25(methods) & _numeric(results, "flops_macs").notna()
                     & _numeric(results, METRIC).notna()]
    topics_list = [t for t in _topics(results) if (usable["topics"].astype(str) == t).any()]
    if not topics_list:
        _note(f"skipping {name}: no row has both flops_macs and {METRIC}")
        return []
    fig, axes = _panels(len(topics_list))
    for ax, topics in zip(axes, topics_list):
        rows = usable[usable["topics"].astype(str) == topics]
        removed = 1.0 - _numeric(rows, "flops_macs") / reference
        row_methods = _methods(rows)
        for method in _method_order(row_methods):
            mask = row_methods == method
            ax.plot(removed[mask], _numeric(rows, METRIC)[mask], label=method, alpha=0.9,
                    **method_style(method))
        _bm25_line(ax, results[results["topics"].astype(str) == topics])
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        low = min(0.0, float(removed.min()))
        ax.set_xlim(low - 0.03, max(float(removed.max()), 0.1) + 0.05)
        gmacs = reference / 1e9
        shown = f"{gmacs:,.0f}" if gmacs >= 100 else f"{gmacs:.3g}"
        ax.set_xlabel(f"multiply-adds removed (% of the unpruned model's {shown} GMACs per query)")
        ax.set_ylabel(METRIC_LABEL)
        ax.set_title(_topic_title(topics), fontsize=11)
        _grid(ax)
        ax.legend(fontsize=9, loc="best", framealpha=0.9, title="method", title_fontsize=9)
    fig.suptitle(f"{METRIC_LABEL} vs. compute removed by pruning\n"
                 "(hollow markers: reshaped models)", fontsize=12)
    try:
        return save_figure(fig, out_dir, name, formats)
    finally:
        fig.clear()


# --------------------------------------------------------------------------- figure 4


def _point_label(row: pd.Series) -> str:
    """``"mixed+reshape: 96 heads, 24.6k FFN"``."""
    parts = []
    heads, ffn = (pd.to_numeric(row.get(c), errors="coerce") for c in ("heads", "ffn"))
    if not pd.isna(heads):
        parts.append(f"{int(heads)} heads")
    if not pd.isna(ffn):
        parts.append(f"{ffn / 1000:.1f}k FFN")
    return f"{row.get('method', '?')}" + (f": {', '.join(parts)}" if parts else "")


def plot_ndcg_vs_latency(results: pd.DataFrame, out_dir: str | os.PathLike,
                         formats: Iterable[str] = FORMATS, name: str = "ndcg_vs_latency",
                         latency: str = "cpu_ms_real") -> list[Path]:
    """NDCG@10 against CPU ms per query (real lengths; std as error bars) of every evaluated
    model, the unpruned model and BM25 marked, the Pareto frontier as a step line; a panel per
    topic set."""
    if results is None or not len(results) or not _numeric(results, latency).notna().any():
        _note(f"skipping {name}: no {latency} in the results")
        return []
    timed = results[_numeric(results, latency).notna() & _numeric(results, METRIC).notna()]
    topics_list = [t for t in _topics(results) if (timed["topics"].astype(str) == t).any()]
    if not topics_list:
        _note(f"skipping {name}: no row has both {latency} and {METRIC}")
        return []
    fig, axes = _panels(len(topics_list), width=7.2, height=5.0)
    for ax, topics in zip(axes, topics_list):
        rows = timed[timed["topics"].astype(str) == topics]
        x, y = _numeric(rows, latency), _numeric(rows, METRIC)
        err = _numeric(rows, f"{latency}_std").fillna(0.0)
        row_methods = _methods(rows)
        models = ~_is_bm25(row_methods)
        for method in _method_order(row_methods[models]):
            mask = row_methods == method
            style = method_style(method)
            ax.errorbar(x[mask], y[mask], xerr=err[mask], label=method, alpha=0.9,
                        ecolor=style["color"], elinewidth=1, capsize=2.5, **style)
        # Pareto frontier over everything with a latency (BM25 included)
        idx = pareto_indices(x.to_numpy(), y.to_numpy())
        ax.plot(x.to_numpy()[idx], y.to_numpy()[idx], drawstyle="steps-post", color="black",
                linewidth=1.2, linestyle="--", alpha=0.75, zorder=1, label="Pareto frontier")
        for i in idx:  # up-left of a frontier point is empty: no point dominates it
            if not models.iloc[i]:
                continue  # BM25 has its own legend entry
            ax.annotate(_point_label(rows.iloc[i]), (x.iloc[i], y.iloc[i]), xytext=(-4, 5),
                        textcoords="offset points", ha="right", va="bottom", fontsize=7.5,
                        color="#222222")
        right = float((x + err).max()) * 1.04
        ref = _reference_row(rows)
        if ref is not None and not pd.isna(pd.to_numeric(ref.get(latency), errors="coerce")):
            ax.plot([float(ref[latency])], [float(ref[METRIC])], marker="o", markersize=16,
                    markerfacecolor="none", markeredgecolor="crimson", markeredgewidth=1.8,
                    linestyle="none", label="unpruned model")
        topic_rows = results[results["topics"].astype(str) == topics]
        bm25 = rows[~models]
        if len(bm25):
            ax.errorbar(x[~models], y[~models], xerr=err[~models], marker="*", markersize=13,
                        color=STAGE_COLORS["bm25"], linestyle="none", capsize=2.5, label="BM25")
        else:
            _bm25_line(ax, topic_rows)
        ax.set_xlim(left=0, right=right)
        ax.set_xlabel("CPU latency per query (ms, real input lengths; bars: ±1 std)")
        ax.set_ylabel(METRIC_LABEL)
        ax.set_title(_topic_title(topics), fontsize=11)
        _grid(ax)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    fig.suptitle(f"Quality/latency trade-off: {METRIC_LABEL} vs. CPU time per query",
                 fontsize=13)
    try:
        return save_figure(fig, out_dir, name, formats)
    finally:
        fig.clear()


# --------------------------------------------------------------------------- all


def make_all(runs_dir: str | os.PathLike = "runs",
             results_path: str | os.PathLike = "runs/results.parquet",
             out_dir: str | os.PathLike = "figures",
             formats: Iterable[str] = FORMATS) -> list[Path]:
    """Every figure from ``runs_dir/*/metrics.jsonl`` and the results parquet; returns the
    paths written (figures without data are skipped with a note)."""
    formats = list(formats)
    runs = load_runs(runs_dir)
    if not runs:
        _note(f"no {METRICS_FILE} under {runs_dir}/*/")
    results = load_results(results_path)
    if not len(results):
        _note(f"no results rows in {results_path}")
    written = []
    written += plot_lr_schedule(runs, out_dir, formats)
    written += plot_performance_vs_seen_pairs(runs, results, out_dir, formats)
    written += plot_performance_vs_removed_flops(results, out_dir, formats)
    written += plot_ndcg_vs_latency(results, out_dir, formats)
    written += plot_matched_cost(results, out_dir, formats)
    return written


def arm_of(row: pd.Series) -> str:
    """The study arm a row belongs to: the job of ``<job>/<run>`` names, else the directory
    holding a model dir without checkpoints (``runs/matched/<arm>/dropped``)."""
    run = str(row.get("run", ""))
    if "/" in run and not run.startswith(("/", ".")) and run.count("/") == 1:
        return run.split("/")[0]
    return Path(str(row.get("checkpoint", run)).split("@")[0]).parent.name or run


def plot_matched_cost(results: pd.DataFrame, out_dir: str | os.PathLike,
                      formats: Iterable[str] = FORMATS, name: str = "matched_cost") -> list[Path]:
    """The matched-cost study: NDCG@10 as a share of the unpruned model's against how many times
    fewer multiply-adds, one marker per arm (filled: after recovery; hollow: before), a panel per
    topic set. The unpruned model is the ``base`` row (the packaged encoder of a bi-encoder
    study), else the ``initial`` row (the fine-tuned cross-encoder a cross study prunes). Drawn
    when the results hold recovered models of at least two arms."""
    if results is None or not len(results) or "flops_macs" not in results:
        _note(f"skipping {name}: no flops_macs in the results")
        return []
    methods = _methods(results)
    unpruned = "base" if (methods == "base").any() else "initial"
    base = results[methods == unpruned]
    usable = results[~_is_bm25(methods) & (methods != unpruned) & _numeric(results, METRIC).notna()].copy()
    if not len(base) or not len(usable):
        _note(f"skipping {name}: needs a base (unpruned) row and pruned rows")
        return []
    usable["arm"] = usable.apply(arm_of, axis=1)
    recovered_rows = methods[usable.index].map(base_method) == "recover"
    if usable.loc[recovered_rows, "arm"].nunique() < 2:
        _note(f"skipping {name}: fewer than two recovered arms")
        return []
    flops = dict(zip(results["checkpoint"].astype(str).str.split("@").str[0], _numeric(results, "flops_macs")))
    topics_list = [t for t in _topics(usable) if (base["topics"].astype(str) == t).any()]
    fig, axes = _panels(len(topics_list))
    arms = sorted(usable["arm"].unique())
    colors = dict(zip(arms, _SPARE_COLORS * 3))
    markers = dict(zip(arms, _SPARE_MARKERS * 3))
    for ax, topics in zip(axes, topics_list):
        ref = base[base["topics"].astype(str) == topics]
        ref_ndcg = float(_numeric(ref, METRIC).iloc[-1])
        ref_flops = max(flops.get(str(c).split("@")[0], float("nan")) for c in ref["checkpoint"])
        rows = usable[usable["topics"].astype(str) == topics]
        ratios = [1.0]
        for arm in arms:
            for recovered in (False, True):
                sel = rows[(rows["arm"] == arm) & ((_methods(rows).map(base_method) == "recover") == recovered)]
                if not len(sel):
                    continue
                x = [ref_flops / flops.get(str(c).split("@")[0], float("nan")) for c in sel["checkpoint"]]
                y = _numeric(sel, METRIC) / ref_ndcg
                ratios += [r for r in x if np.isfinite(r)]
                ax.plot(x, y, linestyle="none", marker=markers[arm], markersize=9, color=colors[arm],
                        markerfacecolor=colors[arm] if recovered else "none",
                        label=arm if recovered else None)
        ax.axhline(1.0, color="#444444", lw=0.8, ls=":")
        ax.plot([1.0], [1.0], linestyle="none", marker="o", markersize=7, color="#444444", label="unpruned")
        ax.set_xlim(0.8, max(ratios) + 0.6)  # arms at one ratio would otherwise get a 1e-4-wide axis
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_xlabel("x fewer multiply-adds than the unpruned model (fvcore, per query)")
        ax.set_ylabel(f"{METRIC_LABEL} / unpruned ({ref_ndcg:.4f})")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(_topic_title(topics), fontsize=11)
        _grid(ax)
        ax.legend(fontsize=8, loc="best", framealpha=0.9, title="arm (filled: recovered)", title_fontsize=8)
    fig.suptitle(f"Matched-cost study: {METRIC_LABEL} vs. compute\n(hollow: before recovery)", fontsize=12)
    try:
        return save_figure(fig, out_dir, name, formats)
    finally:
        fig.clear()
