"""Splitting, de-duplication, decoding and augmentation."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceclf.dataset.discover import deduplicate, discover
from faceclf.dataset.faceset import FaceImage
from faceclf.dataset.layout import SPLITS, sha256_file, split_of
from faceclf.dataset.preprocess import Preprocess, load_image
from faceclf.dataset.tensors import augment, decode_images

FRACTIONS = (0.8, 0.1, 0.1)


def test_split_of_is_stable_and_follows_fractions() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    first = [split_of(h, FRACTIONS) for h in hashes]
    assert first == [split_of(h, FRACTIONS) for h in hashes]
    share = {s: first.count(s) / len(first) for s in SPLITS}
    assert share["train"] == pytest.approx(0.8, abs=0.015)
    assert share["val"] == pytest.approx(0.1, abs=0.01)
    assert share["test"] == pytest.approx(0.1, abs=0.01)


def test_discover_drops_exact_duplicates_and_never_shares_an_image_between_splits(faces: Path) -> None:
    splits = discover(faces, FRACTIONS, workers=2)
    assert splits.classes == ("with_mask", "without_mask")
    assert splits.duplicates == 3
    hashes = [r.sha256 for s in SPLITS for r in splits.split(s)]
    assert len(hashes) == len(set(hashes)) == 120
    assert all(r.sha256 == sha256_file(splits.file(r)) for r in splits.split("train")[:5])


def test_split_depends_on_content_not_name_or_run(faces: Path, tmp_path: Path) -> None:
    copy = tmp_path / "faces"
    shutil.copytree(faces, copy)
    for p in (copy / "without_mask").glob("*"):
        p.rename(p.with_name("renamed_" + p.name))
    before = {r.sha256: s for s in SPLITS for r in discover(faces, FRACTIONS).split(s)}
    after = {r.sha256: s for s in SPLITS for r in discover(copy, FRACTIONS).split(s)}
    assert before == after


def test_same_bytes_under_two_classes_is_dropped_as_conflict(faces: Path, tmp_path: Path) -> None:
    root = tmp_path / "faces"
    shutil.copytree(faces, root)
    src = sorted((root / "with_mask").glob("with_mask_*.jpg"))[0]
    shutil.copy(src, root / "without_mask" / "mislabelled.jpg")
    splits = discover(root, FRACTIONS)
    assert splits.conflicts == (sha256_file(src),)
    assert all(r.sha256 != sha256_file(src) for s in SPLITS for r in splits.split(s))


def test_deduplicate_keeps_first_of_each_hash() -> None:
    recs = [FaceImage("h1", "x", "train", "a", 1), FaceImage("h1", "x", "train", "b", 1),
            FaceImage("h2", "y", "train", "c", 1)]
    kept, dups, conflicts = deduplicate(recs)
    assert [r.path for r in kept] == ["a", "c"] and dups == 1 and conflicts == []


def test_presplit_tree_is_used_as_is(faces: Path, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = sorted((faces / "with_mask").glob("with_mask_*")), sorted((faces / "without_mask").glob("*"))
    for cls, paths in zip(("with_mask", "without_mask"), files):
        for i, p in enumerate(paths[:30]):
            split = SPLITS[i % 3]
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / split / cls / p.name)
    splits = discover(root, FRACTIONS)
    assert splits.presplit
    assert splits.counts() == {s: {"with_mask": 10, "without_mask": 10} for s in SPLITS}


def test_missing_class_in_a_split_is_an_error_naming_it(faces: Path, tmp_path: Path) -> None:
    root = tmp_path / "faces"
    shutil.copytree(faces, root)
    (root / "rare").mkdir()
    shutil.copy(sorted((root / "with_mask").glob("*.jpg"))[0], root / "rare" / "only.jpg")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "rare" / "other.png")
    splits = discover(root, FRACTIONS)
    with pytest.raises(ValueError, match="class 'rare' has no images in the (train|val|test) split"):
        splits.require_every_class()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope", FRACTIONS)
    with pytest.raises(ValueError, match="no class folders"):
        discover(tmp_path, FRACTIONS)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_load_image_converts_any_mode_to_rgb(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGB", (50, 30), (200, 40, 10)).convert(mode)
    path = tmp_path / ("x.png" if mode not in ("CMYK",) else "x.jpg")
    if mode == "P":
        img.info["transparency"] = 0
    img.save(path)
    arr = load_image(path, 24)
    assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8


def test_load_image_resizes_and_keeps_colour(tmp_path: Path) -> None:
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "big.jpg", quality=95)
    arr = load_image(tmp_path / "big.jpg", 32)
    assert arr.shape == (32, 32, 3)
    assert np.abs(arr.reshape(-1, 3).mean(0) - np.array([10, 200, 30])).max() < 6


def test_load_image_rejects_garbage_and_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"<html>404</html>")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(tmp_path / "bad.jpg", 32)
    Image.new("RGB", (400, 400)).save(tmp_path / "large.png")  # 160,000 pixels
    for limit in (100_000, 10_000):  # over the limit (our header check), over twice it (PIL's own)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError, match="decompression bomb"):
            load_image(tmp_path / "large.png", 32)


def test_decode_images_reports_failures_and_keeps_the_rest(faces: Path, tmp_path: Path) -> None:
    good = sorted((faces / "with_mask").glob("*.jpg"))[:3]
    (tmp_path / "trunc.jpg").write_bytes(good[0].read_bytes()[:200])
    images, ok, failed = decode_images([good[0], tmp_path / "trunc.jpg", *good[1:]], Preprocess(32), workers=2)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert ok == [0, 2, 3]
    assert failed[0][0] == tmp_path / "trunc.jpg" and "cannot decode" in failed[0][1]


def test_augment_flip_and_identity() -> None:
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    same = augment(x, g, max_rotation_deg=0.0, hflip_prob=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = augment(x, g, max_rotation_deg=0.0, hflip_prob=1.0)
    torch.testing.assert_close(flipped, x.flip(3), atol=1e-5, rtol=0)


def test_augment_rotates_each_image_differently() -> None:
    x = torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32).contiguous()
    out = augment(x, torch.Generator().manual_seed(0), max_rotation_deg=10.0, hflip_prob=0.0)
    assert out.shape == x.shape
    diffs = [(out[i] - out[0]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3  # per-image angles, not one angle for the batch


def test_sample_faces_are_the_same_bytes_for_the_same_seed_whatever_ran_before(tmp_path: Path) -> None:
    # Tests and demos rely on this: the split of a generated face follows its bytes. PIL's
    # effect_noise (C rand(), process-wide state) once made the bytes depend on earlier calls.
    from faceclf.devtools.sample import generate_sample_faces

    def digest(root: Path) -> list[str]:
        generate_sample_faces(root, per_class=3, size=32, seed=7)
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))]

    first = digest(tmp_path / "a")
    Image.effect_noise((16, 16), 10)  # moves the C library's rand() state
    assert digest(tmp_path / "b") == first
    generate_sample_faces(tmp_path / "c", per_class=3, size=32, seed=8)
    assert digest(tmp_path / "d") == first and len(set(first)) == 6


@pytest.mark.parametrize("height,width", [(96, 96), (32, 48)])
def test_rotation_grid_is_affine_grid_of_the_same_rotation_and_mirror(height: int, width: int) -> None:
    import torch.nn.functional as F

    from faceclf.dataset.tensors import rotation_grid

    g = torch.Generator().manual_seed(3)
    angle = (torch.rand(16, generator=g) * 2 - 1) * 0.5
    sx = torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin, torch.zeros(16)], 1),
                         torch.stack([sin * sx, cos, torch.zeros(16)], 1)], 1)  # (16, 2, 3)
    want = F.affine_grid(theta, [16, 3, height, width], align_corners=False)
    assert torch.allclose(rotation_grid(cos, sin, sx, height, width), want, atol=1e-6)


def test_normalising_before_or_after_augmenting_gives_the_same_batch() -> None:
    from faceclf.dataset.tensors import normalize

    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    preset = Preprocess.of(24, (0.5, 0.45, 0.4), (0.25, 0.2, 0.3))
    after = normalize(augment(images.float(), torch.Generator().manual_seed(1), 10.0, 0.5), preset)
    before = augment(normalize(images, preset), torch.Generator().manual_seed(1), 10.0, 0.5)
    assert torch.allclose(before, after, atol=1e-4)


def test_faceset_counts_fingerprint_and_order_do_not_depend_on_names(faces: Path, tmp_path: Path) -> None:
    a = discover(faces, FRACTIONS, workers=2)
    copy = tmp_path / "faces"
    shutil.copytree(faces, copy)
    for p in (copy / "with_mask").glob("*"):
        p.rename(p.with_name("z_" + p.name))
    b = discover(copy, FRACTIONS, workers=2)
    assert a.fingerprint() == b.fingerprint() and a.counts() == b.counts()
    assert sum(a.class_totals().values()) == len(a.images) == 120
    assert [i.split for i in a.images] == sorted((i.split for i in a.images), key=SPLITS.index)
    dropped = FaceImage("0" * 64, "with_mask", "test", "extra.jpg", 1)
    assert type(a)(a.root, a.classes, (*a.images, dropped)).fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match="not among the classes"):
        type(a)(a.root, ("with_mask",), a.images)


def test_torch_and_onnx_runtime_paths_build_identical_inputs_from_the_same_files(faces: Path) -> None:
    """The one preset: training's torch normalisation and scoring's numpy one give the same bytes."""
    from faceclf.dataset.tensors import normalize

    preset = Preprocess.of(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    paths = sorted((faces / "with_mask").glob("*"))[:5] + sorted((faces / "without_mask").glob("*"))[:5]
    images, ok, failed = decode_images(paths, preset, workers=2)          # torch path: (N, 3, S, S) uint8
    assert ok == list(range(10)) and not failed
    torch_input = normalize(images, preset).numpy()
    onnx_input = preset.to_input(np.stack([preset.decode(p) for p in paths]))  # scoring path, numpy
    assert onnx_input.dtype == torch_input.dtype == np.float32 and onnx_input.shape == (10, 3, 48, 48)
    assert np.array_equal(torch_input, onnx_input)
    ref = (np.stack([load_image(p, 48) for p in paths]).transpose(0, 3, 1, 2) / 255.0
           - np.array(preset.mean).reshape(1, 3, 1, 1)) / np.array(preset.std).reshape(1, 3, 1, 1)
    assert np.allclose(onnx_input, ref, atol=1e-5)                     # and it is (x/255 - mean)/std
    assert Preprocess.from_metadata(preset.metadata()) == preset
