"""The comparison figure: panels of per-language bars per run, the grids side by side, a legend beside."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from evaluation import figure
from evaluation.figure import BAR, GAP, PLOT_H, RUN_COLOURS, write_comparison

LANGS = ["en", "zh", "ja"]


def test_figure_has_a_panel_per_main_score_bars_at_the_values_and_the_grids_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(figure, "FONT_CANDIDATES", ())  # no CJK font: a name it cannot draw becomes "run N"
    figure._font.cache_clear()
    metrics = [
        {"colour/en": 0.25, "colour/zh": 0.5, "colour/ja": 0.75, "binding/colour/en": 0.5},  # the base: English binding only
        {"colour/en": 1.0, "colour/zh": 1.0, "colour/ja": 0.5, "demo_aesthetic/zh": 5.0, "fid": 12.0},
        {"colour/en": 0.0, "colour/zh": 0.5, "colour/ja": 1.0, "demo_aesthetic/zh": 2.5},
    ]
    grid = Image.new("RGB", (64 * 3, 64 * 2), (10, 200, 10))
    path = write_comparison(tmp_path / "out" / "comparison.png", ["base", "stage1", "阶段二"],
                            [tmp_path / "base", tmp_path / "s1", tmp_path / "s2"], metrics, [grid, grid, grid], LANGS)
    image = np.asarray(Image.open(path).convert("RGB"))
    legend = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert legend["panels"] == ["colour", "binding/colour", "demo_aesthetic"]  # main scores only (no fid), in order
    assert [r["label"] for r in legend["runs"]] == ["base", "stage1", "run 3"]
    assert legend["runs"][2]["name"] == "阶段二" and legend["runs"][2]["run_dir"].endswith("s2")

    # Three panels in a row, each a group of three bars per language; three grids side by side below.
    panel_w = 2 * figure.PANEL_PAD + len(LANGS) * (3 * BAR + GAP)
    assert image.shape[1] == max(3 * panel_w, 3 * 64 * 3 + 2 * GAP) + 2 * GAP
    _, layout = figure.comparison_figure(["base", "stage1", "阶段二"], metrics, [grid] * 3, LANGS)
    assert image.shape[0] == layout.grids[0][3] + GAP
    assert [box[0] for box in layout.grids] == [GAP, GAP + 192 + GAP, GAP + 2 * (192 + GAP)]
    for x0, y0, x1, y1 in layout.grids:
        assert (image[y0:y1, x0:x1] == (10, 200, 10)).all()

    def bar_height(family: str, lang: str, run: int) -> int:
        """Pixels of the run's colour in the middle column of its bar, inside the panel's plot."""
        x0, _, x1, _ = layout.bars[(family, lang, run)]
        _, top, _, bottom = layout.panels[family]
        column = image[top:bottom + 1, (x0 + x1) // 2]
        return int((column == RUN_COLOURS[run]).all(1).sum())

    # Accuracies on a 0..1 axis; the aesthetic on 0..1.1 x the largest value.
    assert [bar_height("colour", lang, 0) for lang in LANGS] == [PLOT_H // 4, PLOT_H // 2, 3 * PLOT_H // 4]
    assert bar_height("colour", "en", 1) == PLOT_H and ("colour", "en", 2) in layout.bars
    assert bar_height("colour", "en", 2) == 0
    assert bar_height("demo_aesthetic", "zh", 1) == round(PLOT_H / 1.1)
    assert bar_height("demo_aesthetic", "zh", 2) == round(PLOT_H / 2.2)
    assert ("binding/colour", "zh", 0) not in layout.bars and ("demo_aesthetic", "en", 1) not in layout.bars
