"""The stage modules and the parts they share (LLM text encoder, CLIP teacher, adapter)."""
from __future__ import annotations


def stage_class(stage: int):
    """The LightningModule class of a training stage (imported lazily: each pulls in torch)."""
    if stage == 1:
        from lightning_modules.stage1_alignment import Stage1Alignment

        return Stage1Alignment
    raise NotImplementedError(f"stage {stage} is not available yet")
