"""FID and KID: torchmetrics' estimators over a feature space chosen by the user.

The published numbers use Inception v3 (torch-fidelity's port, 2048-d pool features);
torchmetrics builds it through torch-fidelity, which downloads the weights on first use.
Offline, give the weights file (`inception_weights=`). Two more feature spaces run
anywhere: CLIP image embeddings (from a local CLIP) and a stand-in made of pixel
statistics, which needs no weights at all and is recorded as a stand-in in metrics.json:
its numbers compare runs with each other, never with a paper.

Features are extracted once per image and fed to both metrics through a pass-through
module, so FID and KID share one pass of the extractor and the reference features are kept
across runs in comparison mode (torchmetrics' ``reset_real_features=False``).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from linguadiff.config import ConfigError

log = logging.getLogger(__name__)

FID_FEATURES = ("auto", "inception", "clip", "pixels")
# torch-fidelity's Inception v3 weights (the TF FID network ported to PyTorch).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
KID_SUBSET_SIZE = 1000  # torchmetrics' default; smaller sets use all their samples
KID_SUBSETS = 100


@dataclass
class FeatureSpace:
    """An image feature extractor (uint8 [N, 3, H, W] -> float [N, D]) and what to call it."""

    name: str
    extract: nn.Module
    stand_in: bool
    description: str


class PixelStatistics(nn.Module):
    """Stand-in features: each image's RGB averaged over a 4 x 4 grid (48 values in [0, 1]).

    Area averages see colour, size and position (what the demo varies) at any resolution,
    need no weights and are exactly linear in the pixels, which makes hand checks possible.
    """

    grid = 4
    num_features = 3 * grid * grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() / 255.0
        return nn.functional.adaptive_avg_pool2d(pixels, self.grid).flatten(1)


class _Passthrough(nn.Module):
    """What torchmetrics calls its feature network when the features are already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def inception_features(weights: str | None) -> nn.Module:
    """torchmetrics' Inception v3 (2048-d), from `weights` or torch-fidelity's download."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"fid_features=inception needs torch-fidelity (pip install torch-fidelity; it imports torchvision): {err}. "
            "Without it use fid_features=clip (with clip=PATH) or fid_features=pixels (a stand-in)"
        ) from None
    except Exception as err:  # a failed download, a missing or wrong weights file
        where = f"from inception_weights={weights}" if weights else "(torch-fidelity downloads them on first use)"
        raise ConfigError(
            f"could not load the Inception weights {where}: {type(err).__name__}: {err}. "
            f"Offline, give inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE} (torch-fidelity's release file)"
        ) from None
    module.num_features = 2048
    return module


def feature_space(name: str, inception_weights: str | None, clip_space: Callable[[], "FeatureSpace"] | None) -> FeatureSpace:
    """The FID/KID feature space named by option `fid_features`.

    `auto` is Inception when weights are given, else the pixel stand-in: an offline run must
    not stall on a download, and a stand-in must never pass for Inception unannounced.
    `clip_space` gives the CLIP image-embedding space (the caller owns the CLIP model).
    """
    if name not in FID_FEATURES:
        raise ConfigError(f"option 'fid_features' must be one of {', '.join(FID_FEATURES)}, got {name!r}")
    if name == "auto":
        name = "inception" if inception_weights else "pixels"
        if name == "pixels":
            log.warning("FID/KID use the pixel-statistics stand-in (no inception_weights=...): compare runs with each "
                        "other only; for published-style FID give inception_weights=PATH (needs torch-fidelity)")
    if name == "inception":
        return FeatureSpace("inception-v3", inception_features(inception_weights), False,
                            f"Inception v3 pool features (torch-fidelity), weights {inception_weights or 'downloaded'}")
    if name == "clip":
        if clip_space is None:
            raise ConfigError("fid_features=clip needs a CLIP model (clip=PATH)")
        return clip_space()
    return FeatureSpace("pixels", PixelStatistics(), True,
                        "stand-in: RGB means over a 4x4 grid (48-d); not Inception, not comparable to published FIDs")


class DistributionDistance:
    """FID and KID (torchmetrics) between reference ("real") and generated images.

    Reference features stay when `reset_generated` starts the next run, so comparison mode
    reads and embeds the reference images once.
    """

    def __init__(self, space: FeatureSpace, device: str | torch.device = "cpu", kid_subsets: int = KID_SUBSETS) -> None:
        self.space = space
        self.device = torch.device(device)
        self.extract = space.extract.to(self.device).eval()
        dim = int(getattr(space.extract, "num_features"))
        self.fid = FrechetInceptionDistance(feature=_Passthrough(dim), reset_real_features=False)
        with warnings.catch_warnings():  # KID keeps every feature: known, and small next to the images
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            self.kid = KernelInceptionDistance(feature=_Passthrough(dim), subsets=kid_subsets, reset_real_features=False)
        self.counts = {"real": 0, "generated": 0}

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of uint8 [N, 3, H, W] images to one side."""
        features = self.extract(images.to(self.device)).float().cpu()
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)
        self.counts["real" if real else "generated"] += len(features)

    def reset_generated(self) -> None:
        self.fid.reset()
        self.kid.reset()
        self.counts["generated"] = 0

    def compute(self, seed: int = 0) -> dict[str, float]:
        """{"fid", "kid_mean", "kid_std"}; KID's random subsets are drawn from `seed`."""
        n = min(self.counts.values())
        if n < 2:
            raise ValueError(f"FID needs at least 2 images on each side, got {self.counts}")
        self.kid.subset_size = min(KID_SUBSET_SIZE, n)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: its first call imports torch._dynamo (seconds)
            kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
