"""The demo's committed tiny CLIP (assets/demo_clip): it loads offline and reads the demo's pictures."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import evaluate
from datamodules import demo_data
from evaluation.clip_models import DEMO_CLIP, DEMO_CLIP_NAME, demo_caption_retrieval, demo_clip, stand_in_clip
from evaluation.runner import EvalSettings, SharedTools

PER_CLASS = 4


@pytest.fixture(scope="module")
def rendered() -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Fresh demo pictures (a seed no training batch starts from), PER_CLASS of every colour x shape."""
    rng = random.Random(2024)
    images, labels = [], []
    for colour in demo_data.COLOURS:
        for shape in demo_data.SHAPES:
            for _ in range(PER_CLASS):
                scene = replace(demo_data.sample_scene(rng), colour=colour, shape=shape)
                images.append(torch.from_numpy(np.array(demo_data.render(scene, 16, rng))).permute(2, 0, 1))
                labels.append((colour, shape))
    return torch.stack(images), labels


def test_the_asset_is_small_safetensors_loaded_offline():
    files = {p.name for p in DEMO_CLIP.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert sum(p.stat().st_size for p in DEMO_CLIP.iterdir()) < 5_000_000
    bundle = demo_clip()
    assert bundle.name == DEMO_CLIP_NAME and not bundle.stand_in
    assert bundle.model.config.vision_config.image_size == 16 and not bundle.model.model.training


def test_the_demo_clip_ranks_the_matching_caption_first_where_a_random_clip_does_not(rendered):
    images, labels = rendered
    ours = demo_caption_retrieval(demo_clip(), images, labels)
    random_clip = demo_caption_retrieval(stand_in_clip(), images, labels)
    assert ours["images"] == 12 * PER_CLASS
    # Chance is 1 in 12; the threshold sits far above what the random CLIP reaches.
    assert ours["retrieval_accuracy"] >= 0.75 > random_clip["retrieval_accuracy"]
    assert ours["colour_accuracy"] >= 0.95
    # Scores (100 x cosine) that mean something: the matching caption well above the others,
    # and positive, so torchmetrics' clamp at 0 does not flatten them.
    assert ours["clip_score_matching"] > 20 and ours["clip_score_matching"] - ours["clip_score_mismatched"] > 20
    assert abs(random_clip["clip_score_matching"] - random_clip["clip_score_mismatched"]) < 5


def test_demo_runs_get_the_demo_clip_and_others_the_stand_in_unless_clip_is_given():
    settings = EvalSettings.from_args(dict(evaluate.OPTIONS), "cpu", "float32")
    assert SharedTools(settings, demo=True).clip.name == DEMO_CLIP_NAME
    assert SharedTools(settings, demo=False).clip.stand_in
    given = EvalSettings.from_args({**evaluate.OPTIONS, "clip": str(DEMO_CLIP)}, "cpu", "float32")
    bundle = SharedTools(given, demo=False).clip
    assert not bundle.stand_in and bundle.name == "demo_clip"  # the folder's name
