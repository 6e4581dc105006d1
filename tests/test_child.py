"""Training in a fresh child process (faceclf.child, TrainConfig.train_in_child_above): the same run as in
this process for one seed, errors raised here as they were, a killed child a one-line error that --resume
mends."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from faceclf.child import ChildDied, run_in_child
from faceclf.config import with_overrides
from faceclf.training.launch import train_processes
from conftest import tiny_config
from test_cli import TINY, faceclf


def test_a_child_returns_its_result_and_raises_its_errors_here() -> None:
    assert run_in_child(sorted, [3, 1, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_in_child(int, "not a number")
    with pytest.raises(ChildDied, match="exited with code 3") as died:
        run_in_child(os._exit, 3)
    assert died.value.exitcode == 3


def test_training_in_a_child_process_is_the_same_run(faces: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(epochs=3)
    here = train_processes(faces, tmp_path / "here", with_overrides(cfg, train_in_child_above=0), version="v-here")
    with caplog.at_level(logging.INFO, logger="faceclf.training.launch"):
        child = train_processes(faces, tmp_path / "child", with_overrides(cfg, train_in_child_above=1),
                                version="v-child")
    assert any("in a fresh child process" in r.getMessage() for r in caplog.records)
    assert child["test"] == here["test"] and child["val"] == here["val"]  # same seed, same numbers
    assert history_without_seconds(tmp_path / "child") == history_without_seconds(tmp_path / "here")
    saved = json.loads((tmp_path / "child" / "config.json").read_text())
    assert saved["train"]["train_in_child_above"] == 1


def history_without_seconds(run: Path) -> list[list[str]]:
    """history.csv's rows less the last column (wall seconds, which differ between any two runs)."""
    return [line.split(",")[:-1] for line in (run / "history.csv").read_text().splitlines()]


def training_child(parent: psutil.Process) -> psutil.Process | None:
    """The spawned training process under ``parent`` (not multiprocessing's resource tracker)."""
    kids = [p for p in parent.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    return kids[0] if kids else None


def test_a_killed_training_child_is_a_one_line_error_and_resume_finishes(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "faceclf", "train", str(faces), "--out", str(run), "--epochs", "60",
           "--patience", "60", *TINY, "--train-in-child-above", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history, deadline = run / "history.csv", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # two epochs done
            break
        time.sleep(0.05)
    victim = training_child(psutil.Process(proc.pid))
    assert victim is not None and proc.poll() is None, "the run should still be training in its child"
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("faceclf train: error:")]
    assert len(errors) == 1, err
    assert "training process was killed by SIGKILL" in errors[0] and "--resume" in errors[0], errors[0]
    done = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"]  # whole at its final path
    assert done < 59

    faceclf("train", str(faces), "--out", str(run), "--resume")
    epochs = [int(r.split(",")[0]) for r in history.read_text().splitlines()[1:]]
    assert epochs == list(range(len(epochs))) and epochs[-1] > done  # continued, no epoch twice


def test_a_parent_killed_takes_its_training_child_with_it(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "faceclf", "train", str(faces), "--out", str(run), "--epochs", "60",
           "--patience", "60", *TINY, "--train-in-child-above", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, child = time.monotonic() + 120, None
    while time.monotonic() < deadline and child is None and proc.poll() is None:
        child = training_child(psutil.Process(proc.pid)) if (run / "config.json").is_file() else None
        time.sleep(0.05)
    assert child is not None, "no training child appeared"
    proc.kill()
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs([child], timeout=30)
    assert not alive, "the training child outlived its killed parent"
