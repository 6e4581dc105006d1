"""Training in several processes on one machine, through PyTorch's elastic launcher (torchrun's own API).

    train_processes(data, run_dir, cfg, workers=N)
        -> the data decoded once into the decoded-image cache (each rank memory-maps the same shards)
        -> torch.distributed.launcher.elastic_launch: N processes, a c10d rendezvous on localhost
        -> each rank: join the group (gloo on CPU, NCCL on CUDA), faceclf.training.run.train_run
        -> rank 0's metrics; rank 0 alone wrote run_dir

A rank is a fresh interpreter, ``python -c`` with faceclf.child's boot code (never multiprocessing's spawn,
which re-ran a caller's script without the ``__main__`` guard in every rank, and could not start a rank at all
from a script on standard input). Its inputs come in a pickle that this process writes into a private folder
(mkdtemp, 0700, removed after the run), its answer goes back as JSON beside it:

    rank-inputs.pkl      two pickles: this process's sys.path, then rank_main's arguments (faceset, run_dir,
                         cfg dict, resume, version, cache folder)
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
from faceclf.config import RAY_ADDRESS_ENV, RunConfig, with_overrides
from faceclf.dataset.cache import DecodedCache
from faceclf.dataset.discover import discover
from faceclf.dataset.faceset import FaceSet, resolve_image_size
from faceclf.dataset.preprocess import Preprocess
from faceclf.store.atomic import write_text_atomic
from faceclf.store.objects import Store
from faceclf.training.fit import EpochCallback, TrainingDiverged, new_version
from faceclf.training.loop import resolve_device
from faceclf.training.run import resolve_run_config, train_run
from faceclf.training.warmstart import resolve_init

log = logging.getLogger(__name__)

RUN_CACHE = "decoded"   # run_dir/decoded/<size>/: the shards of a run on a plain folder (removed at the end)
SPEC = "rank-inputs.pkl"  # in the ranks' private folder: what every rank runs on
RANK_ENTRY = "faceclf.training.launch:rank_entry"


class TrainingProcessFailed(RuntimeError):
    """A training process (rank) died or failed; the run folder keeps last.pt for --resume."""


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(workers: int, device: torch.device) -> int:
    """How many processes to start: ``workers``, refused below 1, capped (with a warning) at one per GPU on
    CUDA and one per core on the CPU (more would only share the same cores)."""
    if workers < 1:
        raise ValueError(f"--nproc-per-node (workers) must be at least 1, got {workers}")
    limit, what = (torch.cuda.device_count(), "GPUs") if device.type == "cuda" else (usable_cores(), "CPU cores")
    if workers > limit:
        log.warning("%d training processes asked for, but this machine has %d %s: starting %d", workers, limit,
                    what, limit)
        return limit
    return workers


def train_processes(data: FaceSet | str | Path, run_dir: str | Path, cfg: RunConfig | None = None,
                    workers: int = 1, resume: bool = False, version: str | None = None,
                    cache: DecodedCache | None = None, store: Store | None = None,
                    on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """``train_run`` in ``workers`` DDP processes on this machine; returns rank 0's metrics. ``on_epoch`` (see
    ``fit``) is called in the single-process case only: ranks run in other processes.

    Without ``cache`` the images are decoded once into run_dir/decoded/ first (removed after a finished
    run). A warm start's weights are fetched here, once, not by every rank.
    """
    run_dir = Path(run_dir)
    cfg = resolve_run_config(run_dir, cfg or RunConfig(), resume)
    n = resolve_workers(cfg.training.workers if resume else workers, resolve_device(cfg.training.device))
    if n == 1:
        return train_run(data, run_dir, cfg, resume=resume, version=version, cache=cache, store=store,
                         on_epoch=on_epoch)
    run_dir.mkdir(parents=True, exist_ok=True)
    faceset = data if isinstance(data, FaceSet) else discover(data, cfg.data.split_fractions, cfg.data.decode_workers,
                                                              cfg.data.near_distance)
    faceset.require_every_class()
    cfg = resolve_image_size(cfg, faceset)
    preset = Preprocess.from_config(cfg.data)
    own_cache = cache is None
    if own_cache:  # decoded once here; every rank maps the same shard files
        cache = DecodedCache(run_dir / RUN_CACHE / str(preset.image_size), preset)
        cache.verify()
        cache.add(faceset, cache.missing(faceset))
    if cfg.training.init_from and not resume:
        cfg = with_overrides(cfg, init_from=str(resolve_init(cfg.training.init_from, store, run_dir)))
    if resolve_device(cfg.training.device).type == "cpu" and cfg.training.num_threads == 0:
        cfg = with_overrides(cfg, num_threads=max(1, usable_cores() // n))
    version = version or new_version()
    result = launch(n, (faceset, str(run_dir), cfg.to_dict(), resume, version, str(cache.folder)), run_dir)
    if own_cache:
        shutil.rmtree(run_dir / RUN_CACHE, ignore_errors=True)
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


def rank_main(faceset: FaceSet, run_dir: str, cfg_dict: dict[str, Any], resume: bool, version: str,
              cache_folder: str) -> dict[str, Any]:
    """One rank: join the group the launcher set up, train, leave the group. Rank 0 returns the metrics."""
    from faceclf.training.distributed import init_from_env

    cfg = RunConfig.from_dict(cfg_dict)
    device = resolve_device(cfg.training.device)
    part = init_from_env(device)
    logging.basicConfig(level=logging.INFO if part.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {part.rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cache = DecodedCache(Path(cache_folder), Preprocess.from_config(cfg.data))
        return train_run(faceset, run_dir, cfg, resume=resume, version=version, cache=cache)
    except TrainingDiverged as err:  # every rank agrees on it: the caller records a diverged night
        return {"diverged": str(err)}
    finally:
        torch.distributed.destroy_process_group()


def train(data: FaceSet | str | Path, run_dir: str | Path, cfg: RunConfig | None = None, resume: bool = False,
          version: str | None = None, cache: DecodedCache | None = None, store: Store | None = None,
          on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train the way ``cfg.train`` asks: on a Ray cluster (ray_address, or $FACECLF_RAY_ADDRESS), in
    ``workers`` DDP processes here, or in this process; returns the metrics of metrics.json."""
    cfg = cfg or RunConfig()
    address = cfg.training.ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
    if address:
        if resume:
            raise ValueError("--resume is not supported with a Ray address: rerun the Ray training, or resume "
                             "it on one machine without --ray-address")
        from faceclf.training.ray_train import train_on_ray

        return train_on_ray(address, data, run_dir, cfg, workers=cfg.training.workers, version=version, store=store,
                            cache=cache)
    return train_processes(data, run_dir, cfg, cfg.training.workers, resume=resume, version=version, cache=cache,
                           store=store, on_epoch=on_epoch)
