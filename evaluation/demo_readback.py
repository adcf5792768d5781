"""Reading a demo image back: which colour and shape it shows, and how nicely it is composed.

The demo's measures (`evaluation.demo_eval`, scripts/make_demo_base.py) score generated
images with these instead of a learned classifier: the demo world makes that exact. Its
backgrounds are all grey shades, so the shape is the only saturated thing in an image, and
its colours (`datamodules.demo_data.RGB`) are clearly separated hues.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from datamodules.demo_data import COLOURS, RGB


def dominant_colour(image: Image.Image | np.ndarray, min_saturation: int = 60) -> str | None:
    """The demo colour most pixels are closest to, among saturated pixels (None: nothing drawn)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).reshape(-1, 3).astype(np.float32)
    saturated = rgb.max(1) - rgb.min(1) >= min_saturation
    if saturated.sum() < 2:
        return None
    px = rgb[saturated]
    palette = np.array([RGB[c] for c in COLOURS], np.float32)
    # Compare chromaticity (colour direction), not brightness.
    px_c = px - px.mean(1, keepdims=True)
    pal_c = palette - palette.mean(1, keepdims=True)
    sim = (px_c / (np.linalg.norm(px_c, axis=1, keepdims=True) + 1e-6)) @ (pal_c / np.linalg.norm(pal_c, axis=1, keepdims=True)).T
    votes = np.bincount(sim.argmax(1), minlength=len(COLOURS))
    return COLOURS[int(votes.argmax())]


def shape_mask(image: Image.Image, min_saturation: int = 60) -> np.ndarray:
    """The pixels saturated enough to belong to the shape (every demo background is grey)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    return (rgb.max(2) - rgb.min(2)) >= min_saturation


def classify_shape(image: Image.Image) -> str | None:
    """Circle, square or triangle from how much of its bounding box the shape fills."""
    mask = shape_mask(image)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    # square ~1.0, circle ~0.79, triangle ~0.5 (blurred at 16 px, hence the wide bands)
    if fill > 0.86:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def aesthetic_measure(image: Image.Image) -> float:
    """The demo's aesthetic score read back from pixels (the scale of `demo_data.Scene.aesthetic_score`)."""
    mask = shape_mask(image)
    side = mask.shape[0]
    grey = np.asarray(image.convert("L")).astype(np.float32)
    if mask.sum() < 2:
        return 0.0
    ys, xs = np.nonzero(mask)
    radius = np.sqrt(mask.sum() / np.pi) / side
    size_term = float(np.clip((radius - 0.16) / (0.40 - 0.16), 0, 1))
    centre = np.hypot(xs.mean() / side + 0.5 / side - 0.5, ys.mean() / side + 0.5 / side - 0.5)
    centre_term = float(1.0 - min(1.0, centre / 0.32))
    background = grey[~mask]
    clean_term = float(np.clip(1.0 - background.std() / 40.0, 0, 1)) if background.size else 1.0
    return round(10.0 * (0.4 * size_term + 0.4 * centre_term + 0.2 * clean_term), 3)
