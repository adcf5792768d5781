"""Images for people to look at: grids of drawn samples (training, evaluation)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LABEL_PADDING = 4  # px each side of a row label in the grid's left margin


def image_grid(rows: list[list[Image.Image]], min_tile: int = 64, row_labels: list[str] | None = None) -> Image.Image:
    """Rows of equally sized images -> one image (a row per prompt). Tiles smaller than
    `min_tile` (the demo's 16 px) are enlarged without smoothing, so they can be seen.

    `row_labels` (short ASCII, e.g. row numbers) go in a white left margin, one per row, with
    PIL's built-in font: prompts themselves are not drawn, since a font with CJK glyphs may be
    missing; the caller writes which prompt each label stands for beside the grid."""
    width, height = rows[0][0].size
    if width < min_tile:
        scale = -(-min_tile // width)
        rows = [[im.resize((width * scale, height * scale), Image.NEAREST) for im in row] for row in rows]
        width, height = width * scale, height * scale
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    font = ImageFont.load_default() if row_labels else None
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), label, font=font) for label in row_labels or []]
    margin = max(box[2] - box[0] for box in boxes) + 2 * LABEL_PADDING if boxes else 0
    grid = Image.new("RGB", (margin + width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (margin + x * width, y * height))
    draw = ImageDraw.Draw(grid)
    for y, (label, box) in enumerate(zip(row_labels or [], boxes)):
        # Centred in the row: the box's offsets undo the font's own bearing and ascent.
        top = y * height + (height - (box[3] - box[1])) // 2 - box[1]
        draw.text((LABEL_PADDING - box[0], top), label, fill="black", font=font)
    return grid
