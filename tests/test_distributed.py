"""DDP training: real gloo process groups through torchrun's launcher (`--nproc-per-node 2`), from a caller
script without the __main__ guard (a file, standard input), a real local Ray instance with Ray Train (2 workers),
a rank killed with SIGKILL, and the partition rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import DistributedSampler

from faceclf.config import with_overrides
from faceclf.training.distributed import Rank, part_of, share
from faceclf.training.plan import capped_workers
from faceclf.training.ray_train import RayUnavailable, check_address
from conftest import FAST, grouped, LENIENT, put_local_faces, tiny_config
from test_cli import TINY, faceclf

QUALITY_BAR = 0.8   # what a single process reaches on the sample faces (tests/test_train.py)


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (1, 2), (5, 1)])
def test_each_rank_takes_what_distributed_sampler_would(n: int, world: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert part_of(order, Rank(rank, world)).tolist() == [int(order[i]) for i in sampler]
        assert len(part_of(order, Rank(rank, world))) == share(n, Rank(rank, world)) == len(sampler)
    unpadded = [part_of(torch.arange(n), Rank(r, world), pad=False) for r in range(world)]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(n))  # evaluation: every image exactly once


def test_worker_counts_are_refused_or_capped() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        capped_workers(0, "cpu")
    cores = len(psutil.Process().cpu_affinity())
    assert capped_workers(cores + 3, "cpu") == cores
    proc = faceclf("train", "nowhere", "--out", "x", "--nproc-per-node", "0", check=False)
    assert proc.returncode == 2 and "must be >= 1, got 0" in proc.stderr


def ranks_agree(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert ranks["world_size"] == 2 and len(set(ranks["weights_sha256"])) == 1, ranks  # identical on every rank
    return metrics


def test_two_gloo_processes_through_torchrun_train_like_one(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = faceclf("train", str(faces), "--out", str(run), "--epochs", "12", "--patience", "12", *TINY,
                  "--nproc-per-node", "2")
    metrics = ranks_agree(run)
    assert json.loads(out.stdout)["test"] == metrics["test"]
    assert metrics["test"]["accuracy"] >= QUALITY_BAR, metrics["test"]
    assert {"checkpoint.pt", "last.pt", "history.csv", "metrics.json", "history.png"} <= {p.name for p in run.iterdir()}
    assert not (run / "decoded").exists()  # the run's own decoded shards are removed once it finished
    assert len((run / "history.csv").read_text().splitlines()) == 13  # rank 0 alone wrote one row per epoch
    assert json.loads((run / "config.json").read_text())["training"]["workers"] == 2


# A caller without the __main__ guard: each run of its top level adds a line to the counter file. Under
# multiprocessing's "spawn" every rank re-ran it (three lines, and ranks that started ranks of their own); from
# standard input no rank could start at all (ProcessExitedException: '<stdin>' is no file).
GUARDLESS_DDP = """\
import json, os
with open(os.environ["COUNTER"], "a") as counter:
    counter.write("ran\\n")
from faceclf.config import RunConfig, with_overrides
from faceclf.training.launch import run_training
cfg = RunConfig.from_dict(json.loads(os.environ["CFG"]))
metrics = run_training(os.environ["FACES"], os.environ["RUN"], with_overrides(cfg, workers=2))
print("test accuracy:", metrics["test"]["accuracy"])
"""


@pytest.mark.parametrize("how", ["stdin", "script"])
def test_a_caller_without_the_main_guard_starts_two_ranks_and_runs_once(how: str, faces: Path,
                                                                         tmp_path: Path) -> None:
    run, counter = tmp_path / "run", tmp_path / "counter.txt"
    env = {**os.environ, "COUNTER": str(counter), "FACES": str(faces), "RUN": str(run),
           "CFG": json.dumps(with_overrides(tiny_config(epochs=3), patience=3).to_dict())}
    if how == "stdin":  # python3 - < night.py
        argv, stdin = [sys.executable, "-"], GUARDLESS_DDP
    else:
        (tmp_path / "night.py").write_text(GUARDLESS_DDP)
        argv, stdin = [sys.executable, str(tmp_path / "night.py")], None
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    metrics = ranks_agree(run)  # trained by two ranks
    assert f"test accuracy: {metrics['test']['accuracy']}" in done.stdout, done.stdout
    assert counter.read_text().splitlines() == ["ran"], done.stderr  # the script ran once, in no rank


def rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The training processes the launcher spawned (not multiprocessing's resource tracker)."""
    kids = [p for p in launcher.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    return sorted(kids, key=lambda p: p.create_time())


def test_a_killed_rank_fails_the_run_and_resume_finishes_it(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "faceclf", "train", str(faces), "--out", str(run), "--epochs", "60",
           "--patience", "60", *TINY, "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history, deadline = run / "history.csv", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # two epochs done
            break
        time.sleep(0.05)
    ranks = rank_processes(psutil.Process(proc.pid))
    assert len(ranks) == 2 and proc.poll() is None, "the run should still be training with two ranks"
    victim = ranks[-1]
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("faceclf train: error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert "was killed by SIGKILL" in line and "nothing was promoted" in line and "--resume" in line, line
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)  # no rank left behind
    for final in ("checkpoint.pt", "last.pt"):  # whole files at the final paths (written atomically)
        torch.load(run / final, map_location="cpu", weights_only=True)
    done = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert done < 59

    faceclf("train", str(faces), "--out", str(run), "--resume")
    epochs = [int(r.split(",")[0]) for r in history.read_text().splitlines()[1:]]
    assert epochs == list(range(len(epochs))) and epochs[-1] > done  # continued, no epoch twice
    ranks_agree(run)


def test_ray_train_with_two_workers_on_a_local_instance(faces: Path, tmp_path: Path) -> None:
    import ray

    from faceclf.training.plan import plan_run
    from faceclf.training.ray_train import train_on_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = tmp_path / "run"
        cfg = with_overrides(tiny_config(epochs=12), patience=12)
        plan = plan_run(faces, run, with_overrides(cfg, workers=2, ray_address="local"))
        assert plan.engine == "ray" and plan.workers == 2
        metrics = train_on_ray(plan, storage=str(tmp_path / "ray-results"))
    finally:
        ray.shutdown()
    assert metrics == ranks_agree(run)
    assert metrics["test"]["accuracy"] >= QUALITY_BAR, metrics["test"]
    assert {"checkpoint.pt", "last.pt", "history.csv", "config.json"} <= {p.name for p in run.iterdir()}


def test_a_ray_address_that_does_not_answer_is_a_one_line_error(faces: Path, tmp_path: Path) -> None:
    with pytest.raises(RayUnavailable, match="does not answer"):
        check_address("127.0.0.1:1")
    proc = faceclf("train", str(faces), "--out", str(tmp_path / "run"), *TINY, "--ray-address", "127.0.0.1:1",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Ray cluster at 127.0.0.1:1 does not answer" in proc.stderr


def test_a_night_trains_in_two_processes_with_the_workers_parameter(prefect_api, tmp_path: Path) -> None:
    from flows.train import train

    bucket = tmp_path / "bucket"
    put_local_faces(bucket, tmp_path / "gen", 60, 1)
    night = train(**grouped(bucket=str(bucket), face_dir=str(tmp_path / "face"), runs_dir=str(tmp_path / "runs"), **LENIENT,
                  **{**FAST, "epochs": 8}, workers=2))
    assert not night["skipped"] and night["promoted"], night
    run = tmp_path / "runs" / night["version"]
    metrics = ranks_agree(run)  # trained by two ranks from the night's decoded cache
    assert metrics["version"] == night["version"] and night["decoded_cache"]["decoded"] == 120
    assert not (run / "decoded").exists()  # the ranks read face-decoded/, no copy in the run folder
