"""The training entry point, and training in several processes on one machine (torchrun's own launcher API).

    run_training(data, run_dir, cfg)   = execute_plan(plan_run(...)): planned once, then one of
        run_plan(plan)                 in this process (one worker)
        train_processes(plan)          N DDP processes here:
            -> the data decoded once into the decoded-image cache (each rank memory-maps the same shards)
            -> torch.distributed.launcher.elastic_launch: N processes, a c10d rendezvous on localhost
            -> each rank: join the group (gloo on CPU, NCCL on CUDA), faceclf.training.run.run_plan
            -> rank 0's metrics; rank 0 alone wrote run_dir
        train_on_ray(plan)             Ray Train workers (faceclf.training.ray_train)

A rank is a fresh interpreter, ``python -c`` with faceclf.child's boot code (never multiprocessing's spawn,
which re-ran a caller's script without the ``__main__`` guard in every rank, and could not start a rank at all
from a script on standard input). Its inputs come in a pickle that this process writes into a private folder
(mkdtemp, 0700, removed after the run), its answer goes back as JSON beside it:

    rank-inputs.pkl      two pickles: this process's sys.path, then rank_main's arguments (the Plan, the cache
                         folder)
    result-<rank>.json   rank_main's result (rank 0: the metrics, or {"diverged": message})

One process per GPU on a GPU machine; elsewhere N CPU processes, each with its share of the cores. A rank
that dies ends the run (no restarts): the error names it, checkpoint.pt and last.pt are whole (every write
is atomic) and `--resume` continues from last.pt. One worker is the plain single-process path.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from faceclf.child import die_with_parent, python_command
from faceclf.config import RunConfig
from faceclf.dataset.cache import DecodedCache
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.preprocess import Preprocess
from faceclf.store.atomic import write_text_atomic
from faceclf.store.objects import Store
from faceclf.training.fit import EpochCallback, TrainingDiverged
from faceclf.training.loop import resolve_device
from faceclf.training.plan import Plan, plan_run
from faceclf.training.run import run_plan

log = logging.getLogger(__name__)

RUN_CACHE = "decoded"   # run_dir/decoded/<size>/: the shards of a run on a plain folder (removed at the end)
SPEC = "rank-inputs.pkl"  # in the ranks' private folder: what every rank runs on
RANK_ENTRY = "faceclf.training.launch:rank_entry"


class TrainingProcessFailed(RuntimeError):
    """A training process (rank) died or failed; the run folder keeps last.pt for --resume."""


def train_processes(plan: Plan, cache: DecodedCache | None = None) -> dict[str, Any]:
    """``run_plan`` in the plan's workers (DDP processes) on this machine; rank 0's metrics.

    Without ``cache`` the images are decoded once into run_dir/decoded/ first (removed after a finished run):
    every rank maps the same shard files."""
    own_cache = cache is None
    if own_cache:
        cache = DecodedCache(plan.run_dir / RUN_CACHE / str(plan.cfg.data.image_size),
                             Preprocess.from_config(plan.cfg.data))
        cache.verify()
        cache.add(plan.faceset, cache.missing(plan.faceset))
    result = launch(plan.workers, (plan, str(cache.folder)), plan.run_dir)
    if own_cache:
        shutil.rmtree(plan.run_dir / RUN_CACHE, ignore_errors=True)
    return result


def launch(n: int, args: tuple[Any, ...], run_dir: Path) -> dict[str, Any]:
    """Run ``rank_main(*args)`` in ``n`` processes with torch's elastic launcher; rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"faceclf-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    folder = Path(tempfile.mkdtemp(prefix="faceclf-ranks-"))  # 0700: no other user reads or swaps the pickle
    try:
        with open(folder / SPEC, "wb") as spec:
            pickle.dump(list(sys.path), spec)  # first, so a rank can import what the arguments need
            pickle.dump(args, spec)
        command = python_command(RANK_ENTRY, "faceclf-rank", str(os.getpid()), str(folder))
        log.info("training in %d processes (torch elastic launch, c10d rendezvous on localhost)", n)
        try:
            # A binary entrypoint: each rank is `python <flags> -c <boot> ...`, a plain subprocess.
            elastic_launch(config, command[0])(*command[1:])
        except ChildFailedError as err:
            raise TrainingProcessFailed(describe_failure(err, run_dir)) from None
        answer = folder / "result-0.json"
        if not answer.is_file():  # rank_entry writes it before it exits 0: something else ran or removed it
            raise TrainingProcessFailed(f"training process of rank 0 ended without a result ({answer} is missing)")
        out = json.loads(answer.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if isinstance(out, dict) and "diverged" in out:
        raise TrainingDiverged(out["diverged"])
    return out


def describe_failure(err: Any, run_dir: Path) -> str:
    """One paragraph: which rank failed and how, and where the run can resume from."""
    rank, failure = first_failure(err.failures)
    if failure is None:
        how = "failed"
    elif failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode}"
    history = run_dir / "history.csv"
    epochs = max(0, len(history.read_text().splitlines()) - 1) if history.is_file() else 0
    resume = (f"{run_dir / 'last.pt'} holds {epochs} finished epoch(s): rerun with --resume to continue"
              if (run_dir / "last.pt").is_file() else "no epoch had finished: rerun to start again")
    return f"training process of rank {rank} {how}; the other ranks were stopped and nothing was promoted. {resume}"


def first_failure(failures: dict[int, Any]) -> tuple[int | None, Any]:
    """The rank (and its ProcessFailure) that most likely failed first. The launcher records every rank that
    ended badly: the cause, the ranks that then lost their peer (they exit 1), and those it stopped itself
    with SIGTERM. So: a rank killed by another signal (SIGKILL: the OOM killer; SIGSEGV) first, then one
    that exited with a code, then a SIGTERMed one; within each the earliest recorded (whole seconds), then
    the lowest rank."""
    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        kind = 0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2
        return kind, failure.timestamp, rank

    return min(failures.items(), key=order) if failures else (None, None)


def rank_entry() -> None:
    """A rank's whole life (its argv: -c, name, faceclf's parent folder, the launcher's pid, the private
    folder): die with the launcher, take its sys.path, run ``rank_main`` on the inputs it wrote, and write
    the result beside them. An exception is written to torch's error file (``record``) and exits 1."""
    from torch.distributed.elastic.multiprocessing.errors import record

    launcher_pid, folder = sys.argv[3:5]
    die_with_parent(int(launcher_pid))  # a killed launcher (the OOM killer) leaves no rank training on
    record(_run_rank)(Path(folder))


def _run_rank(folder: Path) -> None:
    """``rank_main`` on the inputs in ``folder``; its result as ``folder``/result-<RANK>.json."""
    with open(folder / SPEC, "rb") as spec:
        sys.path[:] = pickle.load(spec)
        args = pickle.load(spec)  # written by the launcher a moment ago, in its 0700 folder
    result = rank_main(*args)
    write_text_atomic(folder / f"result-{os.environ['RANK']}.json", json.dumps(result))


def rank_main(plan: Plan, cache_folder: str) -> dict[str, Any]:
    """One rank: join the group the launcher set up, execute the plan, leave the group. Rank 0 returns the
    metrics."""
    from faceclf.training.distributed import init_from_env

    part = init_from_env(resolve_device(plan.cfg.training.device))
    logging.basicConfig(level=logging.INFO if part.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {part.rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_plan(plan, DecodedCache(Path(cache_folder), Preprocess.from_config(plan.cfg.data)))
    except TrainingDiverged as err:  # every rank agrees on it: the caller records a diverged night
        return {"diverged": str(err)}
    finally:
        torch.distributed.destroy_process_group()


def execute_plan(plan: Plan, cache: DecodedCache | None = None, store: Store | None = None,
                 on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Run ``plan`` on its engine: in this process, in DDP processes here (torchrun's launcher), or on Ray Train
    workers; the metrics of metrics.json. ``on_epoch`` (see ``fit``) is called in this process only."""
    if plan.engine == "ray":
        from faceclf.training.ray_train import train_on_ray

        return train_on_ray(plan, cache=cache, store=store)
    if plan.engine == "torchrun":
        return train_processes(plan, cache)
    return run_plan(plan, cache, on_epoch)


def run_training(data: FaceSet | str | Path, run_dir: str | Path, cfg: RunConfig | None = None, resume: bool = False,
                 version: str | None = None, cache: DecodedCache | None = None, store: Store | None = None,
                 on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train on ``data`` (a FaceSet, or a folder of class folders or of train/ val/ test/) into ``run_dir`` the
    way ``cfg`` asks, and return the metrics of metrics.json: planned once (faceclf.training.plan), then run on
    a Ray cluster (ray_address, or $FACECLF_RAY_ADDRESS), in ``workers`` DDP processes here, or in this process.

    ``resume`` continues from run_dir/last.pt with run_dir/config.json (``cfg`` is ignored). ``version`` names
    the model (default: a new time-sortable version). ``cache``: a decoded-image cache holding the FaceSet's
    images at the run's size. ``store``: the registry a warm start's version (``init_from``) comes from."""
    return execute_plan(plan_run(data, run_dir, cfg, resume=resume, version=version, store=store), cache, store,
                        on_epoch)
