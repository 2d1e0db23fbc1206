"""``auto``: a shipped dir's fastest backend on this host class, by measurement, not by rule.

On first use on a host class, the backends a dir has (torch fp32; torch bf16 where the CPU has
native bf16; each ONNX / OpenVINO export it holds) each score the same few batches
(:func:`measure_backend`: one warm-up, ``ROUNDS`` timed, the median); the fastest is used
and the measurement is cached in the model dir, ``<dir>/backend_choice.json``, under the host
key (``common.hardware.host_key``: CPU model, a digest of its feature flags, torch's thread count), so the
next process on the same kind of host reads it and a different kind (AMD EPYC, Xeon without
AMX, Xeon with AMX) measures its own. An entry is measured again when the dir's exports
change (their names, sizes and modification times are part of it). Where the dir cannot be
written, the choice is used for this process only (a note on stderr).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import layout
from common.io import atomic_write_text
from common.hardware import cpu_has_native_bf16, host_key, machine_description
from common.layout import ONNX_FILES, OPENVINO_FILES

ROUNDS = 3  # timed batches per backend, after one warm-up
BATCH, LENGTH = 32, 128  # sequences per batch and tokens per sequence of the micro-benchmark
_CHOSEN: dict = {}  # (dir, host key, exports) -> backend, for a dir whose cache cannot be written


def exported_backends(path: str | Path) -> list[str]:
    """The export backends whose files the dir holds (ONNX graphs, OpenVINO IRs)."""
    return [b for b in (*ONNX_FILES, *OPENVINO_FILES) if layout.export_file(path, b).is_file()]


def candidate_backends(path: str | Path) -> list[str]:
    """What ``auto`` measures for a dir: torch fp32, torch bf16 where the CPU does bf16
    natively (emulated bf16 is many times slower), and every export the dir holds."""
    return ["torch", *(["torch-bf16"] if cpu_has_native_bf16() else []), *exported_backends(path)]


def _exports_stamp(path: str | Path) -> dict:
    files = [layout.export_file(path, b) for b in exported_backends(path)]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def benchmark_batch(tokenizer, names: list[str], batch: int = BATCH, length: int = LENGTH) -> dict[str, np.ndarray]:
    """``batch`` sequences of ``length`` ordinary tokens (no padding, no special token ids)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids = [i if i not in special else 1999 for i in range(1000, 1000 + length)]
    if len(tokenizer) < 2000:  # a tiny vocabulary (test models): ordinary ids inside it
        ordinary = [i for i in range(len(tokenizer)) if i not in special]
        ids = [ordinary[j % len(ordinary)] for j in range(length)]
    inputs = {"input_ids": np.tile(np.asarray(ids, dtype=np.int64), (batch, 1)),
              "attention_mask": np.ones((batch, length), dtype=np.int64),
              "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
    return {k: inputs[k] for k in names}


def time_runner(runner, batch: dict, rounds: int = ROUNDS) -> float:
    """Median ms of one batch through a runner (one warm-up, ``rounds`` timed)."""
    runner(batch)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runner(batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_backend(loaded, backend: str, batch: dict) -> float:
    """Median ms of one batch through ``backend``'s runner for the dir (:func:`time_runner`)."""
    from common.serving.runners import make_runner

    return time_runner(make_runner(loaded, backend), batch)


def _read(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is measured again and rewritten


def fastest_backend(path: str | Path) -> str:
    """The cached choice for this host class, else measure every candidate, cache, choose."""
    from common.kinds.loading import load_model
    from common.serving.runners import onnx_inputs

    cache, key, stamp = Path(path, layout.BACKEND_CHOICE_FILE), host_key(), _exports_stamp(path)
    backends = candidate_backends(path)
    entry = _read(cache).get(key)
    if entry and entry.get("exports") == stamp and sorted(entry.get("ms", {})) == sorted(backends):
        return entry["backend"]
    memo = (str(Path(path).resolve()), key, json.dumps(stamp, sort_keys=True))
    if memo in _CHOSEN:
        return _CHOSEN[memo]
    loaded = load_model(str(path), "cpu")
    batch = benchmark_batch(loaded.tokenizer, onnx_inputs(loaded))
    ms = {b: measure_backend(loaded, b, batch) for b in backends}
    choice = _CHOSEN[memo] = min(ms, key=ms.get)
    print(f"auto: {path} on this host: " + ", ".join(f"{b} {t:.0f} ms" for b, t in ms.items())
          + f" per batch of {BATCH}x{LENGTH} tokens -> {choice} (cached in {cache})", file=sys.stderr)
    entries = _read(cache)
    entries[key] = {"backend": choice, "ms": ms, "exports": stamp, "host": machine_description(),
                    "batch": [BATCH, LENGTH], "rounds": ROUNDS,
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write_text(cache, json.dumps(entries, indent=1))
    except OSError as err:
        print(f"note: {cache}: not written ({err}); the choice holds for this process only", file=sys.stderr)
    return choice
