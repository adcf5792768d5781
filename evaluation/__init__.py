"""Evaluation of trained runs (``evaluate.py``): FID/KID, CLIP score, aesthetic score,
multilingual consistency, long prompts, attribute binding, stage-1 text alignment and the demo's
colour accuracy.

- `prompt_sets`: bundled prompt sets and caption files;
- `image_features`: FID/KID feature spaces (Inception, CLIP, a pixel stand-in) and the estimators;
- `clip_models`: CLIP from a local folder or a stand-in, the CLIP score, CLIP-space similarity;
- `aesthetic`: the LAION-style aesthetic head;
- `references`: reference images from a folder or shards;
- `text_alignment`: stage-1 measures on held-out parallel text;
- `binding`: attribute binding per object by a VQA model (BLIP-VQA, or the demo's read-back in `demo_readback`);
- `figure`: the comparison PNG of several runs;
- `report`: metrics.json, the comparison table, TensorBoard;
- `runner`: one run's evaluation, set by set.
"""
