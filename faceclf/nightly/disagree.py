"""What changed on the test set: the test images on which the candidate and the champion predict different
classes, per true class and in both directions, as rows, a report.md section and a contact sheet.

The gate's McNemar counts say how many images moved; an approver deciding whether to promote also wants to
see which ones: a candidate that fixes blurry masks but breaks side-on faces has the same counts as one that
fixes and breaks at random. Informing only: the night wraps these in its warnings.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Sequence

from faceclf.dataset.faceset import FaceSet
from faceclf.nightly.gallery import CAPTION_CHARS, contact_sheet

CANDIDATE_RIGHT = "candidate right"
CHAMPION_RIGHT = "champion right"
BOTH_WRONG = "both wrong"
DIRECTIONS = (CANDIDATE_RIGHT, CHAMPION_RIGHT, BOTH_WRONG)
SECTION = "## What changed on the test set"
GALLERY_FILE = "disagreements.png"  # the contact sheet's name next to report.md, as the section refers to it


@dataclass(frozen=True)
class Disagreement:
    """One test image the two models classify differently: its content hash, where it is (``path`` on disk,
    None if the FaceSet does not hold it; ``image``: its path inside the face set), its true class, each model's
    prediction, and ``direction``: which model is right (one of DIRECTIONS)."""

    sha256: str
    path: Path | None
    image: str
    true_class: str
    candidate: str
    champion: str
    direction: str


def direction(true_class: str, candidate: str, champion: str) -> str:
    """Who is right on an image the two models classify differently (so never both)."""
    if candidate == true_class:
        return CANDIDATE_RIGHT
    return CHAMPION_RIGHT if champion == true_class else BOTH_WRONG


def disagreements(test_predictions_csv: Path, champion_predicted: dict[str, str],
                  faceset: FaceSet) -> list[Disagreement]:
    """The test images both models scored on which their predicted classes differ, sorted by true class,
    direction and sha256 (stable from night to night).

    ``test_predictions_csv``: the candidate's RUN/test_predictions.csv (sha256, class, predicted);
    ``champion_predicted``: the champion's predicted class per test sha256 (night.ChampionScore.predicted);
    ``faceset``: the night's FaceSet, for each image's file."""
    with open(test_predictions_csv, newline="", encoding="utf-8") as f:
        candidate = {r["sha256"]: (r["class"], r["predicted"]) for r in csv.DictReader(f)}
    tests = {image.sha256: image for image in faceset.split("test")}
    rows = []
    for sha in sorted(set(candidate) & set(champion_predicted)):
        (true_class, ours), theirs = candidate[sha], champion_predicted[sha]
        if ours == theirs:
            continue
        image = tests.get(sha)
        rows.append(Disagreement(sha, faceset.file(image) if image else None, image.path if image else "",
                                 true_class, ours, theirs, direction(true_class, ours, theirs)))
    return sorted(rows, key=lambda r: (r.true_class, DIRECTIONS.index(r.direction), r.sha256))


def counts(rows: Sequence[Disagreement]) -> dict[str, dict[str, int]]:
    """{true class: {direction: images}}, every direction listed, classes in the order of ``rows``."""
    tally = Counter((r.true_class, r.direction) for r in rows)
    classes = dict.fromkeys(r.true_class for r in rows)
    return {c: {d: tally[(c, d)] for d in DIRECTIONS} for c in classes}


def disagreement_markdown(rows: Sequence[Disagreement], candidate_version: str, champion_version: str,
                          limit: int = 10) -> str:
    """The report.md section "What changed on the test set": per true class, the images each model alone gets
    right (and those both get wrong, differently), then up to ``limit`` images of each class and direction by
    their path in the face set (which holds the key), with what each model said."""
    head = [SECTION, ""]
    if not rows:
        return "\n".join([*head, f"Candidate {candidate_version} and champion {champion_version} predict the same "
                          "class for every test image both scored: nothing changed.", ""])
    table = counts(rows)
    lines = [*head, f"Candidate {candidate_version} and champion {champion_version} predict different classes for "
             f"{len(rows)} test image{'s' if len(rows) != 1 else ''} ({GALLERY_FILE} shows them):", "",
             "| true class | " + " | ".join(DIRECTIONS) + " |", "|" + " --- |" * (len(DIRECTIONS) + 1),
             *[f"| {c} | " + " | ".join(str(by[d]) for d in DIRECTIONS) + " |" for c, by in table.items()], ""]
    for cls, by in table.items():
        for direction in DIRECTIONS:
            group = [r for r in rows if r.true_class == cls and r.direction == direction]
            if not group:
                continue
            more = f", first {limit} shown" if len(group) > limit else ""
            lines.append(f"{cls}, {direction} ({len(group)}{more}):")
            lines += [f"- {f'`{r.image}`' if r.image else f'`{r.sha256}` (not in the face set)'}: candidate said "
                      f"{r.candidate}, champion said {r.champion}" for r in group[:limit]]
            lines.append("")
    return "\n".join(lines)


def balanced(rows: Sequence[Disagreement]) -> list[Disagreement]:
    """``rows`` taken in turn from each (true class, direction) group, so that a sheet cut at gallery.MAX_TILES
    tiles still shows every group rather than the first class only."""
    groups: dict[tuple[str, str], list[Disagreement]] = {}
    for r in rows:
        groups.setdefault((r.true_class, r.direction), []).append(r)
    interleaved = [r for turn in zip_longest(*groups.values()) for r in turn if r is not None]
    return interleaved


def caption(row: Disagreement) -> str:
    """Two caption lines (gallery.CAPTION_CHARS each): the true class, then who was right."""
    return row.true_class[:CAPTION_CHARS].ljust(CAPTION_CHARS) + row.direction


def disagreement_gallery(rows: Sequence[Disagreement], out_png: Path) -> Path | None:
    """A contact sheet of the images the two models disagree on (those the FaceSet holds; every (true class,
    direction) group represented when there are more than a sheet shows), captioned with the true class and
    who was right; None, and nothing written, when there are none."""
    shown = balanced([r for r in rows if r.path is not None])   # contact_sheet cuts at MAX_TILES and says so
    return contact_sheet([(r.path, caption(r)) for r in shown], out_png,
                         "Test images the candidate and the champion classify differently")
