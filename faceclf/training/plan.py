"""A training run planned once: every "auto" and default resolved, the face set prepared, then executed.

    plan_run(data, run_dir, cfg)      -> Plan (RUN/config.json and RUN/plan.json written)
        the face set: discovered (a folder) or given (the night's), every class checked in every split
        image size:   "auto" -> the train images' median short side (at most 96, a multiple of the pooling)
        model:        classes and input size from the data
        device:       "auto" -> cuda or cpu;  workers: capped at one per GPU / core;  engine: process,
                      torchrun or ray;  CPU threads per torchrun rank
        class weights: "auto" -> balanced or none, from the train split's counts
        warm start:   init_from (a file, or a registry version fetched and sha256-checked) -> a local file
        data fingerprint, model version

In-process, torchrun's ranks and Ray Train's workers only execute a Plan (faceclf.training.run.run_plan);
none of them resolves anything again. ``faceclf train DATA --config RUN/config.json`` replays a run: its saved
config is already resolved, so the same data trains the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceclf.config import RAY_ADDRESS_ENV, RunConfig, imbalanced, with_overrides
from faceclf.dataset.discover import discover
from faceclf.dataset.faceset import FaceSet, resolve_image_size
from faceclf.store.atomic import write_json_atomic
from faceclf.store.objects import Store
from faceclf.training.fit import new_version
from faceclf.training.loop import resolve_device

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"   # in a run folder: the resolved RunConfig (what `--config` and `--resume` read)
PLAN_FILE = "plan.json"       # in a run folder: what the plan resolved beyond the config (engine, fingerprint...)
ENGINES = ("process", "torchrun", "ray")


@dataclass(frozen=True)
class Plan:
    """Everything a training run needs, decided before any process starts; never changed afterwards.

    ``cfg`` is the fully resolved config (image size, classes, device, workers, threads, class weighting), kept as
    its JSON text so that no caller can change it in place: every read is a fresh RunConfig. ``init_checkpoint``
    is the local file a warm start loads (``cfg.training.init_from`` keeps what was asked: a file or a version).
    ``version`` is None only for a resumed run, which continues under the version in its last.pt."""

    faceset: FaceSet
    config_json: str                 # RunConfig.to_dict() as JSON: what config.json holds
    run_dir: Path
    engine: str                      # one of ENGINES
    ray_address: str | None          # engine "ray": the cluster's address
    version: str | None
    resume: bool
    init_checkpoint: Path | None
    fingerprint: str

    @property
    def workers(self) -> int:
        """Training processes (DDP ranks) of this run."""
        return self.cfg.training.workers

    @property
    def cfg(self) -> RunConfig:
        """The resolved config: a fresh copy at every read (the plan's own never changes)."""
        return RunConfig.from_dict(json.loads(self.config_json))

    def summary(self) -> dict[str, Any]:
        """plan.json's content: what was resolved beyond config.json, in plain types."""
        cfg = self.cfg  # parsed once
        return {"engine": self.engine, "workers": cfg.training.workers, "device": cfg.training.device,
                "image_size": cfg.data.image_size, "classes": list(self.faceset.classes),
                "class_weighting": cfg.training.class_weighting, "version": self.version,
                "resume": self.resume, "init_checkpoint": str(self.init_checkpoint) if self.init_checkpoint else None,
                "fingerprint": self.fingerprint, "counts": self.faceset.counts()}


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def capped_workers(workers: int, device: str) -> int:
    """How many processes to start on this machine: ``workers``, refused below 1, capped (with a warning) at
    one per GPU on CUDA and one per core on the CPU (more would only share the same cores)."""
    import torch

    if workers < 1:
        raise ValueError(f"--nproc-per-node (workers) must be at least 1, got {workers}")
    limit, what = (torch.cuda.device_count(), "GPUs") if device == "cuda" else (usable_cores(), "CPU cores")
    if workers > limit:
        log.warning("%d training processes asked for, but this machine has %d %s: starting %d", workers, limit,
                    what, limit)
        return limit
    return workers


def weighting_for(faceset: FaceSet, weighting: str) -> str:
    """The class weighting a run uses: "auto" becomes "balanced" when the train split's largest class has more
    than IMBALANCE_RATIO times the images of its smallest, else "none"; the others stay."""
    if weighting != "auto":
        return weighting
    return "balanced" if imbalanced(list(faceset.counts()["train"].values())) else "none"


def saved_config(run_dir: Path) -> RunConfig:
    """The resolved config a run folder holds (RUN/config.json); FileNotFoundError naming it otherwise."""
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"cannot resume: {saved} does not exist (was {run_dir} a training run?)")
    return RunConfig.from_dict(json.loads(saved.read_text()))


def resolve_config(cfg: RunConfig, faceset: FaceSet) -> RunConfig:
    """``cfg`` with what depends on the data and this machine filled in: image size, classes, device, workers,
    CPU threads per rank and class weighting (the engine's address aside)."""
    cfg = resolve_image_size(cfg, faceset)
    device = resolve_device(cfg.training.device).type
    address = ray_address_of(cfg)
    workers = cfg.training.workers if address else capped_workers(cfg.training.workers, device)
    threads = cfg.training.num_threads
    if device == "cpu" and threads == 0 and workers > 1 and not address:  # each rank its share of the cores
        threads = max(1, usable_cores() // workers)
    return with_overrides(cfg, image_size=cfg.data.image_size, num_classes=len(faceset.classes), device=device,
                          workers=workers, num_threads=threads,
                          class_weighting=weighting_for(faceset, cfg.training.class_weighting))


def ray_address_of(cfg: RunConfig) -> str | None:
    """The Ray cluster a run trains on: its ray_address, else $FACECLF_RAY_ADDRESS; None: this machine."""
    return cfg.training.ray_address or os.environ.get(RAY_ADDRESS_ENV) or None


def engine_for(cfg: RunConfig, resume: bool) -> str:
    """process (one worker here), torchrun (several here) or ray (a cluster address); ValueError for a resume
    on Ray, which cannot continue a run."""
    if ray_address_of(cfg):
        if resume:
            raise ValueError("--resume is not supported with a Ray address: rerun the Ray training, or resume "
                             "it on one machine without --ray-address")
        return "ray"
    return "torchrun" if cfg.training.workers > 1 else "process"


def plan_run(data: FaceSet | str | Path, run_dir: str | Path, cfg: RunConfig | None = None, resume: bool = False,
             version: str | None = None, store: Store | None = None) -> Plan:
    """Plan a training run on ``data`` (a FaceSet, or a folder hashed once into one) into ``run_dir``, and save it
    there (config.json, plan.json). With ``resume`` the run's saved config is used whole (its learning-rate
    schedule was planned for its epoch count) and ``cfg`` is ignored. ``store``: the registry a warm start's
    model version is fetched from."""
    run_dir = Path(run_dir)
    cfg = saved_config(run_dir) if resume else copy.deepcopy(cfg or RunConfig())
    engine = engine_for(cfg, resume)
    if engine == "ray":  # an address that does not answer fails before any work
        from faceclf.training.ray_train import check_address

        check_address(ray_address_of(cfg))  # type: ignore[arg-type]
    faceset = data if isinstance(data, FaceSet) else discover(data, cfg.data.split_fractions, cfg.data.decode_workers,
                                                              cfg.data.near_distance)
    faceset.require_every_class()
    cfg = resolve_config(cfg, faceset)
    run_dir.mkdir(parents=True, exist_ok=True)
    init = None
    if cfg.training.init_from and not resume:  # fetched once, here: not by every rank
        from faceclf.training.warmstart import resolve_init

        init = resolve_init(cfg.training.init_from, store, run_dir)
    plan = Plan(faceset=faceset, config_json=json.dumps(cfg.to_dict()), run_dir=run_dir, engine=engine,
                ray_address=ray_address_of(cfg), version=None if resume else version or new_version(), resume=resume,
                init_checkpoint=init, fingerprint=faceset.fingerprint())
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_dict())
    write_json_atomic(run_dir / PLAN_FILE, plan.summary())
    log.info("planned %s: %s engine, %d worker(s) on %s, %d px, classes %s, class weighting %s", run_dir, engine,
             plan.workers, cfg.training.device, cfg.data.image_size, list(faceset.classes),
             cfg.training.class_weighting)
    return plan
