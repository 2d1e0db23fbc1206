"""A latency table per backend, and the serving time of a shape predicted from it.

``bench/latency_table.py`` measures, on one backend and host, a one-layer model cut from a
reference model (its embeddings, first layer and head) with that layer reshaped to each
(heads, FFN width) of a grid, at each input length, on batches of ``batch`` sequences:
``measured_ms[length][i][j]`` for ``heads[i]``, ``ffn[j]``. ``base_ms[length]`` is the grid's
(0 heads, 0 FFN) point: embeddings, head and an emptied layer; a layer of (h, f) costs
``measured - base`` over it. :func:`additive_ms` adds the base and every layer's interpolated
cost (bilinear in heads and FFN width, linear in length, clamped to the grid).
``whole_model_ms`` is the reference model as it is, timed the same way; what it takes beyond its
own additive prediction (``predicted_whole_model_ms``) is time no single layer owns (on OpenVINO
~10 % of the model: a graph of many layers is not the sum of one-layer graphs), and
:func:`residual_ms` reads it. :func:`predict_ms` is the additive time plus that residual, a fixed
cost of every shape (it does not shrink with pruning), so the pruned model's predicted time and
its ratio to the unpruned model's (:func:`predicted_ratio`), what the pruners minimise, are not
flattered by the part of the time pruning cannot remove. A table without ``whole_model_ms`` has
no residual.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

TABLE_BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-int8")  # the last: calibration
FIELDS = ("backend", "host", "batch", "lengths", "heads", "ffn", "num_heads", "ffn_size",
          "layers", "base_ms", "measured_ms")


def load_table(path: str | Path) -> dict:
    """A latency table written by ``bench/latency_table.py``, its shape checked."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable latency table ({err})") from None
    missing = [f for f in FIELDS if not isinstance(table, dict) or f not in table]
    if missing:
        raise ValueError(f"{path}: latency table without field(s) {', '.join(missing)}")
    shape = (len(table["heads"]), len(table["ffn"]))
    for field in ("base_ms", "measured_ms"):
        if len(table[field]) != len(table["lengths"]):
            raise ValueError(f"{path}: field {field}: {len(table[field])} entries for "
                             f"{len(table['lengths'])} lengths")
    for k, grid in enumerate(table["measured_ms"]):
        if np.shape(grid) != shape:
            raise ValueError(f"{path}: field measured_ms[{k}]: shape {np.shape(grid)}, expected {shape} "
                             "(heads x ffn)")
    if sorted(table["heads"]) != table["heads"] or sorted(table["ffn"]) != table["ffn"] \
            or sorted(table["lengths"]) != table["lengths"]:
        raise ValueError(f"{path}: heads, ffn and lengths must be increasing")
    return table


def _interp_axis(values: list[float], x: float) -> tuple[int, int, float]:
    """Indices below/above ``x`` on a sorted axis and the weight of the upper one (clamped)."""
    if len(values) == 1 or x <= values[0]:
        return 0, 0, 0.0
    if x >= values[-1]:
        return len(values) - 1, len(values) - 1, 0.0
    hi = int(np.searchsorted(values, x, side="right"))
    lo = hi - 1
    return lo, hi, (x - values[lo]) / (values[hi] - values[lo])


def layer_ms(table: dict, heads: float, ffn: float, length_index: int) -> float:
    """One layer's cost over the base at one of the table's lengths (bilinear, clamped)."""
    grid = np.asarray(table["measured_ms"][length_index], dtype=float) - table["base_ms"][length_index]
    i0, i1, wi = _interp_axis(table["heads"], heads)
    j0, j1, wj = _interp_axis(table["ffn"], ffn)
    top = grid[i0, j0] * (1 - wj) + grid[i0, j1] * wj
    bottom = grid[i1, j0] * (1 - wj) + grid[i1, j1] * wj
    return float(top * (1 - wi) + bottom * wi)


def additive_ms(table: dict, heads_per_layer: list[int], ffn_per_layer: list[int],
                length: float | None = None) -> float:
    """The base and these layers' costs, one batch of the table's size at ``length`` tokens
    (default: the table's longest), interpolated linearly between lengths."""
    if len(heads_per_layer) != len(ffn_per_layer):
        raise ValueError(f"{len(heads_per_layer)} head counts but {len(ffn_per_layer)} FFN widths")
    lengths = table["lengths"]
    length = lengths[-1] if length is None else length

    def at(k: int) -> float:
        return table["base_ms"][k] + sum(layer_ms(table, h, f, k) for h, f in zip(heads_per_layer, ffn_per_layer))

    k0, k1, w = _interp_axis(lengths, length)
    return at(k0) * (1 - w) + at(k1) * w


def residual_ms(table: dict, length: float | None = None) -> float:
    """The reference model's measured time beyond its additive prediction at ``length``
    (interpolated between the table's lengths; 0 for a table without ``whole_model_ms``), never
    below minus half the base (an empty model keeps a positive time)."""
    if "whole_model_ms" not in table:
        return 0.0
    lengths = table["lengths"]
    reference = ([table["num_heads"]] * table["layers"], [table["ffn_size"]] * table["layers"])
    gap = [table["whole_model_ms"][k] - additive_ms(table, *reference, n) for k, n in enumerate(lengths)]
    k0, k1, w = _interp_axis(lengths, lengths[-1] if length is None else length)
    base = table["base_ms"][k0] * (1 - w) + table["base_ms"][k1] * w
    return max(gap[k0] * (1 - w) + gap[k1] * w, -0.5 * base)


def predict_ms(table: dict, heads_per_layer: list[int], ffn_per_layer: list[int],
               length: float | None = None) -> float:
    """Predicted ms of one batch of the table's size through a model of these layer widths at
    ``length`` tokens (default: the table's longest): :func:`additive_ms` plus :func:`residual_ms`."""
    return additive_ms(table, heads_per_layer, ffn_per_layer, length) + residual_ms(table, length)


def linear_costs(table: dict, length: float | None = None) -> tuple[float, float, float, float]:
    """The table as a cost linear in heads and neurons, what L0 gates can take an expectation of
    (``common.pruning.l0``): a least-squares fit ``layer = c + a * heads + b * neurons`` over the
    grid's non-empty layers at ``length`` (interpolated between the table's lengths); returns
    (base ms with the table's residual, per-layer constant c, ms per head a, ms per neuron b), a
    and b at least 1e-9."""
    lengths = table["lengths"]
    k0, k1, w = _interp_axis(lengths, lengths[-1] if length is None else length)
    grid = [np.asarray(table["measured_ms"][k], dtype=float) - table["base_ms"][k] for k in (k0, k1)]
    y = (grid[0] * (1 - w) + grid[1] * w).ravel()
    h, f = np.meshgrid(np.asarray(table["heads"], float), np.asarray(table["ffn"], float), indexing="ij")
    design = np.stack([np.ones(h.size), h.ravel(), f.ravel()], axis=1)
    used = (h.ravel() > 0) | (f.ravel() > 0)  # the empty layer is the base, not a point of the fit
    c, a, b = np.linalg.lstsq(design[used], y[used], rcond=None)[0]
    base = table["base_ms"][k0] * (1 - w) + table["base_ms"][k1] * w + residual_ms(table, length)
    return float(base), float(c), max(float(a), 1e-9), max(float(b), 1e-9)


def predicted_ratio(table: dict, heads_per_layer: list[int], ffn_per_layer: list[int],
                    length: float | None = None) -> float:
    """Predicted time of these widths over the unpruned model's (every layer full, as many
    layers as the table's reference), on the table's backend and host."""
    full = predict_ms(table, [table["num_heads"]] * table["layers"], [table["ffn_size"]] * table["layers"], length)
    return predict_ms(table, heads_per_layer, ffn_per_layer, length) / full


def predicted_speedup(table: dict, baseline: tuple[list[int], list[int]],
                      candidate: tuple[list[int], list[int]], length: float | None = None) -> float:
    """Predicted speed-up of ``candidate`` over ``baseline``, each (heads per layer, FFN widths per
    layer), on the table's backend and host: what a measured speed-up is held against."""
    return predict_ms(table, *baseline, length) / predict_ms(table, *candidate, length)


# -- measuring ----------------------------------------------------------------------------------
def cut_model(reference: str, kind: str | None, heads: int | None = None, ffn: int | None = None):
    """The reference model (a LoadedModel, reshaped), or with ``heads``/``ffn`` given its first
    layer alone, reshaped to the first ``heads`` heads and ``ffn`` FFN neurons present."""
    from common.models.loading import keep_first_layers
    from common.kinds.loading import load_model
    from common.models.structure import reshape

    loaded = load_model(reference, "cpu", kind=kind)
    if heads is not None:
        keep_first_layers(loaded, 1)
        state = loaded.state
        state.kept_heads = [list(state.present_heads[0][:heads])]
        state.kept_ffn = [list(state.present_ffn[0][:ffn])]
    loaded.masks.remove()
    loaded.state = reshape(loaded.model, loaded.state)
    return loaded.__class__(loaded.model.eval(), loaded.tokenizer, loaded.state, loaded.masks, loaded.path)


def backend_runner(loaded, backend: str, workdir: Path, threads: int, keep_fp32: tuple[str, ...] = (),
                   calibration: tuple[list[str], list[str]] | None = None):
    """A runner of ``backend`` for an in-memory model: torch directly, the ONNX/OpenVINO
    backends through an export into ``workdir`` (checked against torch as every export is);
    ``keep_fp32``: projections the int8 graph leaves in fp32, as ``04 --int8_keep_fp32`` ships them;
    ``calibration``: (queries, passages) the openvino-int8 IR is calibrated on (04's NNCF recipe)."""
    from common.layout import export_file
    from common.serving.onnx_export import export_onnx
    from common.serving.runners import TORCH_PRECISION, OnnxRunner, OpenVinoRunner, TorchRunner

    if backend in TORCH_PRECISION:
        return TorchRunner(loaded, TORCH_PRECISION[backend])
    export_onnx(loaded, workdir, max_length=64, keep_fp32=keep_fp32)
    if backend.startswith("onnx"):
        return OnnxRunner(export_file(workdir, backend), threads)
    from common.serving.openvino_export import export_openvino

    export_openvino(loaded, workdir, max_length=64, calibration=calibration)  # measure_table pairs them with int8
    return OpenVinoRunner(export_file(workdir, backend), threads)


def measure_table(reference: str, kind: str | None, backend: str, heads: list[int], ffn: list[int],
                  lengths: list[int], batch: int, rounds: int, threads: int, progress: bool = True,
                  keep_fp32: tuple[str, ...] = (), calibration: tuple[list[str], list[str]] | None = None) -> dict:
    """The latency table of ``backend`` on this host (module docstring): every (heads, ffn)
    point of the grid at every length, and the reference model whole. ``keep_fp32`` (onnx-int8
    only): the int8 graphs keep those projections in fp32, recorded as ``int8_keep_fp32``.
    ``calibration`` (openvino-int8 only, needed): the (queries, passages) every grid point's int8 IR
    is calibrated on, with 04's recipe (NNCF static, transformer preset; here truncated to 64 tokens,
    which the ranges, not the graph, depend on), their number recorded."""
    import torch

    from common.hardware import host_key, machine_description
    from common.serving.choose import benchmark_batch, time_runner
    from common.serving.runners import onnx_inputs, openvino_precision

    if backend not in TABLE_BACKENDS:
        raise ValueError(f"backend must be one of {TABLE_BACKENDS}, got {backend!r}")
    if keep_fp32 and backend != "onnx-int8":
        raise ValueError(f"int8_keep_fp32 shapes onnx-int8 graphs; the backend is {backend}")
    if (backend == "openvino-int8") != bool(calibration):
        raise ValueError("calibration pairs go with the openvino-int8 backend, and it needs them")
    torch.set_num_threads(threads)
    whole = cut_model(reference, kind)
    names = onnx_inputs(whole)
    inputs = {n: benchmark_batch(whole.tokenizer, names, batch, n) for n in lengths}
    state = whole.state
    top_heads, top_ffn = max(len(h) for h in state.present_heads), max(len(f) for f in state.present_ffn)
    if max(heads) > min(len(h) for h in state.present_heads[:1]) or max(ffn) > len(state.present_ffn[0]):
        raise ValueError(f"{reference}: its first layer has {len(state.present_heads[0])} heads and "
                         f"{len(state.present_ffn[0])} FFN neurons; the grid asks for up to {max(heads)} / {max(ffn)}")
    measured = [[[0.0] * len(ffn) for _ in heads] for _ in lengths]
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        for i, h in enumerate(heads):
            for j, f in enumerate(ffn):
                runner = backend_runner(cut_model(reference, kind, h, f), backend, Path(tmp, f"{h}_{f}"), threads,
                                        keep_fp32, calibration)
                for k, n in enumerate(lengths):
                    measured[k][i][j] = time_runner(runner, inputs[n], rounds)
                if progress:
                    print(f"heads {h:3d} ffn {f:5d}: " + ", ".join(f"{measured[k][i][j]:.1f} ms @ {n}"
                                                                  for k, n in enumerate(lengths)), flush=True)
        runner = backend_runner(whole, backend, Path(tmp, "whole"), threads, keep_fp32, calibration)
        whole_ms = [time_runner(runner, inputs[n], rounds) for n in lengths]
    base = [measured[k][0][0] if heads[0] == 0 and ffn[0] == 0 else None for k in range(len(lengths))]
    if base[0] is None:
        raise ValueError("the grid must start at 0 heads and 0 FFN neurons (the base of every layer's cost)")
    table = {"backend": backend, "host": machine_description(), "host_key": host_key(), "threads": threads,
             "precision": (openvino_precision() if backend == "openvino" else
                           f"int8 (NNCF static), the rest {openvino_precision()}" if backend == "openvino-int8" else backend),
             "reference": reference,
             "kind": whole.kind, "layers": state.num_layers, "num_heads": top_heads, "ffn_size": top_ffn,
             "head_size": state.head_size, "batch": batch, "lengths": lengths, "heads": heads, "ffn": ffn,
             "rounds": rounds, "base_ms": base, "measured_ms": measured, "whole_model_ms": whole_ms}
    if keep_fp32:
        table["int8_keep_fp32"] = list(keep_fp32)
    if calibration:
        table["calibration_pairs"] = len(calibration[0])
    table["predicted_whole_model_ms"] = [  # the additive model's check; the gap is residual_ms
        additive_ms(table, [len(h) for h in state.present_heads], [len(f) for f in state.present_ffn], n)
        for n in lengths]
    return table
