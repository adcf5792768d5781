"""The stage modules (one LightningModule per stage, on the thin `StageModule` base) and what
only training needs (their typed settings, the EMA). The models they train live in
`linguadiff.models`."""
from __future__ import annotations


def stage_class(stage: int):
    """The LightningModule class of a training stage (imported lazily: each pulls in torch).
    Stages 2 and 3 are one module: stage 3 differs from stage 2 in configuration only."""
    if stage == 1:
        from lightning_modules.stage1_alignment import Stage1Alignment

        return Stage1Alignment
    if stage in (2, 3):
        from lightning_modules.diffusion_stage import DiffusionStage

        return DiffusionStage
    raise ValueError(f"there is no stage {stage} (stages 1, 2, 3)")
