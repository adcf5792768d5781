"""Stage-1 alignment between student (LLM + adapter) and teacher (CLIP) features: the losses,
and the retrieval recall that validation and evaluation report."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ContextPart:
    """One text encoder's slice of the teacher's context features (SDXL: CLIP-L 768 | bigG 1280)."""

    name: str
    width: int


@dataclass(frozen=True)
class AlignmentLoss:
    """The stage-1 loss over the teacher's whole output: context, per encoder part, plus pooled.

    The paper's code computes cos-len separately on the CLIP-L (768) and the OpenCLIP-bigG
    (1280) slices of SDXL's 2048-wide context and adds the pooled term. One cosine over the
    joined vector instead weights each slice by its squared norm, so the smaller-norm
    encoder's features can be under-fit while the logged cosine looks fine. `per_encoder`
    (the default) follows the paper: sum over parts of `part_weights[i]` x loss(slice i);
    off, one loss runs over the joined vector. With one part (SD1.5) both are the same.

    ``__call__(student, teacher)`` takes the ``{"context", "pooled"}`` dicts and returns
    ``loss``, ``cosine`` and ``norm_mse`` over the joined context (comparable with any
    setting), ``part_cosines`` ({part name: cosine}, when there are several parts) and
    ``pooled_cosine`` (when both sides have a pooled vector).
    """

    parts: tuple[ContextPart, ...]
    kind: str = "cos_len"
    norm_weight: float = 2e-5
    pooled_weight: float = 1.0
    per_encoder: bool = True
    part_weights: tuple[float, ...] | None = None  # None: 1 each

    def __post_init__(self) -> None:
        if self.kind not in ALIGNMENT_LOSSES:
            raise ValueError(f"alignment loss must be one of {sorted(ALIGNMENT_LOSSES)}, got {self.kind!r}")
        if self.part_weights is not None and len(self.part_weights) != len(self.parts):
            names = [p.name for p in self.parts]
            raise ValueError(f"{len(self.part_weights)} encoder weights for {len(self.parts)} context parts {names}")

    @property
    def loss_fn(self) -> Callable[..., dict[str, torch.Tensor]]:
        return ALIGNMENT_LOSSES[self.kind]

    def context(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        joint = self.loss_fn(student, teacher, self.norm_weight)
        if len(self.parts) < 2:
            return joint
        widths = [p.width for p in self.parts]
        if sum(widths) != teacher.shape[-1]:
            raise ValueError(f"context parts {widths} do not add up to the teacher's width {teacher.shape[-1]}")
        weights = self.part_weights or (1.0,) * len(self.parts)
        out = dict(joint)
        out["part_cosines"] = {}
        total = 0.0
        for part, weight, s, t in zip(self.parts, weights, student.split(widths, -1), teacher.split(widths, -1)):
            piece = self.loss_fn(s, t, self.norm_weight)
            total = total + weight * piece["loss"]
            out["part_cosines"][part.name] = piece["cosine"]
        if self.per_encoder:
            out["loss"] = total
        return out

    def __call__(self, student: dict, teacher: dict) -> dict:
        out = self.context(student["context"], teacher["context"])
        if teacher.get("pooled") is not None and student.get("pooled") is not None:
            pooled = self.loss_fn(student["pooled"], teacher["pooled"], self.norm_weight)
            out["loss"] = out["loss"] + self.pooled_weight * pooled["loss"]
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
def alignment_loss_from_config(loss_cfg, parts: Sequence[ContextPart]) -> AlignmentLoss:
    """The config's `loss` section (configs/base.yaml) -> `AlignmentLoss`; keys added later
    default as in base.yaml, so configs of older runs still build."""
    from linguadiff.config import ConfigError

    if loss_cfg["type"] not in ALIGNMENT_LOSSES:
        raise ConfigError(f"config key 'loss.type' must be one of {sorted(ALIGNMENT_LOSSES)}, got {loss_cfg['type']!r}")
    weights = loss_cfg.get("encoder_weights")
    if weights is not None and len(weights) != len(parts):
        raise ConfigError(f"config key 'loss.encoder_weights' needs {len(parts)} weights, one per context part "
                          f"{[p.name for p in parts]}, got {list(weights)}")
    return AlignmentLoss(
        parts=tuple(parts),
        kind=loss_cfg["type"],
        norm_weight=float(loss_cfg["norm_weight"]),
        pooled_weight=float(loss_cfg["pooled_weight"]),
        per_encoder=bool(loss_cfg.get("per_encoder", True)),
        part_weights=None if weights is None else tuple(float(w) for w in weights),
    )
