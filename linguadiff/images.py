"""Images for people to look at: grids of drawn samples (training, evaluation)."""
from __future__ import annotations

from PIL import Image


def image_grid(rows: list[list[Image.Image]], min_tile: int = 64) -> Image.Image:
    """Rows of equally sized images -> one image (a row per prompt). Tiles smaller than
    `min_tile` (the demo's 16 px) are enlarged without smoothing, so they can be seen."""
    width, height = rows[0][0].size
    if width < min_tile:
        scale = -(-min_tile // width)
        rows = [[im.resize((width * scale, height * scale), Image.NEAREST) for im in row] for row in rows]
        width, height = width * scale, height * scale
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid
