"""Shared helpers of train_bench and score_bench: machine rows, timing, medians, the table printer."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATASET = Path(__file__).resolve().parents[2] / "shared/datasets/face-mask"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def row(benchmark: str, what: str, value: Any, unit: str = "", baseline: str | None = None,
        baseline_value: Any = None, ratio: float | None = None, note: str = "") -> dict[str, Any]:
    """One result row with every key present."""
    return {"benchmark": benchmark, "what": what, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "note": note}


def machine_rows(benchmark: str) -> list[dict[str, Any]]:
    """Rows describing the machine the figures come from, and the GPU line (item 5)."""
    import torch

    from faceclf.training.loop import cpu_has_native_bf16

    cap = torch.backends.cpu.get_cpu_capability()
    rows = [
        row(benchmark, "machine: CPU", cpu_model(), note=f"os.cpu_count()={os.cpu_count()}, capability {cap}, flags: {cpu_flags()}, "
            f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}"),
        row(benchmark, "machine: torch threads", torch.get_num_threads(), "threads",
            note=f"torch {torch.__version__}, Python {platform.python_version()}"),
    ]
    if torch.cuda.is_available():
        rows.append(row(benchmark, "GPU", torch.cuda.get_device_name(0), note="present; GPU figures: the gpu benchmark"))
    else:
        rows.append(row(benchmark, "GPU: none", "none", note="torch.cuda.is_available() is False; CPU figures only"))
    return rows


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> str:
    """'median of k: min..max' for notes."""
    return f"median of {len(xs)} ({min(xs):.3g}..{max(xs):.3g})"




def cpu_seconds() -> float:
    """CPU seconds this process has used so far, every thread (ONNX Runtime's and the decoders') included."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one call."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def cpu_flags() -> str:
    """The CPU's vector extensions that decide model and decoder speed (AVX2, AVX-512 and which of its parts,
    VNNI, AMX), from /proc/cpuinfo; every figure is recorded with them."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    wanted = sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f or f == "fma")
    return " ".join(wanted) or "no AVX"


def stolen_seconds() -> float:
    """CPU seconds the hypervisor has given other guests instead of this machine (/proc/stat's steal column,
    all cores): on a shared VM the reason "cores busy" can sit well below the core count. 0.0 where unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
