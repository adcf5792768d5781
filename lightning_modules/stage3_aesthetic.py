"""Stage 3: aesthetic fine-tuning on a small high-quality set.

Paper, stage 3: the same diffusion loss as stage 2, on high-aesthetic images only (40K in
the paper); its figure freezes the adapter and trains the UNet. Here the set is selected by
`data.min_aesthetic` from the shards' json scores before any image is decoded, the adapter
is frozen by default (`train.trainable: [unet]`, configs/stage3.yaml) and the learning rate
is lower. It starts from a stage-2 export: that run's EMA adapter and EMA UNet.
"""
from __future__ import annotations

from lightning_modules.stage2_end_to_end import Stage2EndToEnd


class Stage3Aesthetic(Stage2EndToEnd):
    init_stage = 2
