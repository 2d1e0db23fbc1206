"""The machine: CPU feature flags, native bf16 / AMX detection, the one-line description of where a
number was measured (every results row and benchmark footer carries it), the key of a host class
for measured choices, and timing on a device."""
import hashlib
import os
import platform
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo``), or None where it cannot be read."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: str | torch.device | None = None) -> str:
    """One line describing where costs were measured.

    CPU model (``/proc/cpuinfo`` when present, else ``platform``), logical CPU count,
    ``torch.get_num_threads()``, the torch version and, when ``device`` is a CUDA device, its
    name and the CUDA version.
    """
    parts = [f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs)",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if device is not None and torch.device(device).type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(torch.device(device))} "
                     f"(CUDA {torch.version.cuda})")
    return "; ".join(parts)


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16); None when
    /proc/cpuinfo cannot say. Without it, bf16 autocast is emulated and much slower than fp32."""
    flags = cpu_flags()
    return None if flags is None else ("avx512_bf16" in flags or "amx_bf16" in flags)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX-BF16 tiles (where PyTorch's bf16 matmuls run)."""
    return "amx_bf16" in (cpu_flags() or ())


def time_callable(fn: Callable[[], object], repeats: int, warmup: int,
                  device: str | torch.device) -> tuple[float, float]:
    """(mean, standard deviation) in milliseconds of ``repeats`` calls of ``fn()``.

    ``warmup`` untimed calls come first. Each call is timed alone with ``time.perf_counter``;
    on a CUDA device, ``torch.cuda.synchronize(device)`` runs before and after each call so the
    time covers the queued kernels. Only ``device`` is synchronised: ``fn`` must do its work
    there (inputs already on it). The standard deviation is the sample one (0 for one repeat).
    ``fn`` decides about gradients (wrap it in ``torch.inference_mode()`` for inference).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"timing supports cpu and cuda devices, got {device}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.fmean(times), statistics.stdev(times) if repeats > 1 else 0.0
def host_key() -> str:
    """What makes two hosts alike for speed (the key of measured choices such as ``auto``'s
    backend): CPU model, a digest of its feature flags, torch's thread count."""
    flags = " ".join(sorted(cpu_flags() or ()))
    return f"{_cpu_model()} | flags {hashlib.sha1(flags.encode()).hexdigest()[:12]} | {torch.get_num_threads()} threads"
