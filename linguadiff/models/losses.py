"""Stage-1 alignment losses between student (LLM + adapter) and teacher (CLIP) features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cos_len_loss(student: torch.Tensor, teacher: torch.Tensor, norm_weight: float = 2e-5) -> dict[str, torch.Tensor]:
    """The paper code's "cos-len" loss for one target ([B, N, D] tokens or [B, D] pooled).

    (1 - mean cosine similarity) aligns directions; `norm_weight` x MSE between the vectors'
    norms keeps their lengths, which the UNet's cross-attention is sensitive to.
    """
    student, teacher = student.float(), teacher.float()
    cosine = F.cosine_similarity(student, teacher, dim=-1).mean()
    norm_mse = F.mse_loss(student.norm(dim=-1), teacher.norm(dim=-1))
    return {"loss": (1.0 - cosine) + norm_weight * norm_mse, "cosine": cosine.detach(), "norm_mse": norm_mse.detach()}


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, norm_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Plain mean squared error (cosine and norm error reported for comparison)."""
    student, teacher = student.float(), teacher.float()
    return {
        "loss": F.mse_loss(student, teacher),
        "cosine": F.cosine_similarity(student, teacher, dim=-1).mean().detach(),
        "norm_mse": F.mse_loss(student.norm(dim=-1), teacher.norm(dim=-1)).detach(),
    }


ALIGNMENT_LOSSES = {"cos_len": cos_len_loss, "mse": mse_loss}


def token_cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, N, D] x [B, N, D] -> [A, B]: the mean over tokens of the cosine of matching tokens.

    The similarity cos-len optimises, used to rank teacher features for retrieval recall.
    """
    num_tokens = a.shape[1]
    a = F.normalize(a.float(), dim=-1).flatten(1)
    b = F.normalize(b.float(), dim=-1).flatten(1)
    return (a @ b.T) / num_tokens
