"""ONNX export (checker, metadata, dynamic batch, parity) and batch scoring with onnxruntime."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import faceclf.serving.export as E
from faceclf.dataset.preprocess import Preprocess, load_image
from faceclf.dataset.tensors import normalize
from faceclf.serving.export import ExportParityError, check_parity, export_onnx
from faceclf.serving.onnx_model import CPU_PROVIDER, load_onnx_model, predict_proba, providers_for
from faceclf.serving.stream import score_images
from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint


def _test_images(trained_run: Path) -> list[Path]:
    with open(trained_run / "splits.csv", newline="") as f:
        return [Path(r["path"]) for r in csv.DictReader(f) if r["split"] == "test"]


def test_exported_file_is_valid_self_contained_and_described(onnx_model: Path, trained_run: Path) -> None:
    proto = onnx.load(str(onnx_model))
    onnx.checker.check_model(proto, full_check=True)
    assert not [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    meta = {p.key: p.value for p in proto.metadata_props}
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert json.loads(meta["classes"]) == ckpt["classes"]
    assert json.loads(meta["mean"]) == pytest.approx(ckpt["mean"])
    assert json.loads(meta["std"]) == pytest.approx(ckpt["std"])
    assert int(meta["image_size"]) == ckpt["image_size"]
    assert meta["version"] == ckpt["version"]
    assert meta["input_format"].startswith("uint8 (batch, image_size, image_size, 3) RGB")
    assert not list(onnx_model.parent.glob("*.data"))


@pytest.mark.parametrize("batch", [1, 7, 33])
def test_onnx_matches_torch_for_any_batch_size(onnx_model: Path, trained_run: Path, batch: int) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    paths = (_test_images(trained_run) * 10)[:batch]
    images = torch.from_numpy(np.stack([load_image(p, ckpt["image_size"]) for p in paths])).permute(0, 3, 1, 2)
    x = normalize(images, Preprocess.from_checkpoint(ckpt))
    with torch.no_grad():  # the exported graph is calibrated: log_softmax(log_probs / T)
        expected = torch.log_softmax(model_from_checkpoint(ckpt)(x) / E.temperature_of(ckpt), dim=1).numpy()
    session = ort.InferenceSession(str(onnx_model), providers=[CPU_PROVIDER])
    (spec,) = session.get_inputs()
    assert spec.type == "tensor(uint8)" and spec.shape[1:] == [ckpt["image_size"], ckpt["image_size"], 3]
    got = session.run(None, {"input": images.permute(0, 2, 3, 1).contiguous().numpy()})[0]  # pixels, as decoded
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_parity_check_fails_loudly_on_a_different_model(onnx_model: Path, trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    other = model_from_checkpoint(ckpt)
    with torch.no_grad():
        other.classifier[-2].bias[0] += 0.5  # one class only: a shift of every logit cancels in log-softmax
    with pytest.raises(ExportParityError, match="max abs diff"):
        check_parity(onnx_model, E.pixel_model(ckpt, other), E.parity_batch(ckpt))


def test_export_that_fails_parity_writes_nothing(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = E.to_onnx_proto

    def export_a_perturbed_copy(model, example):  # noqa: ANN001 - the exporter produced the wrong graph
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.model.classifier[-2].weight.mul_(1.5)
        return real(bad, example)

    monkeypatch.setattr(E, "to_onnx_proto", export_a_perturbed_copy)
    (tmp_path / "model.onnx").write_bytes(b"previous model")
    with pytest.raises(ExportParityError):
        export_onnx(trained_run / "checkpoint.pt", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_providers_follow_the_hardware() -> None:
    assert providers_for("cpu") == [CPU_PROVIDER]
    if not torch.cuda.is_available():
        assert providers_for("auto") == [CPU_PROVIDER]
        with pytest.raises(RuntimeError, match="no GPU"):
            providers_for("cuda")


def test_score_writes_one_row_per_image_with_errors_inline(onnx_model: Path, trained_run: Path, tmp_path: Path) -> None:
    test_images = _test_images(trained_run)
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    for i, p in enumerate(test_images):
        (folder / "nested" / f"{i:03d}{p.suffix}").write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image, not scored")
    out = tmp_path / "pred.csv"
    summary = score_images(onnx_model, [folder], out)
    assert summary.provider == CPU_PROVIDER
    assert (summary.images, summary.errors) == (len(test_images) + 1, 1)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "predicted_class", "p_with_mask", "p_without_mask", "error", "model_version",
                             "etag"]
    assert {r["model_version"] for r in rows} == {load_checkpoint(trained_run / "checkpoint.pt")["version"]}
    assert len(rows) == len(test_images) + 1
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.jpg") and "cannot decode" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    for r in good:
        p = np.array([float(r["p_with_mask"]), float(r["p_without_mask"])])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == ["with_mask", "without_mask"][int(p.argmax())]
    # Same predictions as torch on the same files.
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    for r in good[:10]:
        x = torch.from_numpy(load_image(r["path"], ckpt["image_size"])).permute(2, 0, 1)[None]
        with torch.no_grad():
            want = ckpt["classes"][int(model(normalize(x, Preprocess.from_checkpoint(ckpt))).argmax())]
        assert r["predicted_class"] == want
    score_images(onnx_model, [folder], out)  # a rerun replaces the file
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


@pytest.mark.parametrize("prefetch,workers", [(1, 1), (3, 2), (50, 3)])
def test_decoding_ahead_keeps_every_row_in_input_order(onnx_model: Path, trained_run: Path, tmp_path: Path,
                                                        prefetch: int, workers: int) -> None:
    from faceclf.config import ScoreConfig
    from faceclf.serving.sources import LocalSource
    from faceclf.serving.stream import score_items

    files = _test_images(trained_run)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [*files[:5], broken, *files[5:]]
    model = load_onnx_model(onnx_model, "cpu")
    source = LocalSource(paths)
    items = list(source.items())  # sorted by path, whatever order they were given in
    paths = [Path(i.key) for i in items]
    reference = list(score_items(model, source, items, ScoreConfig(batch_size=len(paths), device="cpu")))
    rows = list(score_items(model, source, iter(items), ScoreConfig(batch_size=2, decode_workers=workers,
                                                                    prefetch_batches=prefetch, device="cpu")))
    assert [r["path"] for r in rows] == [str(p) for p in paths] == [r["path"] for r in reference]
    assert [r["predicted_class"] for r in rows] == [r["predicted_class"] for r in reference]
    assert [bool(r["error"]) for r in rows] == [p == broken for p in paths]
    with pytest.raises(ValueError, match="prefetch_batches must be >= 1, got 0"):
        ScoreConfig(prefetch_batches=0)


def test_score_missing_input_and_foreign_model_are_clear_errors(onnx_model: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score_images(onnx_model, [tmp_path / "missing"], tmp_path / "p.csv")
    bare = onnx.load(str(onnx_model))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no 'classes' in its metadata"):
        load_onnx_model(tmp_path / "bare.onnx")
    assert not (tmp_path / "p.csv").exists()


def test_a_model_exported_with_the_earlier_float_input_still_scores_alike(onnx_model: Path, trained_run: Path,
                                                                          tmp_path: Path) -> None:
    """Champions exported before the uint8 input (float32 NCHW, normalised by the caller) keep working."""
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    pixels = E.parity_batch(ckpt)                                                   # uint8 (B, S, S, 3)
    proto = E.to_onnx_proto(model_from_checkpoint(ckpt), normalize(pixels.permute(0, 3, 1, 2),
                                                                   Preprocess.from_checkpoint(ckpt)))
    E.add_metadata(proto, ckpt, ckpt["version"], "0" * 64)
    onnx.save_model(proto, str(tmp_path / "float.onnx"))
    old, new = load_onnx_model(tmp_path / "float.onnx", "cpu"), load_onnx_model(onnx_model, "cpu")
    assert (old.takes_pixels, new.takes_pixels) == (False, True)
    np.testing.assert_allclose(predict_proba(old, pixels.numpy()), predict_proba(new, pixels.numpy()), atol=1e-6)
