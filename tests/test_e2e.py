"""End to end, as an operator runs it: a real Prefect server (SQLite, 127.0.0.1), a moto S3 server,
deployments from deployments/prefect.yaml, a process worker, and `prefect deployment run train/face`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

from conftest import FAST, LENIENT, Receiver, grouped, onnx_accuracy, tree, upload_faces

from faceclf.devtools.demo import local_stack
from faceclf.devtools.sample import generate_sample_faces
from faceclf.devtools.services import (
    deployment_runs,
    prefect_env,
    read_deployment,
    run_deployment,
    set_deployment_parameters,
    started_runs,
    wait_for_flow_run,
    wait_for_new_run,
)
from faceclf.store import registry


def incoming_gets(log: Path, bucket: str) -> int:
    """How many objects under incoming/ the S3 endpoint has served so far (from its access log)."""
    return log.read_text().count(f'"GET /{bucket}/incoming/')


def test_three_nights_through_the_deployment(tmp_path: Path) -> None:
    bucket = "faceclf-e2e"
    with local_stack(tmp_path / "stack", bucket=bucket) as stack:
        # The deployment is what prefect.yaml declares: nightly cron, one run at a time, our work pool.
        dep = read_deployment(stack.api_url, "train/face")
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in dep["schedules"]] == [("0 2 * * *", "UTC")]
        assert dep["work_pool_name"] == "faceclf"
        form = dep["parameter_openapi_schema"]  # what the UI's form is built from: the groups, with help texts
        assert list(form["properties"]) == ["bucket", "face_dir", "runs_dir", "data", "model", "training", "gate",
                                            "drift", "night", "quantization"], form["properties"]
        assert form["definitions"]["GateParams"]["properties"]["min_accuracy"]["description"]
        limit = dep.get("global_concurrency_limit") or {}
        assert limit.get("limit") == 1 or dep.get("concurrency_limit") == 1, dep
        assert read_deployment(stack.api_url, "score/face")["schedules"] == []

        face, s3_log = tmp_path / "face", stack.out / "logs" / "s3.log"
        params = {"face_dir": str(face), "runs_dir": str(tmp_path / "runs"), **LENIENT,
                  **{k: v for k, v in FAST.items() if k != "label_audit"}}  # deployed nights audit labels (default)
        store = stack.store

        # Night 1, started by the data: 160 images arrive, the watch flow counts them against the ingest logs and
        # emits faceclf.incoming.arrived, and train/face's trigger starts one night with the deployment's
        # parameters. A second poll before that night has ingested them announces nothing: exactly one night.
        set_deployment_parameters(stack.api_url, "train/face", grouped(**params))
        upload_faces(bucket, tmp_path / "night1", per_class=80, seed=11)
        watch = {"watch": {"min_new_images": 100}}
        stack.run("watch/incoming", watch)
        night1 = wait_for_new_run(stack.api_url, "train/face", set(), timeout=60)
        assert night1["created_by"]["type"] == "AUTOMATION", night1["created_by"]
        stack.run("watch/incoming", watch)
        assert wait_for_flow_run(stack.api_url, night1["id"], timeout=600)["state_type"] == "COMPLETED"
        assert [r["id"] for r in started_runs(stack.api_url, "train/face")] == [night1["id"]]
        champion = registry.read_champion(store)
        assert champion is not None
        model = tmp_path / "champion.onnx"
        registry.fetch_model(store, champion["version"], model, champion["model_sha256"])
        generate_sample_faces(tmp_path / "held-out", per_class=20, size=48, seed=99)
        assert onnx_accuracy(model, tmp_path / "held-out") >= 0.85
        split_before = tree(face)
        assert len(split_before) == 160

        # Night 2: no new images -> nothing downloaded from incoming/, no image changes split, and the
        # night ends after ingest: no new version, the champion untouched.
        gets = incoming_gets(s3_log, bucket)
        stack.run("train/face", grouped(**params))
        assert incoming_gets(s3_log, bucket) == gets
        assert tree(face) == split_before
        assert len(registry.list_versions(store)) == 1
        champion_2 = registry.read_champion(store)
        assert champion_2 == champion

        # Night 3: new images, a candidate that has barely trained (1 epoch at lr 1e-7: its random
        # init) -> worse than the champion on the same test set, rejected; champion unchanged.
        upload_faces(bucket, tmp_path / "night3", per_class=40, seed=33)
        known = {r["id"] for r in started_runs(stack.api_url, "train/face")}
        stack.run("watch/incoming", watch)  # 80 new, fewer than 100: no event, no night (the 02:00 one takes them)
        stack.run("train/face", grouped(**{**params, "min_accuracy": 0.0, "min_class_accuracy": 0.0,
                                           "epochs": 1, "learning_rate": 1e-7}))
        assert len({r["id"] for r in started_runs(stack.api_url, "train/face")} - known) == 1  # the one run by hand
        night3 = registry.list_versions(store)[-1]
        assert night3["gate_passed"] is False and not night3["has_model"]
        decision = json.loads(store.get_bytes(registry.version_key(night3["version"], "decision.json")))
        assert any("worse than champion" in r for r in decision["reasons"]), decision
        assert registry.read_champion(store) == champion_2

        # A deployment (or its schedule) still holding the old flat parameters: its run fails at once, naming the
        # new place of each. (Typed by hand, `prefect deployment run --param min_accuracy=...` is refused by
        # Prefect's CLI itself, which lists the groups.)
        old = wait_for_flow_run(stack.api_url, run_deployment(stack.api_url, "train/face", {
            "min_accuracy": 0.5, "drift_size_ks": 0.2, "epochs": 2}), timeout=300)
        message = (old.get("state") or {}).get("message") or ""
        assert old["state_type"] == "FAILED", message
        for moved in ("min_accuracy is now gate.min_accuracy", "drift_size_ks is now drift.size_ks",
                      "epochs is now training.epochs"):
            assert moved in message, message
        assert registry.read_champion(store) == champion_2 and len(registry.list_versions(store)) == 2

        # The champion watched between nights. `python3 -m flows.notify` saves the webhook and the automation that
        # sends degraded events. Scoring faces the champion was not trained for (grey, and one class only) moves
        # its predicted class shares: score/face records the estimate with the version and emits
        # faceclf.champion.degraded; the server's automation posts it to the webhook and train/face's second
        # trigger starts a night (nothing new: it ends after ingest).
        hook = Receiver()
        subprocess.run([sys.executable, "-m", "flows.notify", "-", "--allow-private-urls"], input=f"{hook.http}/hook",
                       text=True, check=True, capture_output=True, cwd=stack.root, env=prefect_env(stack.api_url, stack.home))
        generate_sample_faces(tmp_path / "shifted", per_class=60, size=48, seed=55)
        for p in sorted((tmp_path / "shifted" / "with_mask").iterdir()):
            grey = tmp_path / "grey" / f"{p.stem}.png"
            grey.parent.mkdir(exist_ok=True)
            ImageOps.grayscale(Image.open(p)).convert("RGB").save(grey)
            store.put_file(f"shifted/with_mask/{grey.name}", grey)
        known = {r["id"] for r in started_runs(stack.api_url, "train/face")}
        stack.run("score/face", {"source": "shifted/", "output": "predictions/shifted/predictions.csv"})
        watched = json.loads(store.get_bytes("predictions/shifted/predictions.json"))["monitor"]
        assert watched["n"] == 60 and watched["alarms"], watched
        estimate = registry.read_estimate(store, champion["version"])
        assert estimate and estimate["alarms"] == watched["alarms"] and estimate["source"] == "shifted/", estimate
        night = stack.triggered("train/face", known, timeout=300)
        assert night["created_by"]["type"] == "AUTOMATION" and len(registry.list_versions(store)) == 2
        deadline = time.monotonic() + 60
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.5)
        hook.server.shutdown()
        assert hook.received, "the automation sent no notification of the degraded champion"
        assert champion["version"] in hook.received[0]["title"] and "shifted/" in hook.received[0]["message"]

        # The champion scores a prefix on demand through score/face.
        stack.run("score/face", {"source": "incoming/", "output": "predictions/e2e/predictions.csv"})
        rows = store.get_bytes("predictions/e2e/predictions.csv").decode().splitlines()
        assert len(rows) == 1 + 160 + 80 and rows[0].startswith("path,predicted_class,")

        # The 02:00 cron stays the fallback beside the trigger: the scheduler has queued the next nights.
        cron = [r for r in deployment_runs(stack.api_url, "train/face") if r["state_type"] == "SCHEDULED"]
        assert any(r["expected_start_time"][11:16] == "02:00" for r in cron), cron
