"""The stage modules and the parts they share (LLM text encoder, CLIP teacher, adapter, UNet)."""
from __future__ import annotations


def stage_class(stage: int):
    """The LightningModule class of a training stage (imported lazily: each pulls in torch)."""
    if stage == 1:
        from lightning_modules.stage1_alignment import Stage1Alignment

        return Stage1Alignment
    if stage == 2:
        from lightning_modules.stage2_end_to_end import Stage2EndToEnd

        return Stage2EndToEnd
    if stage == 3:
        from lightning_modules.stage3_aesthetic import Stage3Aesthetic

        return Stage3Aesthetic
    raise ValueError(f"there is no stage {stage} (stages 1, 2, 3)")
