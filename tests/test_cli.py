"""The `faceclf` command end to end, as a user runs it (a real subprocess each time)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

TINY = ["--image-size", "32", "--channels", "8", "16", "--fc-hidden", "32", "--batch-size", "16", "--lr", "5e-3"]
# The demo's gate wide open: its night promotes whatever trains, so the rest of the night (export, score)
# runs whatever accuracy this CPU kind reaches (bf16 and fp32 machines train differently).
OPEN_GATE = ["--min-accuracy", "0", "--min-class-accuracy", "0"]
FLOW_RUN_URL = re.compile(r"(http://127\.0\.0\.1:\d+)/(v2/)?runs/flow-run/[0-9a-f-]{36}")  # V2 UI or V1


def faceclf(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "faceclf", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"faceclf {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_evaluate_export_score(faces: Path, tmp_path: Path) -> None:
    run, model, pred = tmp_path / "run", tmp_path / "model.onnx", tmp_path / "pred.csv"
    out = faceclf("train", str(faces), "--out", str(run), "--epochs", "5", *TINY)
    trained = json.loads(out.stdout)
    assert trained["device"] == "cpu" and (run / "checkpoint.pt").is_file()

    ev = json.loads(faceclf("evaluate", str(run / "checkpoint.pt"), str(faces)).stdout)
    assert ev == json.loads((run / "metrics.json").read_text())["test"]  # same hash split, same numbers

    gate = faceclf("evaluate", str(run / "checkpoint.pt"), str(faces), "--min-accuracy", "1.01", check=False)
    assert gate.returncode == 1 and "quality gate failed: accuracy" in gate.stderr

    exported = json.loads(faceclf("export", str(run / "checkpoint.pt"), "--out", str(model)).stdout)
    assert exported["max_abs_diff"] < 1e-4

    scored = faceclf("score", str(model), str(faces), "--out", str(pred))
    assert "images/s on CPUExecutionProvider" in scored.stdout
    with open(pred, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 123 and not any(r["error"] for r in rows)
    right = sum(Path(r["path"]).parent.name == r["predicted_class"] for r in rows)
    assert right / len(rows) > 0.8


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = faceclf("train", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert "faceclf train: error: data folder" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = faceclf("export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx"), check=False)
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_ui_stays_up_until_ctrl_c(faces: Path, tmp_path: Path) -> None:
    """`faceclf demo FOLDER --ui`: local S3 + Prefect, watch/incoming whose event starts train/face, then score/face, on the
    named folder; after the night the Prefect UI, the S3 endpoint behind the plots' presigned links and the
    worker stay up; Ctrl-C (SIGINT) stops them all and the demo exits 0. (Without --ui, on the generated
    faces, CI runs the demo itself: .ci/run.)"""
    import queue
    import signal
    import threading
    import urllib.request

    import psutil

    from faceclf.devtools.demo import READY
    from faceclf.devtools.services import api_request

    def get(url: str) -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers={"Accept": "text/html,*/*"})  # as a browser asks
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()

    argv = [sys.executable, "-m", "faceclf", "demo", str(faces), "--out", str(tmp_path / "demo"), "--epochs", "1",
            *OPEN_GATE, "--ui"]
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue[str | None] = queue.Queue()  # stdout's lines, then None at its end

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_stdout, daemon=True).start()
    children: list[psutil.Process] = []
    try:
        printed = ""
        while READY not in printed:
            line = lines.get(timeout=600)
            assert line is not None, f"the demo ended without {READY!r}:\n{printed}\n" + \
                (tmp_path / "stderr.log").read_text()[-3000:]
            printed += line
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # S3 endpoint, Prefect server, worker (and what they started)
        result = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
        assert result == json.loads((tmp_path / "demo" / "results" / "demo.json").read_text())
        assert result["uploaded"] == 123 and result["data"] == str(faces)
        assert Path(result["report"]).read_text().startswith(f"# faceclf night: model {result['night']}")
        assert json.loads(Path(result["decision"]).read_text())["promote"] is True
        assert result["promoted"] and result["champion"] == result["night"]
        assert Path(result["model"]).stat().st_size > 0
        with open(result["predictions"], newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 123 and {r["model_version"] for r in rows} == {result["night"]}
        assert not any(r["error"] for r in rows)
        assert list(result["flow_runs"]) == ["watch/incoming", "train/face", "score/face"]
        assert result["night_started_by"].startswith("automation ")  # the arrivals event's deployment trigger
        night_url = result["flow_runs"]["train/face"]
        assert FLOW_RUN_URL.fullmatch(night_url) and night_url in printed.split("}")[-1]
        assert proc.poll() is None  # still up after printing

        # The UI serves its home and the night's page (the page's app then reads /api).
        home = result["prefect_ui"]
        assert night_url.startswith(home) and f"Prefect UI    {home}" in printed
        for url in (home, night_url, result["flow_runs"]["score/face"]):
            status, body = get(url)
            assert status == 200 and b"<html" in body.lower()
        # The plots are image artifacts of the night: presigned links to the S3 endpoint, which still answers.
        night_id = night_url.rsplit("/", 1)[1]
        api_url = FLOW_RUN_URL.fullmatch(night_url).group(1) + "/api"
        images = api_request(api_url, "POST", "artifacts/filter",
                             {"artifacts": {"flow_run_id": {"any_": [night_id]}, "type": {"any_": ["image"]}}})
        assert {a["key"] for a in images} >= {"face-history", "face-confusion-matrix"}
        for artifact in images:
            status, body = get(artifact["data"])
            assert status == 200 and body.startswith(b"\x89PNG")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in children:  # a failed run must not leave its services behind either
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_killed_training_resumes_to_the_uninterrupted_result(faces: Path, tmp_path: Path) -> None:
    """SIGKILL a real `faceclf train` mid-run; `--resume` must end exactly where a clean run ends."""
    import os
    import signal
    import time

    args = [*TINY, "--epochs", "12", "--patience", "100"]
    faceclf("train", str(faces), "--out", str(tmp_path / "clean"), *args)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "faceclf", "train", str(faces), "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"

    faceclf("train", str(faces), "--out", str(run), "--resume")

    def rows(r: Path) -> list[tuple[str, str, str]]:
        with open(r / "history.csv", newline="") as f:
            return [(x["epoch"], x["train_loss"], x["val_loss"]) for x in csv.DictReader(f)]

    assert rows(run) == rows(tmp_path / "clean") and len(rows(run)) == 12
    assert not list(run.glob(".*.tmp"))  # a temp file the kill left behind is cleared by the resumed run
    assert json.loads((run / "metrics.json").read_text())["test"] == \
        json.loads((tmp_path / "clean" / "metrics.json").read_text())["test"]


def test_ingest_command_prints_the_summary(faces: Path, tmp_path: Path) -> None:
    """`faceclf ingest SOURCE DEST` on a local folder with the bucket layout."""
    import shutil

    shutil.copytree(faces, tmp_path / "bucket" / "incoming")
    (tmp_path / "bucket" / "incoming" / "with_mask" / "broken.jpg").write_bytes(b"<html>oops</html>")
    first = json.loads(faceclf("ingest", str(tmp_path / "bucket"), str(tmp_path / "face")).stdout)
    assert (first["listed"], first["new"], first["duplicates"], first["quarantined"]) == (124, 120, 3, 1)
    assert "not an image" in first["quarantine"][0]["reason"]
    assert len(list((tmp_path / "face").rglob("*.*"))) == 120
    again = json.loads(faceclf("ingest", str(tmp_path / "bucket"), str(tmp_path / "face")).stdout)
    assert (again["new"], again["skipped"]) == (0, 124)


def test_models_list_and_promote(trained_run: Path, tmp_path: Path) -> None:
    """Two versions in a local registry; `models promote` moves champion.json (a manual rollback)."""
    from faceclf.serving.export import export_onnx
    from faceclf.store import registry
    from faceclf.store.objects import LocalStore

    store = LocalStore(tmp_path / "bucket")
    model = export_onnx(trained_run / "checkpoint.pt", tmp_path / "model.onnx").path
    for version in ("20261101T020000Z-aaaaaa", "20261102T020000Z-bbbbbb"):
        interval = {"value": 0.9, "n": 111, "low": 0.8311, "high": 0.9452}
        (tmp_path / "decision.json").write_text(json.dumps({"promote": True, "candidate_accuracy": 0.9,
                                                            "candidate": {"accuracy": interval}}))
        registry.publish_version(store, version, {"model.onnx": model, "decision.json": tmp_path / "decision.json"})
        registry.promote(store, version, reason="gate passed")
    registry.publish_version(store, "20261103T020000Z-cccccc", {"decision.json": tmp_path / "decision.json"})
    bucket = str(tmp_path / "bucket")
    listing = faceclf("models", "list", "--bucket", bucket).stdout.splitlines()
    assert [line[0] for line in listing[:3]] == [" ", "*", " "] and "20261102T020000Z-bbbbbb" in listing[1]
    assert "promoted" in listing[0] and "not promoted" in listing[2] and "(no model.onnx)" in listing[2]
    assert "test accuracy 0.9000 [0.8311, 0.9452] n=111" in listing[1]

    pointer = json.loads(faceclf("models", "promote", "20261101T020000Z-aaaaaa", "--bucket", bucket,
                                 "--reason", "rollback: 20261102 misreads masks in low light").stdout)
    assert pointer["version"] == "20261101T020000Z-aaaaaa" and pointer["previous_version"] == "20261102T020000Z-bbbbbb"
    assert [h["version"] for h in pointer["history"]] == ["20261101T020000Z-aaaaaa", "20261102T020000Z-bbbbbb",
                                                          "20261101T020000Z-aaaaaa"]
    last = pointer["history"][-1]
    assert last["reason"] == "rollback: 20261102 misreads masks in low light" and "@" in last["by"]
    assert last["by"] == registry.who() == pointer["by"]
    assert registry.read_champion(store)["model_sha256"] == registry.sha256_bytes(model.read_bytes())
    assert faceclf("models", "list", "--bucket", bucket).stdout.splitlines()[0].startswith("*")

    no_reason = faceclf("models", "promote", "20261102T020000Z-bbbbbb", "--bucket", bucket, check=False)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    missing = faceclf("models", "promote", "20261109T020000Z-eeeeee", "--bucket", bucket, "--reason", "x", check=False)
    assert missing.returncode == 2 and "has no model.onnx" in missing.stderr
    illegal = faceclf("models", "promote", "../../nope", "--bucket", bucket, "--reason", "x", check=False)
    assert illegal.returncode == 2 and "not of the form 20261123T021500Z-3fa2c1" in illegal.stderr
    assert registry.read_champion(store)["version"] == "20261101T020000Z-aaaaaa"
    assert not [line for line in faceclf("models", "list", "--bucket", bucket).stdout.splitlines() if "STUCK" in line]

    # Two nights rejected in a row, the last against a champion below the bars on its test split: stuck, said so.
    (tmp_path / "decision.json").write_text(json.dumps({"promote": False, "why": "Rejected because x.",
                                                        "champion_stale": ["champion's accuracy 0.61 is below 0.9"]}))
    registry.publish_version(store, "20261104T020000Z-dddddd", {"decision.json": tmp_path / "decision.json"})
    stuck = [line for line in faceclf("models", "list", "--bucket", bucket).stdout.splitlines() if "STUCK" in line]
    assert stuck == ["STUCK: 2 nights rejected in a row (20261103T020000Z-cccccc to 20261104T020000Z-dddddd); champion "
                     "20261101T020000Z-aaaaaa stays: last rejection: Rejected because x.",
                     "STUCK: champion 20261101T020000Z-aaaaaa is below the bars on the test split of night "
                     "20261104T020000Z-dddddd: champion's accuracy 0.61 is below 0.9"], stuck


def test_class_weighting_option_reaches_the_run_config(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    faceclf("train", str(faces), "--out", str(run), "--epochs", "1", *TINY, "--class-weighting", "balanced")
    assert json.loads((run / "config.json").read_text())["training"]["class_weighting"] == "balanced"
    bad = faceclf("train", str(faces), "--out", str(tmp_path / "bad"), "--class-weighting", "inverse", check=False)
    assert bad.returncode == 2 and "--class-weighting" in bad.stderr and "invalid choice" in bad.stderr
