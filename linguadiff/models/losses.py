"""Stage-1 alignment between student (LLM + adapter) and teacher (CLIP) features: the losses,
and the retrieval recall that validation and evaluation report."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

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


def alignment_loss(
    student: dict[str, torch.Tensor | None],
    teacher: dict[str, torch.Tensor | None],
    loss_type: str = "cos_len",
    norm_weight: float = 2e-5,
    pooled_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Stage 1's objective on ``{"context", "pooled"}`` outputs: the context term, plus
    `pooled_weight` x the pooled term where both sides have one (SDXL)."""
    loss_fn = ALIGNMENT_LOSSES[loss_type]
    out = loss_fn(student["context"], teacher["context"], norm_weight)
    if teacher.get("pooled") is not None and student.get("pooled") is not None:
        pooled = loss_fn(student["pooled"], teacher["pooled"], norm_weight)
        out["loss"] = out["loss"] + pooled_weight * pooled["loss"]
        out["pooled_cosine"] = pooled["cosine"]
    return out


def token_cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, N, D] x [B, N, D] -> [A, B]: the mean over tokens of the cosine of matching tokens.

    The similarity cos-len optimises, used to rank teacher features for retrieval recall.
    """
    num_tokens = a.shape[1]
    a = F.normalize(a.float(), dim=-1).flatten(1)
    b = F.normalize(b.float(), dim=-1).flatten(1)
    return (a @ b.T) / num_tokens


def retrieval_recall(outputs: list[dict[str, Any]], pool_size: int) -> dict[str, float]:
    """Recall@1/@5 per language: a caption's student output must rank its own English teacher
    output first (in the top 5) among the teacher outputs of up to `pool_size` held-out keys."""
    teacher_by_key: dict[str, torch.Tensor] = {}
    student_by_lang: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for out in outputs:
        for i, (key, lang) in enumerate(zip(out["key"], out["lang"])):
            if key not in teacher_by_key and len(teacher_by_key) < pool_size:
                teacher_by_key[key] = out["teacher"][i]
            student_by_lang[lang].append((key, out["student"][i]))
    keys = list(teacher_by_key)
    if not keys:
        return {}
    index = {k: i for i, k in enumerate(keys)}
    pool = torch.stack([teacher_by_key[k] for k in keys])
    metrics: dict[str, float] = {}
    non_english = []
    for lang, items in sorted(student_by_lang.items()):
        items = [(k, s) for k, s in items if k in index]
        if not items:
            continue
        sims = token_cosine_similarity(torch.stack([s for _, s in items]), pool)
        target = torch.tensor([index[k] for k, _ in items])
        rank = (sims > sims[torch.arange(len(items)), target].unsqueeze(1)).sum(1)
        metrics[f"recall@1/{lang}"] = (rank < 1).float().mean().item()
        metrics[f"recall@5/{lang}"] = (rank < 5).float().mean().item()
        if lang != "en":
            non_english.append(lang)
    if non_english:
        for k in (1, 5):
            metrics[f"recall@{k}/non_english"] = sum(metrics[f"recall@{k}/{l}"] for l in non_english) / len(non_english)
    metrics["recall_pool_size"] = float(len(keys))
    return metrics
