"""Reliability of the model files and the scoring path, each through the real code path.

6. Malicious model files: a pickle payload in a checkpoint, an ONNX file whose external data points
   outside its folder, a model whose sha256 is not the registry's.
12. One undecodable image in a scoring batch; reruns (also after a killed run) never duplicate rows.
13. Empty, single-class or NaN test metrics are never promoted, down to a night whose training diverges.
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import json
import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST, grouped, upload_faces

from faceclf.config import GateConfig, ScoreConfig
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.preprocess import Preprocess, load_image
from faceclf.dataset.tensors import load_split
from faceclf.nightly.gate import decide
from faceclf.serving.export import check_parity, parity_batch, pixel_model
from faceclf.serving.onnx_model import evaluate_onnx, load_onnx_model, predict_proba
from faceclf.serving.stream import score_images
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.store.s3 import s3_client
from faceclf.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from faceclf.training.evaluate import evaluate_checkpoint
from faceclf.training.loop import evaluate

CPU = ScoreConfig(batch_size=16, decode_workers=2, device="cpu")
OPEN_GATE = GateConfig(min_accuracy=0.0, min_class_accuracy=0.0)  # only the empty/single-class/NaN rules can fail
VERSION = "20260101T000000Z-aaaaaa"


def faceclf_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m faceclf ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "faceclf", *args], capture_output=True, text=True, timeout=300)


def held_out_images(run: Path) -> list[Path]:
    """The run's held-out test images (from RUN/splits.csv)."""
    with open(run / "splits.csv", newline="") as f:
        return [Path(r["path"]) for r in csv.DictReader(f) if r["split"] == "test"]


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions CSV."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# 6a. A checkpoint carrying a pickle payload
# ---------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls open(marker, 'w'): the marker file appears iff the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (builtins.open, (self.marker, "w"))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like ours (format_version 1) but carries the payload."""
    torch.save({"format_version": 1, "model_state": {}, "x": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def evil_cli_runs(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`faceclf export evil.pt` and `faceclf evaluate evil.pt DATA`, run once; the payload's marker per command."""
    tmp = tmp_path_factory.mktemp("evil")
    runs = {}
    for command in ("export", "evaluate"):
        marker = tmp / f"pwned-by-{command}"
        ckpt = evil_checkpoint(tmp / f"evil-{command}.pt", marker)
        args = ["export", str(ckpt), "--out", str(tmp / "m.onnx")] if command == "export" else ["evaluate", str(ckpt), str(faces)]
        runs[command] = (faceclf_cli(*args), marker, tmp / "m.onnx")
    return runs


def test_pickle_payload_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    """Control: the payload really runs under a plain torch.load, so its absence below means something."""
    marker = tmp_path / "pwned"
    torch.load(evil_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_pickle_checkpoint_is_refused_by_the_cli_and_the_payload_never_runs(evil_cli_runs: dict, command: str) -> None:
    proc, marker, out = evil_cli_runs[command]
    assert proc.returncode == 2, proc.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert proc.stderr.startswith(f"faceclf {command}: error: checkpoint ")
    assert "cannot be loaded safely (weights_only)" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_pickle_checkpoint_error_is_one_line(evil_cli_runs: dict, command: str) -> None:
    proc, _, _ = evil_cli_runs[command]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------------------------
# 6b. ONNX external data pointing outside the model's folder
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def watch_sessions() -> Iterator[list[str]]:
    """Record every onnxruntime InferenceSession construction (observed with sys.setprofile; nothing is replaced)."""
    calls: list[str] = []

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        code = frame.f_code
        if event == "call" and code.co_qualname == "InferenceSession.__init__" and "onnxruntime" in code.co_filename:
            calls.append(f"{code.co_filename}:{frame.f_lineno}")

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


def with_external_weights(onnx_model: Path, folder: Path) -> Path:
    """The real model re-saved with its large initializers in folder/weights.bin (a legitimate layout)."""
    folder.mkdir(parents=True)
    onnx.save_model(onnx.load(str(onnx_model)), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    return folder / "model.onnx"


def point_external_data(model: Path, location: str, out: Path) -> tuple[Path, str]:
    """Copy of ``model`` whose external data location is ``location``; returns it and the first tensor's name."""
    proto = onnx.load(str(model), load_external_data=False)
    names = []
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
                names.append(t.name)
    assert names, "the model has no external data to redirect"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out, names[0]


@pytest.fixture()
def evil_models(onnx_model: Path, tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """Models whose (genuine, readable) weights sit OUTSIDE their folder: via '..', an absolute path, a symlink.

    tmp/secret.bin holds the real weights, so a loader that followed the location would succeed.
    """
    good = with_external_weights(onnx_model, tmp_path / "good")
    secret = tmp_path / "secret.bin"
    secret.write_bytes((tmp_path / "good" / "weights.bin").read_bytes())
    (tmp_path / "evil" / "sub").mkdir(parents=True)
    (tmp_path / "evil" / "link.bin").symlink_to(secret)
    cases = {}
    for case, location, where in [("dotdot", "../secret.bin", "evil"), ("dotdot2", "../../secret.bin", "evil/sub"),
                                  ("absolute", str(secret), "evil"), ("symlink", "link.bin", "evil")]:
        path, tensor = point_external_data(good, location, tmp_path / where / f"{case}.onnx")
        cases[case] = (path, tensor, location)
    return cases


def test_in_folder_external_data_still_loads(onnx_model: Path, tmp_path: Path, trained_run: Path) -> None:
    """The check is not over-broad: weights in the model's own folder load and predict as the inline model."""
    split = with_external_weights(onnx_model, tmp_path / "good")
    with watch_sessions() as sessions:
        a, b = load_onnx_model(split, "cpu"), load_onnx_model(onnx_model, "cpu")
    assert len(sessions) == 2  # the watcher does see sessions being created
    x = np.stack([load_image(p, a.image_size) for p in held_out_images(trained_run)[:4]])
    np.testing.assert_allclose(predict_proba(a, x), predict_proba(b, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dotdot", "dotdot2", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_a_session_exists(evil_models: dict, case: str,
                                                                              tmp_path: Path, trained_run: Path) -> None:
    path, tensor, location = evil_models[case]
    with watch_sessions() as sessions:
        with pytest.raises(ValueError, match="refusing to load it") as err:
            load_onnx_model(path, "cpu")
        with pytest.raises(ValueError, match="refusing to load it"):
            evaluate_onnx(path, tmp_path, CPU)  # the night's champion re-scoring opens models the same way
        with pytest.raises(ValueError, match="refusing to load it"):
            score_images(path, [held_out_images(trained_run)[0]], tmp_path / "p.csv", CPU)
        ckpt = load_checkpoint(trained_run / "checkpoint.pt")
        with pytest.raises(ValueError, match="refusing to load it"):  # export's parity check opens any path it is given
            check_parity(path, pixel_model(ckpt), parity_batch(ckpt))
    message = str(err.value)
    assert f"tensor {tensor!r}" in message and f"location {location!r}" in message
    assert ("absolute path" if case == "absolute" else "outside the model's folder") in message
    assert sessions == [], "an onnxruntime session was created for a refused model"
    assert not (tmp_path / "p.csv").exists()


def test_score_cli_refuses_external_data_outside_the_folder_in_one_line(evil_models: dict, tmp_path: Path,
                                                                         trained_run: Path) -> None:
    path, tensor, _ = evil_models["dotdot"]
    proc = faceclf_cli("score", str(path), str(held_out_images(trained_run)[0]), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceclf score: error: ONNX model"), proc.stderr
    assert f"tensor {tensor!r}" in lines[0] and "'../secret.bin'" in lines[0]
    assert "ONNXRuntimeError" not in proc.stderr  # our check refused it, not onnxruntime's own
    assert not (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------------------------------------
# 6c. A model whose sha256 is not the registry's
# ---------------------------------------------------------------------------------------------
def tampered_copy(onnx_model: Path, out: Path) -> Path:
    """A different but perfectly valid model: the same graph with another version in its metadata."""
    proto = onnx.load(str(onnx_model))
    for prop in proto.metadata_props:
        if prop.key == "version":
            prop.value = "tampered"
    onnx.save(proto, str(out))
    return out


def test_score_refuses_a_model_whose_sha256_differs(onnx_model: Path, trained_run: Path, tmp_path: Path) -> None:
    good_sha = registry.sha256_bytes(onnx_model.read_bytes())
    images = held_out_images(trained_run)[:3]
    assert load_onnx_model(onnx_model, "cpu", expected_sha256=good_sha.upper()).version != "tampered"
    other = tampered_copy(onnx_model, tmp_path / "other.onnx")
    assert load_onnx_model(other, "cpu").version == "tampered"  # valid on its own
    with watch_sessions() as sessions:
        with pytest.raises(ValueError, match=f"has sha256 [0-9a-f]{{64}}, but {good_sha} was expected"):
            load_onnx_model(other, "cpu", expected_sha256=good_sha)
        with pytest.raises(ValueError, match="was expected; refusing"):
            score_images(other, images, tmp_path / "p.csv", CPU, expected_sha256=good_sha)
        with pytest.raises(ValueError, match="expected sha256 'abc' is not 64 hexadecimal digits"):
            load_onnx_model(onnx_model, "cpu", expected_sha256="abc")
    assert sessions == [] and not (tmp_path / "p.csv").exists()
    assert score_images(onnx_model, images, tmp_path / "p.csv", CPU, expected_sha256=good_sha).scored == 3


def publish_champion(bucket: str, onnx_model: Path, trained_run: Path) -> None:
    """VERSION published (model, metrics, sha256.json) and promoted, as a night would leave it."""
    store = open_store(f"s3://{bucket}")
    registry.publish_version(store, VERSION, {"model.onnx": onnx_model, "metrics.json": trained_run / "metrics.json"})
    registry.promote(store, VERSION, reason="published by the test")


def test_score_flow_refuses_a_swapped_model_and_writes_no_predictions(prefect_api, bucket: str, onnx_model: Path,
                                                                      trained_run: Path, tmp_path: Path) -> None:
    import flows.score as score_flow

    publish_champion(bucket, onnx_model, trained_run)
    store, client = open_store(f"s3://{bucket}"), s3_client()
    for p in held_out_images(trained_run)[:3]:
        client.put_object(Bucket=bucket, Key=f"to-score/{p.parent.name}/{p.name}", Body=p.read_bytes())
    ok = score_flow.score(bucket=bucket, source="to-score/", output="predictions/ok/predictions.csv")
    assert (ok["images"], ok["errors"]) == (3, 0)  # the untouched champion scores

    swapped = tampered_copy(onnx_model, tmp_path / "swapped.onnx").read_bytes()
    client.put_object(Bucket=bucket, Key=registry.version_key(VERSION, "model.onnx"), Body=swapped)
    # A ValueError: flows.common.retry_io_only fails the task at once instead of retrying after 5/20/60 s.
    with pytest.raises(registry.ModelIntegrityError, match="but champion.json expects .*; refusing to use it"):
        score_flow.score(bucket=bucket, source="to-score/", output="predictions/champion/predictions.csv")
    with pytest.raises(registry.ModelIntegrityError, match=f"but {VERSION}/sha256.json expects"):
        score_flow.score(bucket=bucket, source="to-score/", version=VERSION, output=str(tmp_path / "out" / "p.csv"))
    assert [o.key for o in store.list("predictions/")] == ["predictions/ok/predictions.csv", "predictions/ok/predictions.json"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(registry.ModelIntegrityError):  # nor can it be promoted by hand
        registry.promote(store, VERSION)


# ---------------------------------------------------------------------------------------------
# 12. An undecodable image in the middle of a full batch; reruns, also after a killed run
# ---------------------------------------------------------------------------------------------
def image_folder(trained_run: Path, folder: Path, n: int, bad: set[int]) -> list[Path]:
    """n files named 0000.jpg.. (sorted = scoring order), copies of real test images; indices in ``bad`` are broken."""
    real = held_out_images(trained_run)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        src = real[i % len(real)]
        p = folder / f"{i:04d}{'.jpg' if i in bad else src.suffix}"
        p.write_bytes(b"\xff\xd8\xff\xe0 truncated" if i in bad else src.read_bytes())
        paths.append(p)
    return paths


def test_bad_image_in_the_middle_of_a_full_batch(onnx_model: Path, trained_run: Path, tmp_path: Path) -> None:
    paths = image_folder(trained_run, tmp_path / "batch", 9, bad={4})  # batches [0-2] [3-5] [6-8]: 4 is mid-batch
    out = tmp_path / "pred.csv"
    cfg = ScoreConfig(batch_size=3, decode_workers=2, device="cpu")
    summary = score_images(onnx_model, [tmp_path / "batch"], out, cfg)
    assert (summary.images, summary.scored, summary.errors) == (9, 8, 1)
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert "cannot decode" in rows[4]["error"] and rows[4]["predicted_class"] == "" and rows[4]["p_with_mask"] == ""
    # Every neighbour gets exactly the probabilities it gets when scored alone: no row shifted onto another image.
    model = load_onnx_model(onnx_model, "cpu")
    for i, (p, r) in enumerate(zip(paths, rows)):
        if i == 4:
            continue
        alone = predict_proba(model, load_image(p, model.image_size)[None])[0]
        assert r["error"] == "" and r["predicted_class"] == model.classes[int(alone.argmax())]
        np.testing.assert_allclose([float(r[f"p_{c}"]) for c in model.classes], alone, atol=2e-6)
    first = out.read_bytes()
    score_images(onnx_model, [tmp_path / "batch"], out, cfg)  # a rerun over the same output path
    assert out.read_bytes() == first and len(read_rows(out)) == 9


def test_a_killed_scoring_run_resumes_after_its_last_part_with_one_row_per_image(onnx_model: Path, trained_run: Path,
                                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    paths = image_folder(trained_run, folder, 800, bad={400})
    out = folder / "pred.csv"  # inside the scored folder: neither it nor its parts may be scored
    score_images(onnx_model, [folder], out, CPU)
    previous = out.read_bytes()
    assert len(read_rows(out)) == 800 and not (folder / "pred.csv.parts").exists()

    parts = folder / "pred.csv.parts"
    proc = subprocess.Popen([sys.executable, "-m", "faceclf", "-q", "score", str(onnx_model), str(folder),
                             "--out", str(out), "--batch-size", "1", "--workers", "1", "--device", "cpu",
                             "--part-rows", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("part-*.csv"))) < 3:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: some parts written, the final CSV not yet replaced
    proc.wait(timeout=30)
    written = sorted(parts.glob("part-*.csv"))
    assert proc.returncode == -signal.SIGKILL and 3 <= len(written) < 16, "the run finished before it was killed"
    assert out.read_bytes() == previous  # the killed run changed nothing that others read
    done = sum(len(read_rows(p)) for p in written)

    summary = score_images(onnx_model, [folder], out, ScoreConfig(device="cpu", part_rows=50))
    rows = read_rows(out)
    assert summary.resumed == done and summary.images == len(rows) == 800 and summary.errors == 1
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # one row per image, in order, no extra
    assert [r["predicted_class"] for r in rows] == [r["predicted_class"] for r in read_rows_bytes(previous)]
    assert not parts.exists() and not list(folder.glob(".*.tmp")), "the killed run left files behind"
    run = json.loads((folder / "pred.json").read_text())  # the resumed run's summary beside the CSV
    assert (run["images"], run["errors"], run["resumed"], run["config"]["part_rows"]) == (800, 1, done, 50)


def read_rows_bytes(data: bytes) -> list[dict[str, str]]:
    """CSV rows of file content."""
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


# ---------------------------------------------------------------------------------------------
# 13. Empty, single-class or NaN metrics are never promoted
# ---------------------------------------------------------------------------------------------
def test_an_empty_test_set_gives_nan_metrics_that_are_not_promoted(onnx_model: Path, trained_run: Path,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "no-class-folders").mkdir()
    (tmp_path / "empty-classes" / "with_mask").mkdir(parents=True)
    (tmp_path / "empty-classes" / "without_mask").mkdir()
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    preset = Preprocess.from_checkpoint(ckpt)
    empty_split = load_split(FaceSet(tmp_path, tuple(ckpt["classes"]), ()), "test", preset)
    results = [evaluate_onnx(onnx_model, tmp_path / "no-class-folders", CPU),
               evaluate_onnx(onnx_model, tmp_path / "empty-classes", CPU),
               evaluate(model_from_checkpoint(ckpt), empty_split, ckpt["classes"], preset, torch.device("cpu"))]
    for m in results:
        assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["loss"])
        assert m["per_class_accuracy"] == {"with_mask": None, "without_mask": None}
        d = decide(m, OPEN_GATE)
        assert not d.promote and "the test set is empty" in d.reasons and d.candidate_accuracy is None


def test_a_single_class_test_set_is_not_promoted(onnx_model: Path, trained_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test" / "with_mask"
    folder.mkdir(parents=True)
    for p in held_out_images(trained_run):
        if p.parent.name == "with_mask":
            (folder / p.name).write_bytes(p.read_bytes())
    m = evaluate_onnx(onnx_model, tmp_path / "test", CPU)
    assert m["n"] > 0 and m["accuracy"] >= 0.8 and m["per_class_accuracy"]["without_mask"] is None
    d = decide(m, OPEN_GATE)
    assert not d.promote and "the test set measures 1 class(es); at least 2 are needed" in d.reasons


def test_nan_weights_give_nan_loss_and_are_not_promoted(trained_run: Path, faces: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    weight = next(k for k in ckpt["model_state"] if k.endswith(".weight"))
    ckpt["model_state"][weight].view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", ckpt)
    m = evaluate_checkpoint(tmp_path / "nan.pt", faces, "test", "cpu")  # the `faceclf evaluate` path
    assert m["n"] > 0 and math.isnan(m["loss"])
    d = decide(m, OPEN_GATE)
    assert not d.promote and any("test loss nan is not a finite number" in r for r in d.reasons)


def test_a_night_whose_training_diverges_promotes_nothing(prefect_api, bucket: str, onnx_model: Path,
                                                         trained_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.train import train

    monkeypatch.chdir(tmp_path)
    publish_champion(bucket, onnx_model, trained_run)
    store = open_store(f"s3://{bucket}")
    champion_before = store.get_bytes(registry.CHAMPION_KEY)
    upload_faces(bucket, tmp_path / "night", per_class=80, seed=11)

    # lr 1e30: every epoch's validation loss is NaN, so fit() keeps no weights at all.
    night = train(**grouped(bucket=bucket, min_accuracy=0.0, min_class_accuracy=0.0,
                  **{**FAST, "epochs": 3, "learning_rate": 1e30}))
    assert not night["promoted"] and night["test_accuracy"] is None, night
    assert len(night["reasons"]) == 1
    assert night["reasons"][0].startswith("training diverged: no epoch produced a finite validation loss")
    # The night is on record as a rejected version with its reason, not just a failed flow run.
    decision = json.loads(store.get_bytes(registry.version_key(night["version"], "decision.json")))
    assert decision["promote"] is False and decision["reasons"] == night["reasons"]
    report = store.get_bytes(registry.version_key(night["version"], "report.md")).decode()
    assert "**Decision: REJECTED**" in report and "training diverged" in report and "Not measured" in report
    assert not store.exists(registry.version_key(night["version"], "checkpoint.pt"))
    listed = {v["version"]: v for v in registry.list_versions(store)}
    assert listed[night["version"]]["gate_passed"] is False and not listed[night["version"]]["has_model"]
    assert store.get_bytes(registry.CHAMPION_KEY) == champion_before
    models = {o.key.split("/")[2] for o in store.list(registry.MODELS_PREFIX) if o.key.endswith("/model.onnx")}
    assert models == {VERSION}
