"""The README's first command: a real night on this machine with no cloud account.

It starts an S3 endpoint on 127.0.0.1 (moto server mode) and a Prefect server (SQLite), deploys
deployments/prefect.yaml, starts a worker, uploads a face set into incoming/, runs `watch/incoming`, whose
event starts the `train/face` night through its deployment trigger, scores with the promoted model through `score/face`, and says where the
model, report and predictions are, with the two flow runs' pages in the Prefect UI. With ``ui`` the
Prefect UI is on, and after the night the UI, the S3 endpoint and the worker stay up until Ctrl-C.
The end-to-end test drives the same ``LocalStack``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import faceclf
from faceclf.config import MIN_ACCURACY, MIN_CLASS_ACCURACY, WATCH_MIN_NEW_IMAGES, GateConfig, option, require_at_least
from faceclf.dataset.layout import find_classes, list_images
from faceclf.devtools.services import (
    LOCAL_S3_ENV,
    flow_run_ui_url,
    local_s3_env,
    moto_s3_server,
    pause_deployment,
    prefect_cli,
    prefect_server,
    prefect_ui_url,
    prefect_worker,
    set_deployment_parameters,
    started_runs,
    wait_for_flow_run,
    wait_for_new_run,
)
from faceclf.serving.monitor import brief
from faceclf.store import registry
from faceclf.store.local_paths import ALLOW_PATHS_ENV
from faceclf.store.s3 import S3Store, s3_client

log = logging.getLogger(__name__)

BUCKET = "faceclf-demo"
POOL = "faceclf"
SAMPLE_PER_CLASS = 150  # generated faces per class when no folder is given
RUN_ID = re.compile(r"UUID:\s*([0-9a-f-]{36})")
READY = "press Ctrl-C to stop"  # the last line `faceclf demo --ui` prints once everything is up


@dataclass
class DemoConfig:
    """`faceclf demo`'s options: where it writes, the night's training length and gate, and the Prefect UI."""

    out: str = option("faceclf-demo", "where the run, model and predictions go")
    epochs: int | None = option(None, "epochs the night trains for (default: the train flow's)", parse=int)
    min_accuracy: float = option(MIN_ACCURACY, "the night's gate: the test accuracy a candidate needs to be promoted")
    min_class_accuracy: float = option(MIN_CLASS_ACCURACY, "the night's gate: the test accuracy every class needs "
                                       "(0 and 0 promote whatever trains: the rest of the night runs on any set)")
    ui: bool = option(False, "start the Prefect UI, and after the night keep it, the S3 endpoint and the worker "
                             "up until Ctrl-C (the flow runs' graphs, report and plots)")

    def __post_init__(self) -> None:
        if self.epochs is not None:
            require_at_least(self, 1, "epochs")
        GateConfig(self.min_accuracy, self.min_class_accuracy)  # ValueError outside [0, 1]


def repo_root() -> Path:
    """The checkout that holds deployments/prefect.yaml and flows/ (faceclf is installed from it with -e)."""
    root = Path(faceclf.__file__).resolve().parents[1]
    if not (root / "deployments" / "prefect.yaml").is_file() or not (root / "flows").is_dir():
        raise FileNotFoundError(f"{root} has no deployments/prefect.yaml and flows/: run the demo from a "
                                "checkout installed with `pip install -e .`")
    return root


def choose_data(folder: str | Path | None, out: Path) -> Path:
    """The face set to upload: the folder named, else face/ if it holds images, else generated sample faces."""
    if folder is not None:
        find_classes(Path(folder))  # a clear error for a folder without class folders
        return Path(folder)
    face = repo_root() / "face"
    if face.is_dir() and list_images(face):
        find_classes(face)
        return face
    from faceclf.devtools.sample import generate_sample_faces

    sample = out / "sample-faces"
    if not (sample.is_dir() and list_images(sample)):
        log.info("no folder given and face/ is empty: generating %d sample faces per class in %s", SAMPLE_PER_CLASS, sample)
        generate_sample_faces(sample, per_class=SAMPLE_PER_CLASS)
    return sample


def upload_incoming(store: S3Store, data: Path) -> int:
    """Put data/<class>/<file> at incoming/<class>/<file>; returns how many objects."""
    n = 0
    for cls in find_classes(data):
        for p in list_images(data / cls):
            store.put_file(f"incoming/{cls}/{p.relative_to(data / cls).as_posix()}", p)
            n += 1
    return n


class FlowRunFailed(RuntimeError):
    """A flow run of ``deployment`` that ended other than COMPLETED; ``flow_run`` is its JSON."""

    def __init__(self, message: str, deployment: str, flow_run: dict[str, Any]) -> None:
        super().__init__(message)
        self.deployment, self.flow_run = deployment, flow_run


@dataclass
class LocalStack:
    """Handles on the running local services; methods run deployments the way a user does."""

    root: Path
    out: Path
    api_url: str
    s3_endpoint: str
    bucket: str
    home: Path

    @property
    def store(self) -> S3Store:
        return S3Store(self.bucket)

    @functools.cached_property
    def ui_url(self) -> str:
        """The Prefect UI's home page (it answers only with ``local_stack(ui=True)``)."""
        return prefect_ui_url(self.api_url)

    def flow_run_url(self, flow_run: dict[str, Any]) -> str:
        """The Prefect UI's page of ``flow_run`` (as ``run`` returns it)."""
        return flow_run_ui_url(self.ui_url, flow_run["id"])

    def run(self, deployment: str, parameters: dict[str, Any] | None = None, timeout: float = 900) -> dict[str, Any]:
        """`prefect deployment run NAME --param k=v ...`, then wait for the flow run to end; returns it."""
        args = ["deployment", "run", deployment]
        for k, v in (parameters or {}).items():
            args += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        out = prefect_cli(args, self.api_url, self.home, cwd=self.root).stdout
        match = RUN_ID.search(out)
        if not match:
            raise RuntimeError(f"could not find the flow run id in `prefect {' '.join(args)}` output:\n{out}")
        return self.finished(deployment, match.group(1), timeout)

    def triggered(self, deployment: str, known: set[str], timeout: float = 900) -> dict[str, Any]:
        """Wait for a run of ``deployment`` that an automation (a deployment trigger) creates, one whose id is not
        in ``known``, then for it to end; returns it."""
        return self.finished(deployment, wait_for_new_run(self.api_url, deployment, known, timeout=60)["id"], timeout)

    def finished(self, deployment: str, flow_run_id: str, timeout: float) -> dict[str, Any]:
        """The flow run once it has ended COMPLETED; FlowRunFailed naming its state and message otherwise."""
        run = wait_for_flow_run(self.api_url, flow_run_id, timeout)
        if run["state_type"] != "COMPLETED":
            raise FlowRunFailed(f"{deployment} flow run {run['name']} ended {run['state_type']}: "
                                f"{(run.get('state') or {}).get('message')}; see {self.out / 'logs' / 'worker.log'}",
                                deployment, run)
        return run


@contextlib.contextmanager
def local_stack(out: Path, bucket: str = BUCKET, ui: bool = False) -> Iterator[LocalStack]:
    """Start S3 (moto) and Prefect (its UI too with ``ui``), create the bucket and the work pool, deploy (the
    watch/incoming poll paused: its caller runs it when its images are up), start a worker."""
    root, out = repo_root(), out.resolve()
    logs, home = out / "logs", out / "prefect-home"
    logs.mkdir(parents=True, exist_ok=True)
    with moto_s3_server(logs / "s3.log") as s3, local_s3_env(s3), \
            prefect_server(home, logs / "prefect-server.log", ui=ui) as api:
        s3_client().create_bucket(Bucket=bucket)
        worker_env = {**LOCAL_S3_ENV, "AWS_ENDPOINT_URL": s3, "FACECLF_BUCKET": bucket, "FACECLF_ROOT": str(root),
                      "PREFECT_LOGGING_EXTRA_LOGGERS": "faceclf",
                      # the flows run in root; their face/, runs/ and outputs are in out (and where the caller allows)
                      ALLOW_PATHS_ENV: os.pathsep.join(filter(None, [os.environ.get(ALLOW_PATHS_ENV), str(out)]))}
        prefect_cli(["work-pool", "create", POOL, "--type", "process"], api, home, cwd=root)
        prefect_cli(["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], api, home, cwd=root,
                    env={"FACECLF_ROOT": str(root)})
        pause_deployment(api, "watch/incoming")  # its 5-minute poll is run by hand here, when the images are up
        with prefect_worker(POOL, api, home, cwd=root, env=worker_env, log_path=logs / "worker.log"):
            yield LocalStack(root, out, api, s3, bucket, home)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C (SIGINT) does, so the services' ``finally`` blocks stop
    them: each runs in a session of its own, which a signal to the demo alone does not reach. Both
    handlers are restored on exit. Outside the main thread (where no handler can be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def wait_for_ctrl_c(ready: str) -> None:
    """Print ``ready``, then block until SIGINT or SIGTERM (see ``sigterm_as_ctrl_c``); one that comes as
    soon as ``ready`` is out counts too. Later ones are only acknowledged: a second Ctrl-C must not cut
    short the stopping of the services, which would leave them running."""
    try:
        print(ready, flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass

    def stopping(signum: int, frame: object) -> None:
        print("still stopping the services...", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopping)
    print("stopping the worker, the Prefect server and the S3 endpoint...", flush=True)


def where_to_look(stack: LocalStack, urls: dict[str, str], ui: bool) -> str:
    """Where the night and the scoring run are in the Prefect UI, and for how long those pages open."""
    runs = "".join(f"\n  {name:<11} {url}" for name, url in urls.items())
    if not ui:
        return ("The flow runs in the Prefect UI (these pages open only while a demo's Prefect server runs with "
                "its UI: this one runs without it and stops when the demo ends; `faceclf demo --ui` keeps the UI "
                "up until Ctrl-C):" + runs)
    return (f"Prefect UI    {stack.ui_url}\nFlow runs (graph, logs, report, plots, progress):{runs}\n"
            f"S3 endpoint   {stack.s3_endpoint} (bucket {stack.bucket}; the plots in the UI are links to it)\n"
            f"The Prefect UI, the S3 endpoint and the worker stay up (train/face's nightly schedule and watch/incoming's poll are paused); "
            f"{READY}.")


def run_demo(folder: str | Path | None, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """One night through `train/face`, then `score/face` on incoming/; copies the results into ``cfg.out``
    (the result JSON too: results/demo.json). With ``cfg.ui``, then waits for Ctrl-C (or SIGTERM) with
    the Prefect UI, the S3 endpoint (same port: the UI's plots are presigned links to it) and the worker up."""
    cfg = cfg or DemoConfig()
    out = Path(cfg.out).resolve()
    data = choose_data(folder, out)
    params: dict[str, Any] = {"face_dir": str(out / "face"), "runs_dir": str(out / "runs"),
                              "gate": {"min_accuracy": cfg.min_accuracy, "min_class_accuracy": cfg.min_class_accuracy}}
    if cfg.epochs:
        params["training"] = {"epochs": cfg.epochs}
    with sigterm_as_ctrl_c(), local_stack(out, ui=cfg.ui) as stack:
        urls: dict[str, str] = {}  # deployment -> its flow run's page in the UI, as the runs end
        try:
            result = night_and_score(stack, data, params, urls)
        except FlowRunFailed as exc:
            urls[exc.deployment] = stack.flow_run_url(exc.flow_run)
            if cfg.ui:  # the UI is where to see why: keep it up, then fail as without --ui
                print(exc)
                keep_up(stack, urls)
            raise
        result.update({"flow_runs": urls, "prefect_ui": stack.ui_url if cfg.ui else None,
                       "bucket_on_this_run": f"s3://{stack.bucket} at {stack.s3_endpoint} "
                                             f"({'until Ctrl-C' if cfg.ui else 'gone when the demo ends'})"})
        (out / "results" / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
        if not cfg.ui:
            print(where_to_look(stack, urls, ui=False))
            print(json.dumps(result, indent=2), flush=True)
        else:
            print(json.dumps(result, indent=2))
            keep_up(stack, urls)
    return result


def keep_up(stack: LocalStack, urls: dict[str, str]) -> None:
    """Say where to look, then wait for Ctrl-C with the services up. Left running, the 02:00 UTC schedule
    would start a night with the deployment's defaults (the checkout's face/ and runs/, which the next
    `faceclf demo` would then train on), so it is paused first."""
    pause_deployment(stack.api_url, "train/face")
    wait_for_ctrl_c(where_to_look(stack, urls, ui=True))


def night_and_score(stack: LocalStack, data: Path, params: dict[str, Any], urls: dict[str, str]) -> dict[str, Any]:
    """Upload ``data`` to incoming/, run `train/face` with ``params``, then `score/face` with the champion;
    copies the night's files into stack.out/results/ and returns what the demo reports. ``urls`` gets each
    flow run's page in the Prefect UI as it ends (COMPLETED; otherwise FlowRunFailed says which)."""
    out = stack.out
    set_deployment_parameters(stack.api_url, "train/face", params)  # what a triggered night runs with
    known = {r["id"] for r in started_runs(stack.api_url, "train/face")}
    n = upload_incoming(stack.store, data)
    log.info("uploaded %d images from %s to s3://%s/incoming/ on %s; the watch flow counts them and its event "
             "starts the night", n, data, stack.bucket, stack.s3_endpoint)
    watch = stack.run("watch/incoming", {"watch": {"min_new_images": min(n, WATCH_MIN_NEW_IMAGES)}})
    urls["watch/incoming"] = stack.flow_run_url(watch)
    night_run = stack.triggered("train/face", known)
    log.info("night %s started by the arrivals event (deployment trigger) has ended", night_run["name"])
    urls["train/face"] = stack.flow_run_url(night_run)
    champion = registry.read_champion(stack.store)
    versions = registry.list_versions(stack.store)
    night = versions[-1]["version"]
    files = {name: out / "results" / name for name in ("report.md", "decision.json", "metrics.json")}
    for name, path in files.items():
        stack.store.download(registry.version_key(night, name), path)
    by = night_run.get("created_by") or {}
    result: dict[str, Any] = {"data": str(data), "uploaded": n, "night": night,
                              "night_started_by": f"{by.get('type', '?').lower()} {by.get('display_value', '')}".strip(),
                              "promoted": bool(champion and champion["version"] == night),
                              "report": str(files["report.md"]), "decision": str(files["decision.json"])}
    if champion:
        stack.store.download(champion["model_key"], out / "results" / "model.onnx")
        score = stack.run("score/face", {"source": "incoming/", "output": "predictions/demo/predictions.csv"})
        urls["score/face"] = stack.flow_run_url(score)
        stack.store.download("predictions/demo/predictions.csv", out / "results" / "predictions.csv")
        watched = json.loads(stack.store.get_bytes("predictions/demo/predictions.json")).get("monitor") or {}
        result.update({"champion": champion["version"], "model": str(out / "results" / "model.onnx"),
                       "predictions": str(out / "results" / "predictions.csv"),
                       "champion_estimate": brief(watched) if watched else None})
    metrics = json.loads(files["metrics.json"].read_text())
    result["test_accuracy"] = metrics["test"]["accuracy"]
    result["test_per_class_accuracy"] = metrics["test"]["per_class_accuracy"]
    calibration = metrics.get("calibration") or {}
    if calibration:  # the temperature the exported model's probabilities are calibrated with, and its effect
        result["calibration"] = {"temperature": calibration["temperature"],
                                 "test_ece_before_after": [calibration["test"]["ece_before"],
                                                           calibration["test"]["ece_after"]]}
    return result
