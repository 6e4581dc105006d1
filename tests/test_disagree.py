"""What changed on the test set (issue 25): the images candidate and champion classify differently, per class and
direction, as rows, a report.md section and a contact sheet."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from faceclf.dataset.faceset import FaceImage, FaceSet
from faceclf.nightly.disagree import (
    BOTH_WRONG,
    CANDIDATE_RIGHT,
    CHAMPION_RIGHT,
    GALLERY_FILE,
    SECTION,
    Disagreement,
    balanced,
    counts,
    direction,
    disagreement_gallery,
    disagreement_markdown,
    disagreements,
)

CLASSES = ("cap", "with_mask", "without_mask")
# (true class, candidate predicted, champion predicted) per test image
CASES = [
    ("with_mask", "with_mask", "without_mask"),     # candidate right
    ("with_mask", "with_mask", "cap"),              # candidate right
    ("with_mask", "without_mask", "with_mask"),     # champion right
    ("with_mask", "with_mask", "with_mask"),        # agree (both right)
    ("without_mask", "cap", "without_mask"),        # champion right
    ("without_mask", "with_mask", "cap"),           # both wrong, differently
    ("without_mask", "with_mask", "with_mask"),     # agree (both wrong the same way): not a disagreement
    ("cap", "cap", "cap"),                          # agree
]


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture()
def night(tmp_path: Path) -> tuple[Path, dict[str, str], FaceSet]:
    """A face set of real PNGs (one per case, plus a train image), the candidate's test_predictions.csv and the
    champion's predictions by sha256."""
    root = tmp_path / "face"
    images = [FaceImage(sha(99), "cap", "train", f"train/cap/{sha(99)}.png", 1)]
    for i, (true, _, _) in enumerate(CASES):
        rel = f"test/{true}/{sha(i)}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(root / rel)
        images.append(FaceImage(sha(i), true, "test", rel, (root / rel).stat().st_size))
    faceset = FaceSet(root, CLASSES, images)
    csv_path = tmp_path / "test_predictions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sha256", "class", "predicted"])
        w.writerows((sha(i), true, ours) for i, (true, ours, _) in enumerate(CASES))
    return csv_path, {sha(i): theirs for i, (_, _, theirs) in enumerate(CASES)}, faceset


def test_rows_per_class_and_direction(night: tuple[Path, dict[str, str], FaceSet]) -> None:
    rows = disagreements(*night)
    assert counts(rows) == {"with_mask": {CANDIDATE_RIGHT: 2, CHAMPION_RIGHT: 1, BOTH_WRONG: 0},
                            "without_mask": {CANDIDATE_RIGHT: 0, CHAMPION_RIGHT: 1, BOTH_WRONG: 1}}
    first = rows[0]
    assert first.true_class == "with_mask" and first.direction == CANDIDATE_RIGHT and first.path.is_file()
    assert first.path == night[2].root / first.image and first.image.startswith("test/with_mask/")
    wrong = [r for r in rows if r.direction == BOTH_WRONG]
    assert [(r.sha256, r.candidate, r.champion) for r in wrong] == [(sha(5), "with_mask", "cap")]
    assert [r.sha256 for r in rows] == [*sorted([sha(0), sha(1)]), sha(2), sha(4), sha(5)]  # class, direction, key


def test_only_images_both_models_scored_count_and_an_unknown_one_has_no_path(
        night: tuple[Path, dict[str, str], FaceSet]) -> None:
    csv_path, champion, faceset = night
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([sha(50), "cap", "with_mask"])                 # scored by both, not in the FaceSet
    champion = {**champion, sha(50): "cap", sha(51): "with_mask"}              # sha(51): the champion only
    champion.pop(sha(0))                                                      # the candidate only
    rows = disagreements(csv_path, champion, faceset)
    assert sha(0) not in {r.sha256 for r in rows} and sha(51) not in {r.sha256 for r in rows}
    (unknown,) = [r for r in rows if r.sha256 == sha(50)]
    assert unknown.path is None and unknown.image == "" and unknown.direction == CHAMPION_RIGHT
    assert f"- `{sha(50)}` (not in the face set): candidate said with_mask, champion said cap" in \
        disagreement_markdown(rows, "v2", "v1")


def test_the_gallery_opens_and_shows_the_images_with_a_file(night: tuple[Path, dict[str, str], FaceSet],
                                                            tmp_path: Path) -> None:
    rows = disagreements(*night)
    out = disagreement_gallery(rows, tmp_path / GALLERY_FILE)
    assert out == tmp_path / GALLERY_FILE
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width >= 112 * len(rows)               # one tile per row, one row of tiles
        assert img.getpixel((56, 20 + 50)) != (255, 255, 255)                     # the first tile holds an image
    missing = [Disagreement(sha(70), None, "", "cap", "cap", "with_mask", CANDIDATE_RIGHT)]
    assert disagreement_gallery(missing, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_the_markdown_lists_counts_and_a_few_keys_per_class_and_direction(
        night: tuple[Path, dict[str, str], FaceSet]) -> None:
    rows = disagreements(*night)
    md = disagreement_markdown(rows, "v2", "v1")
    assert md.startswith(SECTION + "\n")
    assert "Candidate v2 and champion v1 predict different classes for 5 test images" in md and GALLERY_FILE in md
    assert "| true class | candidate right | champion right | both wrong |" in md
    assert "| with_mask | 2 | 1 | 0 |" in md and "| without_mask | 0 | 1 | 1 |" in md
    assert "with_mask, candidate right (2):" in md and "without_mask, both wrong (1):" in md
    assert f"- `test/without_mask/{sha(5)}.png`: candidate said with_mask, champion said cap" in md
    assert "with_mask, both wrong" not in md                                   # an empty group says nothing
    cut = disagreement_markdown(rows, "v2", "v1", limit=1)
    assert "with_mask, candidate right (2, first 1 shown):" in cut and cut.count(sha(0)) + cut.count(sha(1)) == 1


def test_no_disagreement_gives_one_clear_line_and_no_gallery(night: tuple[Path, dict[str, str], FaceSet],
                                                             tmp_path: Path) -> None:
    csv_path, _, faceset = night
    same = {sha(i): ours for i, (_, ours, _) in enumerate(CASES)}            # the champion predicts as the candidate
    rows = disagreements(csv_path, same, faceset)
    assert rows == []
    assert disagreement_markdown(rows, "v2", "v1") == (
        f"{SECTION}\n\nCandidate v2 and champion v1 predict the same class for every test image both scored: "
        "nothing changed.\n")
    assert disagreement_gallery(rows, tmp_path / GALLERY_FILE) is None and not (tmp_path / GALLERY_FILE).exists()


def test_direction_says_who_is_right() -> None:
    assert direction("a", "a", "b") == CANDIDATE_RIGHT and direction("a", "b", "a") == CHAMPION_RIGHT
    assert direction("a", "b", "c") == BOTH_WRONG


groups = st.lists(st.tuples(st.sampled_from(CLASSES), st.sampled_from([CANDIDATE_RIGHT, CHAMPION_RIGHT, BOTH_WRONG])),
                  max_size=120)


@settings(deadline=None, max_examples=100)
@given(groups)
def test_balanced_reorders_every_row_and_shows_each_group_early(keys: list[tuple[str, str]]) -> None:
    """A permutation of the rows in which the first g images (g: the number of (class, direction) groups) are one
    of each group: a sheet cut at 64 tiles still shows every group."""
    rows = [Disagreement(sha(i), None, "", c, "x", "y", d) for i, (c, d) in enumerate(keys)]
    out = balanced(rows)
    assert sorted(r.sha256 for r in out) == sorted(r.sha256 for r in rows)
    present = {(r.true_class, r.direction) for r in rows}
    assert {(r.true_class, r.direction) for r in out[:len(present)]} == present
