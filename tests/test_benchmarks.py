"""The benchmark code itself runs (figures are printed by `python -m benchmarks`, never asserted here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_bench
from benchmarks._timing import DATASET


def test_gpu_benchmark_code_runs_on_the_cpu_and_reports_every_figure() -> None:
    # The GPU benchmark's own code, run on the CPU so that it is exercised on machines without a GPU.
    rows = gpu_bench.measure(torch.device("cpu"), n_images=64, n_files=40, reps=1)
    by_what = {r["what"]: r for r in rows}
    for what in ("train: faceclf AMP", "train: faceclf fp32", "train: seed pipeline"):
        assert by_what[what]["value"] > 0 and by_what[what]["unit"] == "img/s", by_what[what]
    assert by_what["train: AMP vs fp32"]["ratio"] == pytest.approx(
        by_what["train: faceclf AMP"]["value"] / by_what["train: faceclf fp32"]["value"])
    if DATASET.is_dir():
        assert "CPUExecutionProvider" in by_what["score: ONNX Runtime model only"]["note"]
        assert by_what["score: faceclf.serving.stream.score_images end to end"]["value"] > 0
        assert by_what["score: ORT vs torch eager"]["ratio"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark measures instead")
def test_gpu_benchmark_says_there_is_no_gpu() -> None:
    rows = gpu_bench.run(quick=True)
    assert [r["value"] for r in rows if r["what"] == "GPU benchmarks"] == [None]
    assert "no CUDA GPU" in rows[-1]["note"]
