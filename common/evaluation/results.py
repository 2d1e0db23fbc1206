"""The results store (``runs/results.parquet``) and the markdown table generated from it.

One row per evaluation of a checkpoint on a topic set, keyed by (``checkpoint``, ``topics``);
appending a row with an existing key replaces the old row. Columns are the union of the keys
the rows carry (missing values are null), so later measurements add columns freely.

Expected columns (all optional except the key):

=====================  ======================================================================
``checkpoint``         key: checkpoint directory (str path) or packaged tag
``topics``             key: topic set, e.g. ``"dl20"``, ``"dl21"``
``run``                run name (``runs/<run>/``)
``method``             ``"bm25"``, ``"initial"``, ``"heads"``, ``"ffn"``, ``"mixed"``,
                       ``"reshaped"``, ...
``model_kind``         ``"cross"`` (cross-encoder) or ``"bi"`` (bi-encoder)
``backend``            what scored and was timed (``common.serving.rank``): ``"torch"``, ``"torch-bf16"``,
                       ``"onnx"``, ``"onnx-int8"``, ``"openvino"``, ``"openvino-int8"``; ``export``: the
                       exported file's recipe; ``backend_precision`` (OpenVINO): what it computed in
                       on ``backend_host`` (the machine that scored, ``common.hardware``)
``head``               cross-encoders: ``"classifier"`` or ``"segment_cosine"``
``cross_attention``    segment head: mean attention share a token puts on the other segment
``family``             architecture family / adapter name (``"bert"``, ``"electra"``, ...)
``seen_pairs``         training pairs seen when the checkpoint was written (int)
``heads``, ``ffn``     total kept attention heads / FFN neurons (int)
``heads_per_layer``,   kept per layer, comma-separated (``"12,11,12,..."``)
``ffn_per_layer``
``ndcg@10``,           measures of :func:`common.data.trec.evaluate_run`
``map@100``,
``rr@10``,
``recall@100``
``num_queries``        judged queries the means are over (int)
``run_queries``,       queries in the run, and how many of them the qrels judge (int)
``judged_run_queries``
``fusion_weight``      method ``interpolate``: the model's weight against the first stage
``cpu_ms_worst``,      CPU latency per query (ms), worst-case lengths: mean and std
``cpu_ms_worst_std``
``cpu_ms_real``,       CPU latency per query (ms), real input lengths: mean and std
``cpu_ms_real_std``
``cpu_bf16_ms_real``   CPU bfloat16 latency, real lengths (ms); ``..._std`` optional
``gpu_ms_worst``       GPU latency, worst-case lengths (ms); ``..._std`` optional
``flops_macs``         multiply-adds per query (fvcore's unit)
``params``,            parameters of the whole model / of the encoder (int)
``encoder_params``
``size_mb``            size of the weights on disk (MB)
``machine``            where the timings were measured (str)
``torch_version``      torch version of the measurement
``timestamp``          ISO 8601 UTC time of the row (filled in when absent)
=====================  ======================================================================
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.trec import CONVENTIONS
from common.io import atomic_output, atomic_write_text
from common.layout import STAGE_ORDER

KEY = ("checkpoint", "topics")

#: Display order of methods in the table; methods not listed follow alphabetically.
METHOD_ORDER = ("bm25", "base") + STAGE_ORDER + ("reshaped",)

MISSING = "–"

# Per-checkpoint descriptive columns of the table: (header, column, formatter).
_DESCRIPTION_COLUMNS = (
    ("Method", "method", "text"),
    ("Backend", "backend", "text"),
    ("Seen pairs", "seen_pairs", "count"),
    ("Heads", "heads", "int"),
    ("FFN dim", "ffn", "int"),
)
_TEXT_COLUMNS = sum(kind == "text" for _, _, kind in _DESCRIPTION_COLUMNS)  # left-aligned, first
# Metric columns per topic set: (label, column).
_METRIC_COLUMNS = (("NDCG@10", "ndcg@10"), ("MAP@100", "map@100"))
# Timing columns, shown only when some row has a value: (header, mean column, std column).
_TIMING_COLUMNS = (
    ("CPU ms (worst)", "cpu_ms_worst", "cpu_ms_worst_std"),
    ("CPU ms (real)", "cpu_ms_real", "cpu_ms_real_std"),
    ("CPU bf16 ms (real)", "cpu_bf16_ms_real", "cpu_bf16_ms_real_std"),
    ("GPU ms (worst)", "gpu_ms_worst", "gpu_ms_worst_std"),
)
# Cost columns, shown only when some row has a value: (header, column, scale, decimals).
_COST_COLUMNS = (
    ("GMACs (fvcore)", "flops_macs", 1e-9, 2),
    ("Params (M)", "params", 1e-6, 1),
    ("Cross-segment attention (%)", "cross_attention", 100.0, 2),
)


# --------------------------------------------------------------------------- the store


def _is_missing(value: object) -> bool:
    """True for None, NaN and pandas' NA/NaT."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays: not a scalar, hence not missing
        return False


def _column(values: list[object], name: str) -> pd.Series:
    """A column from raw row values with a parquet-friendly dtype (ints stay ints when null)."""
    present = [v for v in values if not _is_missing(v)]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return pd.Series(values, dtype="boolean", name=name)
    if present and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in present
    ):
        return pd.Series(values, dtype="Int64", name=name)
    if present and all(
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        for v in present
    ):
        return pd.Series([np.nan if _is_missing(v) else float(v) for v in values],
                         dtype="float64", name=name)
    if all(isinstance(v, str) for v in present):
        return pd.Series([None if _is_missing(v) else v for v in values], dtype="str", name=name)
    kinds = sorted({type(v).__name__ for v in present})
    raise TypeError(f"results column {name!r} mixes or holds unsupported types: {kinds}")


def _rows_frame(rows: list[Mapping[str, object]]) -> pd.DataFrame:
    """Validate rows and build a frame (column order: first appearance)."""
    columns: list[str] = []
    normalised = []
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for i, row in enumerate(rows):
        row = dict(row)
        for key in KEY:
            if _is_missing(row.get(key)) or str(row[key]) == "":
                raise ValueError(f"results row {i} lacks key column {key!r}")
            row[key] = str(row[key])  # Path checkpoints are stored as text
        row.setdefault("timestamp", now)
        normalised.append(row)
        columns.extend(c for c in row if c not in columns)
    # Later rows with the same key win, in the position of the last one.
    last = {tuple(row[k] for k in KEY): row for row in normalised}
    unique = [row for row in normalised if last[tuple(row[k] for k in KEY)] is row]
    return pd.DataFrame({c: _column([row.get(c) for row in unique], c) for c in columns})


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` so concurrent appenders do not lose rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """``df.to_parquet`` to a temporary file in the same directory, then ``os.replace``."""
    with atomic_output(path) as tmp:
        df.to_parquet(tmp, index=False)


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results table; an empty frame (key columns only, no rows) if the file is absent."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({k: pd.Series(dtype="str") for k in KEY})
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # not a parquet file at all (pyarrow raises its own types)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: not a results table (unreadable as parquet: {first})") from None
    missing = [k for k in KEY if k not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a results table (no {', '.join(missing)} column; has "
                         f"{', '.join(map(str, df.columns[:6]))}): give the results parquet 05 writes")
    return df


def append_results(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> pd.DataFrame:
    """Add ``rows`` to the results table at ``path``, replacing rows with the same key.

    Each row needs ``checkpoint`` and ``topics``; ``timestamp`` is set to now when absent.
    Columns are the union of existing and new ones (missing values null). The file is written
    atomically under a lock file (``<path>.lock``). Returns the table written.
    """
    path = Path(path)
    new = _rows_frame(list(rows))
    if new.empty:
        return load_results(path)
    with _locked(path):
        old = load_results(path)
        new_keys = set(zip(*(new[k] for k in KEY)))
        keep = [key not in new_keys for key in zip(*(old[k].astype(str) for k in KEY))]
        kept = old[keep] if len(old) else old
        frames = [f for f in (kept, new) if len(f)]
        table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        columns = list(old.columns) + [c for c in new.columns if c not in old.columns]
        table = table.reindex(columns=columns).reset_index(drop=True)
        _write_parquet_atomic(table, path)
    return table


def has_result(path: str | os.PathLike, checkpoint: str | os.PathLike, topics: str) -> bool:
    """Whether the table at ``path`` holds a row for (``checkpoint``, ``topics``)."""
    df = load_results(path)
    if df.empty:
        return False
    return bool(((df["checkpoint"].astype(str) == str(checkpoint))
                 & (df["topics"].astype(str) == str(topics))).any())


# --------------------------------------------------------------------------- the table


def _topic_order(topics: str) -> tuple[int, str, int]:
    """``dl19 < dl20 < dl21 < dl22`` (numeric suffix), other names after, alphabetically."""
    digits = "".join(ch for ch in topics if ch.isdigit())
    prefix = topics.rstrip("0123456789")
    if digits and topics.endswith(digits):
        return (0, prefix, int(digits))
    return (1, topics, 0)


def _method_rank(method: object) -> tuple[int, str]:
    """Known methods in :data:`METHOD_ORDER`, unknown ones after, alphabetically; missing last."""
    if _is_missing(method):
        return (len(METHOD_ORDER) + 1, "")
    text = str(method)
    if text in METHOD_ORDER:
        return (METHOD_ORDER.index(text), "")
    return (len(METHOD_ORDER), text)


def _cell_text(value: object) -> str:
    """Text for a table cell; ``|`` escaped so it does not split the row."""
    return str(value).replace("|", r"\|")


def _fmt_number(value: object, decimals: int, scale: float = 1.0) -> str:
    if _is_missing(value):
        return MISSING
    return f"{float(value) * scale:.{decimals}f}"


def _fmt_int(value: object, thousands: bool = False) -> str:
    if _is_missing(value):
        return MISSING
    number = float(value)
    if not math.isfinite(number):
        return MISSING
    return f"{int(round(number)):,}" if thousands else str(int(round(number)))


def _fmt_timing(mean: object, std: object) -> str:
    if _is_missing(mean):
        return MISSING
    text = f"{float(mean):.1f}"
    return text if _is_missing(std) else f"{text} ± {float(std):.1f}"


def _last_value(group: pd.DataFrame, column: str) -> object:
    """The most recently appended non-null value of ``column`` in ``group`` (or None)."""
    if column not in group.columns:
        return None
    values = group[column].dropna()
    return None if values.empty else values.iloc[-1]


def _has_any(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and bool(df[column].notna().any())


def markdown_table(df: pd.DataFrame) -> str:
    """The results table in markdown, followed by the conventions and the timing machines.

    One row per checkpoint: label (``run``, else the checkpoint), method, seen pairs, kept heads,
    FFN dim, then NDCG@10 and MAP@100 per topic set present (``"DL20 NDCG@10"``, ...), then the
    CPU/GPU latencies (mean ± std, ms), GMACs (fvcore) and parameters (M) when any row has them.
    Checkpoint attributes come from the latest row of that checkpoint that has them. Rows are
    sorted by method (:data:`METHOD_ORDER`), seen pairs, then kept heads/FFN descending.
    Missing values are shown as ``–``.
    """
    if df.empty:
        body = "_No results yet._"
        return f"{body}\n\n{CONVENTIONS}\n\nTimings: none measured.\n"

    topics = sorted({str(t) for t in df["topics"].dropna()}, key=_topic_order)
    timings = [spec for spec in _TIMING_COLUMNS if _has_any(df, spec[1])]
    costs = [spec for spec in _COST_COLUMNS if _has_any(df, spec[1])]

    header = ["Model"] + [h for h, _, _ in _DESCRIPTION_COLUMNS]
    header += [f"{t.upper()} {label}" for t in topics for label, _ in _METRIC_COLUMNS]
    header += [h for h, _, _ in timings] + [h for h, _, _, _ in costs]

    records = []
    for checkpoint, group in df.groupby("checkpoint", sort=False, dropna=False):
        run = _last_value(group, "run")
        cells = [_cell_text(checkpoint if _is_missing(run) else run)]
        for _, column, kind in _DESCRIPTION_COLUMNS:
            value = _last_value(group, column)
            if kind == "text":
                cells.append(MISSING if _is_missing(value) else _cell_text(value))
            else:
                cells.append(_fmt_int(value, thousands=kind == "count"))
        for topic in topics:
            at_topic = group[group["topics"].astype(str) == topic]
            for _, column in _METRIC_COLUMNS:
                cells.append(_fmt_number(_last_value(at_topic, column), 4))
        for _, mean_col, std_col in timings:
            cells.append(_fmt_timing(_last_value(group, mean_col), _last_value(group, std_col)))
        for _, column, scale, decimals in costs:
            cells.append(_fmt_number(_last_value(group, column), decimals, scale))

        seen = _last_value(group, "seen_pairs")
        heads = _last_value(group, "heads")
        ffn = _last_value(group, "ffn")
        sort_key = (
            _method_rank(_last_value(group, "method")),
            -1.0 if _is_missing(seen) else float(seen),
            -(float(heads) if not _is_missing(heads) else math.inf),
            -(float(ffn) if not _is_missing(ffn) else math.inf),
            str(checkpoint),
        )
        records.append((sort_key, cells))
    records.sort(key=lambda record: record[0])

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * (1 + _TEXT_COLUMNS) + ["---:"] * (len(header) - 1 - _TEXT_COLUMNS)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in records]
    return "\n".join(lines) + f"\n\n{CONVENTIONS}\n\n{_machines_line(df, timings)}\n"


def _machines_line(df: pd.DataFrame, timings: list[tuple[str, str, str]]) -> str:
    """The footnote naming the machine(s) the timings were measured on."""
    if not timings:
        return "Timings: none measured."
    timed = df[df[[mean for _, mean, _ in timings]].notna().any(axis=1)]
    names = []
    for _, row in timed.iterrows():
        machine = row.get("machine")
        name = "unrecorded machine" if _is_missing(machine) else str(machine)
        torch_version = row.get("torch_version")
        if not _is_missing(torch_version):
            name += f" (torch {torch_version})"
        if name not in names:
            names.append(name)
    return "Timings measured on: " + "; ".join(names) + "."


def write_table(df: pd.DataFrame, md_path: str | os.PathLike) -> Path:
    """Write :func:`markdown_table` of ``df`` to ``md_path`` atomically; returns the path."""
    return atomic_write_text(md_path, markdown_table(df))
