"""`python -m benchmarks [--quick] [--only train,score,ingest,night,gpu,imbalance,audit] [--json OUT]`.

Runs each benchmark in turn (never two at once: they would skew each other's timings), prints every
figure next to its baseline from the same run, and optionally saves all rows as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

MODULES = {"train": "benchmarks.train_bench", "score": "benchmarks.score_bench",
           "ingest": "benchmarks.ingest_bench", "night": "benchmarks.night_bench", "gpu": "benchmarks.gpu_bench",
           "imbalance": "benchmarks.imbalance_bench", "warmstart": "benchmarks.warmstart_bench",
           "growth": "benchmarks.growth_bench", "imagesize": "benchmarks.imagesize_bench",
           "ddp": "benchmarks.ddp_bench",
           "audit": "benchmarks.audit_bench",
           "neardup": "benchmarks.neardup_bench",
           "watch": "benchmarks.watch_bench", "monitor": "benchmarks.monitor_bench"}


def machine() -> str:
    """One line: CPU model, cores, Python, torch."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def print_rows(rows: list[dict]) -> None:
    """A fixed-width table: figure, baseline, ratio."""
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    print(f"{'benchmark':<8} {'what':<44} {'value':>10} {'unit':<8} {'baseline':<26} {'base value':>10} {'ratio':>7}  note")
    for r in rows:
        print(f"{r.get('benchmark', ''):<8} {r.get('what', ''):<44.44} {fmt(r.get('value')):>10} {r.get('unit', ''):<8.8} "
              f"{fmt(r.get('baseline')):<26.26} {fmt(r.get('baseline_value')):>10} {fmt(r.get('ratio')):>7}  {r.get('note', '')}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks sequentially; exit 1 if one of them crashed (after running the rest)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    p.add_argument("--only", default=",".join(MODULES), help=f"comma-separated subset of {','.join(MODULES)}")
    p.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {sorted(MODULES)}")
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{'quick' if a.quick else 'full'} run", flush=True)
    rows, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            got = importlib.import_module(MODULES[name]).run(quick=a.quick)
        except Exception as e:  # noqa: BLE001 - report and go on with the other benchmarks
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        rows += got
        print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        print_rows(got)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "quick": a.quick, "rows": rows}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
