"""The README's first command: a real night on this machine with no cloud account.

It starts an S3 endpoint on 127.0.0.1 (moto server mode) and a Prefect server (SQLite), uploads a
face set into incoming/, deploys deployments/prefect.yaml, starts a worker, runs `train/face`
through the deployment, scores with the promoted model through `score/face`, and says where the
model, report and predictions are. The end-to-end test drives the same ``LocalStack``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import faceclf
from faceclf.dataset.layout import find_classes, list_images
from faceclf.devtools.services import (
    LOCAL_S3_ENV,
    local_s3_env,
    moto_s3_server,
    prefect_cli,
    prefect_server,
    prefect_worker,
    wait_for_flow_run,
)
from faceclf.store import registry
from faceclf.store.s3 import S3Store, s3_client

log = logging.getLogger(__name__)

BUCKET = "faceclf-demo"
POOL = "faceclf"
SAMPLE_PER_CLASS = 150  # generated faces per class when no folder is given
RUN_ID = re.compile(r"UUID:\s*([0-9a-f-]{36})")


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

    def run(self, deployment: str, parameters: dict[str, Any] | None = None, timeout: float = 900) -> dict[str, Any]:
        """`prefect deployment run NAME --param k=v ...`, then wait for the flow run to end; returns it."""
        args = ["deployment", "run", deployment]
        for k, v in (parameters or {}).items():
            args += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        out = prefect_cli(args, self.api_url, self.home, cwd=self.root).stdout
        match = RUN_ID.search(out)
        if not match:
            raise RuntimeError(f"could not find the flow run id in `prefect {' '.join(args)}` output:\n{out}")
        run = wait_for_flow_run(self.api_url, match.group(1), timeout)
        if run["state_type"] != "COMPLETED":
            raise RuntimeError(f"{deployment} flow run {run['name']} ended {run['state_type']}: "
                               f"{(run.get('state') or {}).get('message')}; see {self.out / 'logs' / 'worker.log'}")
        return run


@contextlib.contextmanager
def local_stack(out: Path, bucket: str = BUCKET) -> Iterator[LocalStack]:
    """Start S3 (moto) and Prefect, create the bucket and the work pool, deploy, start a worker."""
    root, out = repo_root(), out.resolve()
    logs, home = out / "logs", out / "prefect-home"
    logs.mkdir(parents=True, exist_ok=True)
    with moto_s3_server(logs / "s3.log") as s3, local_s3_env(s3), \
            prefect_server(home, logs / "prefect-server.log") as api:
        s3_client().create_bucket(Bucket=bucket)
        worker_env = {**LOCAL_S3_ENV, "AWS_ENDPOINT_URL": s3, "FACECLF_BUCKET": bucket, "FACECLF_ROOT": str(root),
                      "PREFECT_LOGGING_EXTRA_LOGGERS": "faceclf"}
        prefect_cli(["work-pool", "create", POOL, "--type", "process"], api, home, cwd=root)
        prefect_cli(["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], api, home, cwd=root,
                    env={"FACECLF_ROOT": str(root)})
        with prefect_worker(POOL, api, home, cwd=root, env=worker_env, log_path=logs / "worker.log"):
            yield LocalStack(root, out, api, s3, bucket, home)


def run_demo(folder: str | Path | None, out: str | Path, epochs: int | None = None) -> dict[str, Any]:
    """One night through `train/face`, then `score/face` on incoming/; copies the results into ``out``."""
    out = Path(out).resolve()
    data = choose_data(folder, out)
    params: dict[str, Any] = {"face_dir": str(out / "face"), "runs_dir": str(out / "runs")}
    if epochs:
        params["epochs"] = epochs
    with local_stack(out) as stack:
        n = upload_incoming(stack.store, data)
        log.info("uploaded %d images from %s to s3://%s/incoming/ on %s", n, data, stack.bucket, stack.s3_endpoint)
        stack.run("train/face", params)
        champion = registry.read_champion(stack.store)
        versions = registry.list_versions(stack.store)
        night = versions[-1]["version"]
        files = {name: out / "results" / name for name in ("report.md", "decision.json", "metrics.json")}
        for name, path in files.items():
            stack.store.download(registry.version_key(night, name), path)
        result: dict[str, Any] = {"data": str(data), "uploaded": n, "night": night,
                                  "promoted": bool(champion and champion["version"] == night),
                                  "report": str(files["report.md"]), "decision": str(files["decision.json"]),
                                  "bucket_on_this_run": f"s3://{stack.bucket} at {stack.s3_endpoint} (gone when the demo ends)"}
        if champion:
            stack.store.download(champion["model_key"], out / "results" / "model.onnx")
            stack.run("score/face", {"source": "incoming/", "output": "predictions/demo/predictions.csv"})
            stack.store.download("predictions/demo/predictions.csv", out / "results" / "predictions.csv")
            result.update({"champion": champion["version"], "model": str(out / "results" / "model.onnx"),
                           "predictions": str(out / "results" / "predictions.csv")})
        metrics = json.loads(files["metrics.json"].read_text())
        result["test_accuracy"] = metrics["test"]["accuracy"]
        result["test_per_class_accuracy"] = metrics["test"]["per_class_accuracy"]
    print(json.dumps(result, indent=2))
    return result
