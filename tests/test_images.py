"""linguadiff/images.py: sample grids, with and without row labels."""
from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from linguadiff.images import image_grid


def _rows() -> list[list[Image.Image]]:
    colours = [["red", "green"], ["blue", "yellow"]]
    return [[Image.new("RGB", (64, 48), c) for c in row] for row in colours]


def test_row_labels_add_a_left_margin_and_leave_the_tiles_alone():
    plain = image_grid(_rows())
    labelled = image_grid(_rows(), row_labels=["0", "1"])
    assert plain.size == (128, 96)
    margin = labelled.width - plain.width
    assert 0 < margin < 32 and labelled.height == plain.height  # a narrow margin, no new rows
    # Every tile sits where it was, shifted right by the margin, pixel for pixel.
    assert ImageChops.difference(labelled.crop((margin, 0, labelled.width, labelled.height)), plain).getbbox() is None
    # The margin holds a dark label in each row, on white.
    for y in range(2):
        row_margin = labelled.crop((0, y * 48, margin, (y + 1) * 48)).convert("L")
        assert min(row_margin.getdata()) < 128 and max(row_margin.getdata()) == 255


def test_row_labels_must_match_the_rows():
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid(_rows(), row_labels=["0"])
