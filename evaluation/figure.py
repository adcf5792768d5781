"""The comparison figure ``evaluate.py run_dir=[a,b,...]`` writes beside its table.

One PNG to read at a glance: a panel per main score (colour, shape, binding per category, the
demo's aesthetic measure, the multilingual CLIP score and image cosine: those a run has), each
with a group of bars per language and a bar per run in the run's colour, then every run's
sample grid (rows: prompts, columns: languages) side by side under its name.

Labels are drawn with a font that has the glyphs they need: a CJK font where one is installed
(Noto CJK, WenQuanYi, Droid Sans Fallback...), else DejaVu or PIL's own. A label the font
cannot draw (a run folder named in Chinese on a machine without a CJK font) is shown as
"run N", and ``comparison.json`` beside the PNG always says which run each name and colour is,
the same rule as the training sample grids (digits in the image, the words beside it).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Main scores, in the figure's order: metric family -> panel title. Families are `<family>/<lang>` keys.
MAIN_SCORES = {
    "colour": "colour accuracy",
    "shape": "shape accuracy",
    "binding/colour": "binding: colour",
    "binding/shape": "binding: shape",
    "binding/texture": "binding: texture",
    "demo_aesthetic": "demo aesthetic (0-10)",
    "multilingual/clip_score": "CLIP score vs English",
    "multilingual/image_cosine": "image cosine to English",
}
FRACTIONS = ("colour", "shape", "binding/", "multilingual/image_cosine")  # axis 0..1 whatever the values
RUN_COLOURS = ((90, 90, 90), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34))
# Fonts tried in order (PIL finds a bare file name in the system's font folders): CJK first.
FONT_CANDIDATES = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSansSC-Regular.otf", "SourceHanSans-Regular.otc",
                   "wqy-microhei.ttc", "wqy-zenhei.ttc", "DroidSansFallbackFull.ttf", "ipag.ttf", "DejaVuSans.ttf")
FONT_SIZE = 13
BAR, GAP, PLOT_H, PANEL_PAD, PANELS_PER_ROW = 12, 10, 120, 36, 3


@dataclass
class FigureLayout:
    """Where things are in the figure (for tests and for people reading the json)."""

    panels: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # family -> plot box (x0, y0, x1, y1)
    bars: dict[tuple[str, str, int], tuple[int, int, int, int]] = field(default_factory=dict)  # (family, lang, run) -> bar box
    grids: list[tuple[int, int, int, int]] = field(default_factory=list)  # one box per run with a grid
    labels: list[str] = field(default_factory=list)  # each run's name as drawn


@lru_cache(maxsize=4)
def _font(size: int, candidates: tuple[str, ...]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in candidates:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def label_font(size: int = FONT_SIZE):
    return _font(size, FONT_CANDIDATES)


def can_draw(font, text: str) -> bool:
    """Whether `font` has a glyph for every character of `text`: a missing one draws as the
    font's .notdef box, the same bitmap as a code point no font has."""
    if text.isascii():
        return True
    try:
        missing = font.getmask("\U0010fffd").tobytes()
        return all(ch.isspace() or font.getmask(ch).tobytes() != missing for ch in text)
    except (UnicodeEncodeError, AttributeError, OSError):
        return False


def main_families(metrics: Sequence[dict[str, float]], languages: Sequence[str]) -> list[str]:
    """The MAIN_SCORES families some run has a value for, in any of `languages`."""
    return [family for family in MAIN_SCORES
            if any(f"{family}/{lang}" in run for run in metrics for lang in languages)]


def comparison_figure(names: Sequence[str], metrics: Sequence[dict[str, float]], grids: Sequence[Image.Image | None],
                      languages: Sequence[str]) -> tuple[Image.Image, FigureLayout]:
    """Bars of the main scores per language and run, then the runs' grids side by side."""
    font = label_font()
    labels = [name if can_draw(font, name) else f"run {k + 1}" for k, name in enumerate(names)]
    layout = FigureLayout(labels=labels)
    families = main_families(metrics, languages)
    line = FONT_SIZE + 6
    panel_w = 2 * PANEL_PAD + len(languages) * (len(names) * BAR + GAP)
    panel_h = PLOT_H + 3 * line + 8
    legend_h = line + 8
    rows = math.ceil(len(families) / PANELS_PER_ROW)
    bars_w = min(len(families), PANELS_PER_ROW) * panel_w
    shown = [(k, g) for k, g in enumerate(grids) if g is not None]
    grid_w = sum(g.width for _, g in shown) + GAP * max(0, len(shown) - 1)
    grid_h = max((g.height for _, g in shown), default=0)
    width = max(bars_w, grid_w, 200) + 2 * GAP
    height = legend_h + rows * panel_h + (2 * line + grid_h + GAP if shown else 0) + GAP
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    x = GAP  # legend: a swatch and a name per run
    for k, label in enumerate(labels):
        draw.rectangle((x, GAP, x + 10, GAP + 10), fill=RUN_COLOURS[k % len(RUN_COLOURS)])
        draw.text((x + 14, GAP - 2), label, fill="black", font=font)
        x += 14 + int(draw.textlength(label, font=font)) + 2 * GAP

    for p, family in enumerate(families):
        left = GAP + (p % PANELS_PER_ROW) * panel_w
        top = legend_h + (p // PANELS_PER_ROW) * panel_h
        values = [[run.get(f"{family}/{lang}") for lang in languages] for run in metrics]
        found = [v for row in values for v in row if v is not None and math.isfinite(v)]
        fraction = family.startswith(FRACTIONS)
        top_value = 1.0 if fraction else max(max(found, default=1.0), 1e-9) * 1.1
        plot = (left + PANEL_PAD, top + line + 8, left + panel_w - PANEL_PAD // 2, top + line + 8 + PLOT_H)
        layout.panels[family] = plot
        draw.text((left + PANEL_PAD, top + 2), MAIN_SCORES[family], fill="black", font=font)
        draw.line((plot[0], plot[3], plot[2], plot[3]), fill="black")
        draw.line((plot[0], plot[1], plot[0], plot[3]), fill="black")
        for tick in (0.0, top_value):
            text = f"{tick:.0%}" if fraction else f"{tick:.3g}"
            y = plot[3] - round(tick / top_value * PLOT_H)
            draw.text((plot[0] - 4 - draw.textlength(text, font=font), y - FONT_SIZE // 2), text, fill="black", font=font)
        for g, lang in enumerate(languages):
            group_x = plot[0] + GAP // 2 + g * (len(names) * BAR + GAP)
            for k, row in enumerate(values):
                value = row[g]
                if value is None or not math.isfinite(value):
                    continue
                bar_h = round(min(max(value, 0.0), top_value) / top_value * PLOT_H)
                box = (group_x + k * BAR, plot[3] - bar_h, group_x + (k + 1) * BAR - 2, plot[3] - 1)
                if bar_h > 0:
                    draw.rectangle(box, fill=RUN_COLOURS[k % len(RUN_COLOURS)])
                layout.bars[(family, lang, k)] = box
            centre = group_x + (len(names) * BAR) // 2
            draw.text((centre - draw.textlength(lang, font=font) / 2, plot[3] + 3), lang, fill="black", font=font)

    if shown:  # the grids, each under its run's name and its columns' languages
        top = legend_h + rows * panel_h + GAP
        x = GAP
        for k, grid in shown:
            draw.text((x, top), labels[k], fill=RUN_COLOURS[k % len(RUN_COLOURS)], font=font)
            if grid.width % len(languages) == 0:
                tile = grid.width // len(languages)
                for c, lang in enumerate(languages):
                    draw.text((x + c * tile + tile / 2 - draw.textlength(lang, font=font) / 2, top + line), lang,
                              fill="black", font=font)
            image.paste(grid, (x, top + 2 * line))
            layout.grids.append((x, top + 2 * line, x + grid.width, top + 2 * line + grid.height))
            x += grid.width + GAP
    return image, layout


def write_comparison(path: Path, names: Sequence[str], run_dirs: Sequence[Path], metrics: Sequence[dict[str, float]],
                     grids: Sequence[Image.Image | None], languages: Sequence[str]) -> Path:
    """The figure as `path` (PNG) and its legend as the .json beside it (each run's folder, name, colour)."""
    image, layout = comparison_figure(names, metrics, grids, languages)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    legend = {"figure": path.name, "languages": list(languages), "panels": list(layout.panels),
              "runs": [{"label": label, "name": name, "run_dir": str(run_dir), "colour": "#%02x%02x%02x" % RUN_COLOURS[k % len(RUN_COLOURS)]}
                       for k, (label, name, run_dir) in enumerate(zip(layout.labels, names, run_dirs))]}
    path.with_suffix(".json").write_text(json.dumps(legend, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
