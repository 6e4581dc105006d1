"""ImageIndex.take: the columns of the images asked for, whatever the order, paths included."""

from __future__ import annotations

import numpy as np
import pytest

from faceclf.dataset.faceset import FaceImage, ImageIndex, evenly_spread


def _images(n: int) -> list[FaceImage]:
    """n images with paths of different lengths, some not ASCII (UTF-8 of several bytes per character)."""
    return [FaceImage(f"{k:064x}", ("a", "b")[k % 2], ("train", "val", "test")[k % 3],
                      f"train/{'ä' * (k % 4)}img-{k}{'x' * (k % 7)}.jpg", 100 + k, 10 + k) for k in range(n)]


@pytest.mark.parametrize("positions", [
    np.array([True, False, True, True, False, False, True, False, False, True, True, False, True]),  # a mask
    np.array([0, 3, 4, 9, 12]),          # increasing: cut out through a byte mask
    np.array([12, 0, 5, 5, 1]),          # any order, repeats: joined piece by piece
    np.array([7]),
    np.array([], dtype=np.int64),
    np.zeros(13, dtype=bool),
])
def test_take_gives_the_images_at_the_positions(positions: np.ndarray) -> None:
    items = _images(13)
    index = ImageIndex(items)
    expected = [items[k] for k in (np.flatnonzero(positions) if positions.dtype == bool else positions)]
    taken = index.take(positions)
    assert list(taken) == expected
    assert taken == ImageIndex(expected)  # columns equal to an index built from the images themselves


def test_take_of_a_take_and_a_slice() -> None:
    items = _images(20)
    index = ImageIndex(items)
    assert list(index.take(np.arange(3, 17)).take(np.array([1, 2, 10]))) == [items[4], items[5], items[13]]
    assert list(index[5:9]) == items[5:9]
    assert list(ImageIndex([]).take(np.array([], dtype=np.int64))) == []


@pytest.mark.parametrize("n, k, expected", [(10, 3, [0, 4, 9]), (5, 5, [0, 1, 2, 3, 4]), (3, 8, [0, 1, 2]),
                                            (7, 1, [0]), (0, 4, [])])
def test_evenly_spread_spans_first_to_last(n: int, k: int, expected: list[int]) -> None:
    assert evenly_spread(n, k).tolist() == expected
