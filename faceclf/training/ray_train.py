"""Training across machines with Ray Train (the optional extra ``faceclf[ray]``; only imported when used).

    train_on_ray(plan)    (a Plan of engine "ray": faceclf.training.plan, workers N)
        -> ray.init(address) ("local": a Ray instance on this machine)
        -> TorchTrainer(rank_loop, ScalingConfig(num_workers=N, use_gpu=<the cluster has GPUs>))
        -> each worker: Ray Train has joined it to the process group (gloo on CPU, NCCL on GPU); it reads
           the decoded-image shards (from the bucket's mirror when a store is given, else from the
           driver's cache folder, which then must be on a shared filesystem) and runs run_plan
        -> rank 0 reports its run folder as the Ray checkpoint; the driver copies it into run_dir

The training function is the one torchrun runs (faceclf.training.run.run_plan): same partition of each
epoch, same reduced validation metrics, rank 0 alone writes. Ray's results go under ``storage`` (default
run_dir's parent/.ray-train; for a multi-node cluster a shared path or s3:// URI, FACECLF_RAY_STORAGE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from faceclf.dataset.cache import DecodedCache, cache_folder, update_cache
from faceclf.dataset.preprocess import Preprocess
from faceclf.store.objects import Store, open_store
from faceclf.training.fit import TrainingDiverged
from faceclf.training.plan import Plan

log = logging.getLogger(__name__)

ADDRESS_ENV = "FACECLF_RAY_ADDRESS"
STORAGE_ENV = "FACECLF_RAY_STORAGE"
LOCAL = "local"
CONNECT_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster address does not answer."""


def check_address(address: str) -> None:
    """Fail in seconds, with one line, when a cluster address (host:port, ray://host:port) does not answer,
    instead of waiting for ray.init's own retries. "local" and "auto" are left to Ray."""
    if address in (LOCAL, "auto"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname or not parts.port:
        raise RayUnavailable(f"Ray address {address!r} is not host:port, ray://host:port, 'auto' or 'local'")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise RayUnavailable(f"Ray cluster at {address} does not answer ({err.strerror or err})") from None


def connect(address: str) -> Any:
    """The ray module, connected to ``address`` ("local": start a Ray instance on this machine)."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("Ray is not installed: pip install -e '.[ray]'") from None
    check_address(address)
    if not ray.is_initialized():
        ray.init(address=None if address == LOCAL else address, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    return ray


def train_on_ray(plan: Plan, cache: DecodedCache | None = None, store: Store | None = None,
                 storage: str | None = None) -> dict[str, Any]:
    """Execute ``plan`` (engine "ray") on its workers of the Ray cluster at ``plan.ray_address``; rank 0's
    metrics, with the run folder copied to the plan's run_dir (where a single-process run writes it).

    ``cache``: the night's decoded-image cache, already up to date (and mirrored to ``store``); without it
    the images are decoded here first (and mirrored when there is a store)."""
    ray = connect(plan.ray_address or LOCAL)
    run_dir = plan.run_dir.resolve()
    preset = Preprocess.from_config(plan.cfg.data)
    scratch = Path(tempfile.mkdtemp(prefix="faceclf-ray-", dir=run_dir.parent if run_dir.parent.exists() else None))
    try:
        if cache is None:  # the bucket's mirror is filled first: the workers read it
            cache, _ = update_cache(plan.faceset, scratch / "face", preset, store)
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        loop_config = {"plan": plan, "cache_folder": str(cache.folder),
                       "store": store.uri("") if store is not None else None,
                       "threads": plan.cfg.training.num_threads
                       or max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)}
        trainer = TorchTrainer(rank_loop, train_loop_config=loop_config,
                               scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=use_gpu),
                               run_config=RayRunConfig(name=f"faceclf-{plan.version}",
                                                       storage_path=storage or os.environ.get(STORAGE_ENV)
                                                       or str(run_dir.parent / ".ray-train")))
        log.info("training on Ray at %s: %d workers, %s", plan.ray_address, plan.workers, "GPU" if use_gpu else "CPU")
        result = trainer.fit()
        if result.error is not None or result.checkpoint is None:
            raise RuntimeError(f"Ray Train failed: {result.error or 'rank 0 reported no run folder'}")
        run_dir.mkdir(parents=True, exist_ok=True)
        result.checkpoint.to_directory(str(run_dir))
        if (result.metrics or {}).get("diverged"):
            raise TrainingDiverged(result.metrics["diverged"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return json.loads((run_dir / "metrics.json").read_text())


def worker_cache(config: dict[str, Any], preset: Preprocess) -> DecodedCache:
    """This worker's decoded-image cache: pulled from the bucket's mirror into a folder of this node when
    the driver had a store, else the driver's own folder (same machine or a shared filesystem)."""
    if config["store"] is None:
        return DecodedCache(Path(config["cache_folder"]), preset)
    node_face = Path(tempfile.gettempdir()) / "faceclf-ray-cache" / "face"
    cache = DecodedCache(cache_folder(node_face, preset.image_size), preset)
    cache.pull(open_store(config["store"]))
    cache.verify()
    return cache


def rank_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: train (Ray Train has initialised torch.distributed), then report rank 0's run
    folder as the checkpoint. Every worker reports once (Ray Train's report is a barrier)."""
    import ray.train
    import torch

    from faceclf.training.distributed import current
    from faceclf.training.run import run_plan

    plan: Plan = config["plan"]
    torch.set_num_threads(config["threads"])
    part = current()
    logging.basicConfig(level=logging.INFO if part.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {part.rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cache = worker_cache(config, Preprocess.from_config(plan.cfg.data))
    with tempfile.TemporaryDirectory(prefix="faceclf-run-") as tmp:
        try:  # into a folder of this node; rank 0's becomes the Ray checkpoint the driver copies to run_dir
            metrics = run_plan(dataclasses.replace(plan, run_dir=Path(tmp)), cache)
            report = {"best_epoch": metrics.get("best_epoch", -1)}
        except TrainingDiverged as err:
            report = {"diverged": str(err)}
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if part.is_main else None  # also a diverged run's
        ray.train.report(report, checkpoint=checkpoint)
