"""Label audit (issue 25, item 3): flipped labels of arriving images are found through a real ONNX champion
(the session's ``onnx_model``, trained on other generated faces), listed, written, shown and summarised."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from faceclf.devtools.sample import generate_sample_faces
from faceclf.nightly import gallery
from faceclf.nightly.audit import (
    CSV_COLUMNS,
    AuditRow,
    audit_gallery,
    audit_labels,
    audit_markdown,
    suggest,
    write_audit_csv,
)

FLIPS = 3  # labels flipped on purpose per class among the new images


def _items(root: Path, classes: tuple[str, ...]) -> list[tuple[str, str, Path, str]]:
    """(key, sha256, file, class) of root/<class>/* as ingest would name them."""
    return [(f"incoming/{c}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest(), p, c)
            for c in classes for p in sorted((root / c).iterdir())]


@pytest.fixture(scope="module")
def arriving(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, set[str]]:
    """New images (30 per class, FLIPS per class relabelled to the other class), the reference (val-like: 20 per
    class, labels right) and the keys of the flipped ones; none of them was seen by ``onnx_model``."""
    classes = ("with_mask", "without_mask")
    root = tmp_path_factory.mktemp("arriving")
    generate_sample_faces(root / "new", per_class=30, size=48, seed=21, classes=classes)
    generate_sample_faces(root / "ref", per_class=20, size=48, seed=22, classes=classes)
    new, flipped = [], set()
    for key, sha, path, label in _items(root / "new", classes):
        if int(path.stem.rsplit("_", 1)[1]) < FLIPS:  # the first FLIPS of each class
            label = classes[1 - classes.index(label)]
            flipped.add(key)
        new.append((key, sha, path, label))
    reference = [(path, label) for _, _, path, label in _items(root / "ref", classes)]
    return new, reference, flipped


@pytest.fixture(scope="module")
def audited(onnx_model: Path, arriving: tuple[list, list, set[str]]) -> list[AuditRow]:
    new, reference, _ = arriving
    return audit_labels(onnx_model, new, reference)


def test_flipped_labels_are_found_and_few_right_ones_flagged(audited: list[AuditRow], arriving) -> None:
    new, _, flipped = arriving
    found = {r.key for r in audited}
    assert len(found & flipped) >= len(flipped) - 1, (sorted(found), sorted(flipped))
    assert len(found - flipped) <= 2, sorted(found - flipped)
    by_key = {k: label for k, _, _, label in new}
    for r in audited:
        assert r.given == by_key[r.key] and r.suggested != r.given and 0.0 <= r.confidence <= 1.0
        assert r.path.is_file() and r.sha256 == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert [r.confidence for r in audited] == sorted((r.confidence for r in audited), reverse=True)


def test_csv_has_the_header_and_one_row_per_flagged_image(audited: list[AuditRow], tmp_path: Path) -> None:
    path = write_audit_csv(audited, tmp_path / "label_audit.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(k, s, g, sg) for k, s, g, sg, _ in rows[1:]] == [(r.key, r.sha256, r.given, r.suggested) for r in audited]
    assert [float(c) for *_, c in rows[1:]] == pytest.approx([r.confidence for r in audited], abs=1e-4)
    empty = write_audit_csv([], tmp_path / "empty.csv")
    assert empty.read_text().splitlines() == [",".join(CSV_COLUMNS)]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file that was moved into place


def test_gallery_is_a_png_with_one_tile_per_flagged_image(audited: list[AuditRow], tmp_path: Path) -> None:
    assert audited
    out = audit_gallery(audited, tmp_path / "label_audit.png")
    assert out is not None
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        width, height = img.size
    tile_h = gallery.THUMB + gallery.CAPTION_LINES * gallery.LINE_HEIGHT + 4
    assert height == 20 + math.ceil(len(audited) / gallery.COLUMNS) * tile_h  # title strip + rows of tiles
    assert width >= min(len(audited), gallery.COLUMNS) * gallery.THUMB
    assert audit_gallery([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_markdown_counts_and_lists_the_first_rows(audited: list[AuditRow], arriving) -> None:
    new, _, _ = arriving
    text = audit_markdown(audited, len(new), limit=2)
    assert f"{len(new)} new images audited" in text and f"{len(audited)} flagged" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| key |") and len(table) == 1 + min(2, len(audited))
    assert audited[0].key in table[1]
    assert "0 flagged" in audit_markdown([], 5) and "|" not in audit_markdown([], 5)


def test_classes_the_champion_does_not_know_are_skipped(onnx_model: Path, arriving, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    new, reference, _ = arriving
    generate_sample_faces(tmp_path, per_class=3, size=48, seed=23, classes=("with_sunglasses",))
    strangers = _items(tmp_path, ("with_sunglasses",))
    with caplog.at_level(logging.WARNING, logger="faceclf.nightly.audit"):
        rows = audit_labels(onnx_model, new[:10] + strangers + new[30:40], reference)
    assert not {r.key for r in rows} & {k for k, *_ in strangers}
    assert "3 new image(s) of class(es) ['with_sunglasses'] skipped" in caplog.text
    assert audit_labels(onnx_model, strangers, reference) == []


def test_nothing_new_gives_no_rows(onnx_model: Path, arriving) -> None:
    _, reference, _ = arriving
    assert audit_labels(onnx_model, [], reference) == []


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(2, 5)), elements=st.floats(0.0, 1.0)),
       st.data())
def test_suggestion_is_the_most_probable_other_class(probs: np.ndarray, data: st.DataObject) -> None:
    n, c = probs.shape
    labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    suggested, confidence = suggest(probs, labels)
    assert suggested.shape == confidence.shape == (n,)
    for i in range(n):
        assert suggested[i] != labels[i]
        assert confidence[i] == probs[i, suggested[i]]
        assert all(confidence[i] >= probs[i, k] for k in range(c) if k != labels[i])
        if c == 2:
            assert suggested[i] == 1 - labels[i]
