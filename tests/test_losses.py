"""Stage-1 alignment loss: the paper code's cos-len per SDXL encoder part (issue 14.2)."""
from __future__ import annotations

import pytest
import torch

from linguadiff.config import ConfigError
from linguadiff.models.losses import AlignmentLoss, ContextPart, alignment_loss_from_config

SDXL_PARTS = (ContextPart("clip_l", 768), ContextPart("clip_g", 1280))


def cos_len_by_hand(s: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
    """(1 - mean token cosine) + w x mean squared difference of the vector norms, written out."""
    dot = (s * t).sum(-1)
    ns, nt = (s * s).sum(-1).sqrt(), (t * t).sum(-1).sqrt()
    return (1 - (dot / (ns * nt)).mean()) + w * ((ns - nt) ** 2).mean()


def random_case(seed: int = 0, batch: int = 3, tokens: int = 11):
    g = torch.Generator().manual_seed(seed)
    # bigG's features are larger than CLIP-L's in SDXL: give the halves different scales.
    teacher = torch.cat([torch.randn(batch, tokens, 768, generator=g), 4 * torch.randn(batch, tokens, 1280, generator=g)], -1)
    student = teacher + 0.5 * torch.randn(teacher.shape, generator=g)
    pooled_t = torch.randn(batch, 1280, generator=g)
    pooled_s = pooled_t + 0.3 * torch.randn(batch, 1280, generator=g)
    return {"context": student, "pooled": pooled_s}, {"context": teacher, "pooled": pooled_t}


def test_per_encoder_loss_equals_the_authors_formula_by_hand():
    student, teacher = random_case()
    w = 2e-5
    loss = AlignmentLoss(SDXL_PARTS, norm_weight=w, pooled_weight=1.0)(student, teacher)
    s, t = student["context"].double(), teacher["context"].double()
    expected = (cos_len_by_hand(s[..., :768], t[..., :768], w) + cos_len_by_hand(s[..., 768:], t[..., 768:], w)
                + cos_len_by_hand(student["pooled"].double(), teacher["pooled"].double(), w))
    assert loss["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(loss["part_cosines"]) == {"clip_l", "clip_g"}
    # Weights per encoder: 2 x CLIP-L + 0.5 x bigG.
    weighted = AlignmentLoss(SDXL_PARTS, norm_weight=w, pooled_weight=0.0, part_weights=(2.0, 0.5))(student, teacher)
    by_hand = 2 * cos_len_by_hand(s[..., :768], t[..., :768], w) + 0.5 * cos_len_by_hand(s[..., 768:], t[..., 768:], w)
    assert weighted["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    # per_encoder off: one cos-len over the joined 2048-wide vector.
    joint = AlignmentLoss(SDXL_PARTS, norm_weight=w, pooled_weight=0.0, per_encoder=False)(student, teacher)
    assert joint["loss"].item() == pytest.approx(cos_len_by_hand(s, t, w).item(), rel=1e-5)


def test_perturbing_one_encoders_half_raises_the_loss_the_joint_cosine_barely_sees():
    student, teacher = random_case(seed=1)
    g = torch.Generator().manual_seed(2)
    perturbed = dict(teacher, context=teacher["context"].clone())
    perturbed["context"][..., :768] = torch.randn(perturbed["context"][..., :768].shape, generator=g)  # CLIP-L half only
    per_encoder = AlignmentLoss(SDXL_PARTS)
    joint = AlignmentLoss(SDXL_PARTS, per_encoder=False)
    before, after = per_encoder(student, teacher), per_encoder(student, perturbed)
    rise = after["loss"] - before["loss"]
    assert rise > 0.5  # CLIP-L's cosine fell from ~0.9 to ~0
    assert after["part_cosines"]["clip_l"] < 0.1 < 0.8 < before["part_cosines"]["clip_l"]
    assert after["part_cosines"]["clip_g"] == before["part_cosines"]["clip_g"]
    # The joined cosine weights the halves by their squared norms: bigG (4x larger) hides it.
    assert joint(student, perturbed)["loss"] - joint(student, teacher)["loss"] < rise / 4


def test_one_part_is_the_plain_loss_and_config_errors_name_the_key():
    student, teacher = random_case()
    sd15 = {"context": student["context"][..., :768], "pooled": None}
    target = {"context": teacher["context"][..., :768], "pooled": None}
    out = AlignmentLoss((ContextPart("clip_l", 768),))(sd15, target)
    assert "part_cosines" not in out
    assert out["loss"].item() == pytest.approx(cos_len_by_hand(sd15["context"], target["context"], 2e-5).item(), rel=1e-5)
    settings = {"type": "cos_len", "norm_weight": 2e-5, "pooled_weight": 1.0, "encoder_weights": [1.0]}
    with pytest.raises(ConfigError, match="loss.encoder_weights"):
        alignment_loss_from_config(settings, SDXL_PARTS)
    assert alignment_loss_from_config({k: v for k, v in settings.items() if k != "encoder_weights"}, SDXL_PARTS).per_encoder
