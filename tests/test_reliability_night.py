"""A night's reliability: class changes, empty input, kills mid-training and mid-promotion, overlap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, LENIENT, REPO, grouped, upload_faces

from faceclf.nightly.lock import LOCK_FILE, NightLocked, night_lock
from faceclf.nightly.runs import PUBLISHED_FILE
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.store.s3 import s3_client

NIGHT = {**FAST, **LENIENT}


def api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def night_in_subprocess(bucket: str, face: Path, runs: Path, prelude: str = "",
                        params: dict | None = None) -> subprocess.Popen:
    """`flows.train.train(...)` in its own process (against the same Prefect API and S3 endpoint)."""
    code = (f"{prelude}\nfrom flows.train import train\n"
            f"train(**{grouped(bucket=bucket, face_dir=str(face), runs_dir=str(runs), **(params or NIGHT))!r})")
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_new_class_upload_is_quarantined_and_never_blocks_a_night(prefect_api, bucket: str, tmp_path: Path) -> None:
    """Images under incoming/<a class nobody knows>/ are quarantined with the reason saying how to take them; the
    night goes on (here: nothing else is new, so it ends after ingest) and so does the next one."""
    from flows.train import train

    store = open_store(f"s3://{bucket}")
    upload_faces(bucket, tmp_path / "n1", per_class=80, seed=11)
    params = {"bucket": bucket, "face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs"), **NIGHT}
    first = train(**grouped(**params))
    assert first["promoted"]
    from faceclf.devtools.sample import generate_sample_faces

    generate_sample_faces(tmp_path / "new", per_class=40, size=48, seed=12, classes=("with_sunglasses",))
    for p in (tmp_path / "new" / "with_sunglasses").iterdir():
        s3_client().put_object(Bucket=bucket, Key=f"incoming/with_sunglasses/{p.name}", Body=p.read_bytes())
    for _ in range(2):  # tonight and the next night alike
        second = train(**grouped(**params))
        assert second["skipped"] and second["ingest"]["classes"] == {"with_mask": 80, "without_mask": 80}
    quarantined = [q for q in second["ingest"]["quarantine"]] or \
        [json.loads(line) for line in store.get_bytes("datasets/face/quarantine.jsonl").decode().splitlines()]
    assert len([q for q in quarantined if q["key"].startswith("incoming/with_sunglasses/")]) == 40
    assert all("allow_new_classes=true" in q["reason"] for q in quarantined)
    assert [v["version"] for v in registry.list_versions(store)] == [first["version"]]  # nothing trained or uploaded
    assert registry.read_champion(store)["version"] == first["version"]

    # A deliberate change: allowed, trained with 3 classes, gated on the thresholds alone
    # (the 2-class champion cannot be compared on a 3-class test set).
    third = train(**grouped(**params, allow_new_classes=True))
    assert json.loads(store.get_bytes(registry.version_key(third["version"], "metrics.json")))["classes"] == \
        ["with_mask", "with_sunglasses", "without_mask"]


def test_a_class_too_small_to_split_stops_the_night(prefect_api, bucket: str, tmp_path: Path) -> None:
    from faceclf.devtools.sample import generate_sample_faces
    from flows.train import train

    upload_faces(bucket, tmp_path / "n1", per_class=60, seed=11)
    generate_sample_faces(tmp_path / "rare", per_class=1, size=48, seed=5, classes=("with_sunglasses",))
    only = next((tmp_path / "rare" / "with_sunglasses").glob("*.jpg"))
    s3_client().put_object(Bucket=bucket, Key="incoming/rare/one.jpg", Body=only.read_bytes())  # 1 image: one split
    with pytest.raises(ValueError, match="class 'rare' has no images in the (train|val|test) split"):
        train(**grouped(bucket=bucket, face_dir=str(tmp_path / "face"), runs_dir=str(tmp_path / "runs"), **NIGHT))
    assert registry.read_champion(open_store(f"s3://{bucket}")) is None


def test_an_empty_incoming_prefix_stops_the_night(prefect_api, bucket: str, tmp_path: Path) -> None:
    from flows.train import train

    with pytest.raises(ValueError, match="no images to train on"):
        train(**grouped(bucket=bucket, face_dir=str(tmp_path / "face"), runs_dir=str(tmp_path / "runs"), **NIGHT))
    assert registry.read_champion(open_store(f"s3://{bucket}")) is None


def test_a_night_killed_mid_epoch_resumes_to_the_same_result(prefect_api, bucket: str, tmp_path: Path) -> None:
    from faceclf.config import RunConfig, with_overrides
    from faceclf.training.launch import run_training
    from flows.train import train

    upload_faces(bucket, tmp_path / "n1", per_class=80, seed=11)
    face, runs = tmp_path / "face", tmp_path / "runs"
    proc = night_in_subprocess(bucket, face, runs)
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = list(runs.glob("*/last.pt"))
    assert killed and not list(runs.glob("*/metrics.json")), "the night finished before it could be killed"

    result = train(**grouped(bucket=bucket, face_dir=str(face), runs_dir=str(runs), **NIGHT))
    assert result["resumed"] and result["version"] == killed[0].parent.name
    # The same night uninterrupted, on the same data and settings, gives the same model and metrics.
    clean = run_training(face, tmp_path / "clean", with_overrides(RunConfig(), **{k: v for k, v in FAST.items() if k not in ("warm_start", "label_audit")}))
    resumed = json.loads((killed[0].parent / "metrics.json").read_text())
    assert resumed["test"] == clean["test"] and resumed["best_epoch"] == clean["best_epoch"]


# A gate every trained candidate passes, so night 2 always reaches promotion (the point of these tests is the
# crash there, not whether this small candidate beats the champion).
PROMOTE = {**NIGHT, "min_accuracy": 0.0, "min_class_accuracy": 0.0, "tolerance": 1.0}


def killed_at(step: str) -> str:
    """A prelude that makes the night's process die (no cleanup, like SIGKILL) where registry.STEP would run. The
    lease it held is left behind: the rerun (same host) sees its holder's process is gone and takes it over."""
    return f"import os, faceclf.store.registry as r\nr.{step} = lambda *a, **k: os._exit(137)"


def test_killed_between_upload_and_promotion_keeps_the_champion_and_promotes_once(
        prefect_api, bucket: str, tmp_path: Path) -> None:
    from flows.train import train

    store = open_store(f"s3://{bucket}")
    face, runs = tmp_path / "face", tmp_path / "runs"
    upload_faces(bucket, tmp_path / "n1", per_class=80, seed=11)
    first = train(**grouped(bucket=bucket, face_dir=str(face), runs_dir=str(runs), **NIGHT))
    assert first["promoted"]

    upload_faces(bucket, tmp_path / "n2", per_class=20, seed=12)
    proc = night_in_subprocess(bucket, face, runs, params=PROMOTE, prelude=killed_at("champion_pointer"))
    assert proc.wait(timeout=600) == 137, "night 2 ended without reaching promotion"
    pending = sorted(runs.iterdir())[-1]
    assert store.exists(registry.version_key(pending.name, "model.onnx"))      # uploaded ...
    assert registry.read_champion(store)["version"] == first["version"]       # ... but not promoted
    assert not (pending / PUBLISHED_FILE).exists()

    # The rerun on the same worker finishes the publish first (champion, then latest); its data is then
    # nothing new: it trains nothing, and the run folder is marked published.
    rerun = train(**grouped(bucket=bucket, face_dir=str(face), runs_dir=str(runs), **PROMOTE))
    assert rerun["finished_publish"] == pending.name and rerun["skipped"] and not rerun["resumed"]
    champion = registry.read_champion(store)
    assert champion["version"] == pending.name and champion["previous_version"] == first["version"]
    assert (pending / PUBLISHED_FILE).exists()
    history = (pending / "history.csv").read_text()
    assert history.count("\n") == FAST["epochs"] + 1  # trained once, not again by the rerun

    again = train(**grouped(bucket=bucket, face_dir=str(face), runs_dir=str(runs), **NIGHT, force=True))  # a normal night after
    assert not again["resumed"] and again["version"] != pending.name and again["finished_publish"] is None


@pytest.mark.parametrize("step", ["champion_pointer", "write_latest"])
def test_a_killed_publish_is_finished_by_a_rerun_on_a_fresh_worker(step: str, prefect_api, bucket: str,
                                                                    tmp_path: Path) -> None:
    """Killed before champion.json moves, or between it and latest.json: a worker without the night's run
    folder (nor its face/) finishes the publish, promotes the candidate once and trains nothing."""
    from flows.train import train

    store = open_store(f"s3://{bucket}")
    upload_faces(bucket, tmp_path / "n1", per_class=40, seed=11)
    proc = night_in_subprocess(bucket, tmp_path / "face", tmp_path / "runs", params=PROMOTE, prelude=killed_at(step))
    assert proc.wait(timeout=600) == 137, f"the night ended without reaching {step}"
    killed = sorted((tmp_path / "runs").iterdir())[-1].name
    assert registry.read_latest(store) is None  # latest.json moves last

    fresh = tmp_path / "fresh-worker"
    rerun = train(**grouped(bucket=bucket, face_dir=str(fresh / "face"), runs_dir=str(fresh / "runs"), **PROMOTE))
    assert rerun["finished_publish"] == killed and rerun["skipped"], rerun
    champion = registry.read_champion(store)
    assert champion["version"] == killed and len(champion["history"]) == 1
    assert registry.read_latest(store)["version"] == killed
    assert [v["version"] for v in registry.list_versions(store)] == [killed]
    assert not (fresh / "runs").exists() or not any((fresh / "runs").iterdir())  # nothing trained

    again = train(**grouped(bucket=bucket, face_dir=str(fresh / "face"), runs_dir=str(fresh / "runs"), **PROMOTE))
    assert again["finished_publish"] is None and again["skipped"]  # finishing is done once


def test_a_second_night_on_the_same_folder_is_refused(prefect_api, bucket: str, tmp_path: Path) -> None:
    from flows.train import train

    upload_faces(bucket, tmp_path / "n1", per_class=20, seed=11)
    face = tmp_path / "face"
    with night_lock(face):  # the first night, still running
        with pytest.raises(NightLocked, match="another night is running"):
            train(**grouped(bucket=bucket, face_dir=str(face), runs_dir=str(tmp_path / "runs"), **NIGHT))
    store = open_store(f"s3://{bucket}")
    assert not store.exists("datasets/face/manifest.jsonl")  # the refused night wrote nothing
    assert not [p for p in face.rglob("*.*") if p.name != LOCK_FILE]



def test_a_night_on_another_host_is_refused_by_the_bucket_lease(prefect_api, bucket: str, tmp_path: Path) -> None:
    """Another worker (its own face/ folder, so the file lock cannot see it) holds the bucket's lease: the night
    refuses before it reads or writes anything, naming the holder; once the lease is released a night runs (here
    it finds nothing to train on) and releases the lease however it ends."""
    from faceclf.nightly.lock import LEASE_KEY, bucket_lease
    from flows.train import train

    store = open_store(f"s3://{bucket}")
    params = {"bucket": bucket, "face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs"), **NIGHT}
    with bucket_lease(store, "train night on host B") as other:
        with pytest.raises(NightLocked, match="host B"):
            train(**grouped(**params))
        assert json.loads(store.get_bytes(LEASE_KEY))["holder"] == other.holder
    assert not store.exists("datasets/face/manifest.jsonl")  # the refused night wrote nothing but its lock file
    assert [p.name for p in (tmp_path / "face").rglob("*")] == [LOCK_FILE]
    with pytest.raises(ValueError, match="no images to train on"):
        train(**grouped(**params))
    lease = json.loads(store.get_bytes(LEASE_KEY))
    assert lease["expires_at"] == 0.0 and "train night" in lease["holder"]  # the failed night released it


WRITER = """
import sys, torch, json
from faceclf.training.checkpoint import save_checkpoint
from faceclf.store.objects import LocalStore
path, store_root = sys.argv[1], sys.argv[2]
store = LocalStore(store_root)
i = 0
print("ready", flush=True)
while True:  # rewrite a 20 MB checkpoint and a manifest as fast as possible until killed
    i += 1
    save_checkpoint(path, {"format_version": 1, "i": i, "w": torch.full((5_000_000,), float(i))})
    store.put_bytes("datasets/face/manifest.jsonl", "".join(json.dumps({"row": r, "i": i}) + "\\n" for r in range(20000)).encode())
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.3])
def test_killed_during_a_write_leaves_the_previous_file_whole(tmp_path: Path, delay: float) -> None:
    """SIGKILL a process mid-way through checkpoint and manifest rewrites: the final paths always load."""
    from faceclf.store.atomic import remove_stale_temps
    from faceclf.training.checkpoint import load_checkpoint

    ckpt, store = tmp_path / "run" / "checkpoint.pt", tmp_path / "bucket"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt), str(store)], cwd=REPO, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    while not (store / "datasets/face/manifest.jsonl").exists():
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = load_checkpoint(ckpt)  # whole: one complete earlier write
    assert float(loaded["w"][0]) == float(loaded["w"][-1]) == loaded["i"]
    rows = (store / "datasets/face/manifest.jsonl").read_text().splitlines()
    assert len(rows) == 20000 and len({json.loads(r)["i"] for r in rows}) == 1
    remove_stale_temps(ckpt.parent)
    remove_stale_temps(store / "datasets/face")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]
