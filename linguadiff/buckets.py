"""Aspect-ratio buckets: the training sizes (h, w) an image is cropped to, as SDXL was trained.

SDXL's paper (appendix) trains on sizes of about 1024 x 1024 pixels of area whose sides are
multiples of 64, from 512 x 2048 to 2048 x 512; each image goes to the size nearest its own
aspect ratio, is resized to cover it and cropped, and the micro-conditioning tells the UNet
the original size, the crop offset and that target size. `generate_buckets` makes such a set
for any base (area = model.resolution squared, sides multiples of the base's size step);
`nearest_bucket` is the deterministic assignment training and validation share.

Plain Python: the config checks (`settings_check`) and the data workers both use it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

Bucket = tuple[int, int]  # (height, width) in pixels


def generate_buckets(area: int, step: int, max_ratio: float) -> list[Bucket]:
    """Every (h, w) with sides multiples of `step`, h x w at most `area` and as close to it as
    the step allows (for each height the widest width that fits), and long side / short side
    at most `max_ratio`; sorted from the tallest to the widest.

    area 1024^2, step 64, ratio 4 gives SDXL's list: 512x2048 ... 1024x1024 ... 2048x512.
    """
    if area < step * step or step < 1 or max_ratio < 1:
        raise ValueError(f"need area >= step^2, step >= 1 and max_ratio >= 1; got {area}, {step}, {max_ratio}")
    found: set[Bucket] = set()
    height = step
    while height * step <= area:
        width = area // height // step * step
        if max(height, width) <= max_ratio * min(height, width) + 1e-9:
            found.add((height, width))
            found.add((width, height))
        height += step
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(buckets: Sequence[Bucket], height: int, width: int) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so that 1:2 and
    2:1 are as far from 1:1); ties go to the larger area, then the first listed."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - ratio), 9), -hw[0] * hw[1]))


def bucket_problems(buckets: object, multiple: int) -> list[str]:
    """What is wrong with an explicit bucket list (empty: nothing): pairs of positive ints,
    multiples of `multiple`, no duplicates."""
    if not isinstance(buckets, (list, tuple)) or not buckets:
        return [f"must be a non-empty list of [height, width] pairs, got {buckets!r}"[:200]]
    problems = []
    for entry in buckets:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)):
            problems.append(f"entry {entry!r} is not a [height, width] pair of ints"[:200])
        elif not all(v >= multiple and v % multiple == 0 for v in entry):
            problems.append(f"entry {list(entry)}: sides must be positive multiples of {multiple}")
    pairs = [tuple(entry) for entry in buckets if isinstance(entry, (list, tuple))]
    if len(set(pairs)) != len(pairs):
        problems.append("lists a size twice")
    return problems


def configured_buckets(data: object, resolution: int, multiple: int) -> list[Bucket] | None:
    """The bucket set `data.*` asks for (None: `data.crop=square`): `data.buckets` when listed,
    else generated around `resolution` squared with sides multiples of `data.bucket_step`
    (null: `multiple`, the base's own size step) up to `data.bucket_max_ratio`. Assumes the
    settings passed `settings_check` (which reports what is wrong here by key)."""
    if getattr(data, "crop", "square") != "buckets":
        return None
    listed = getattr(data, "buckets", None)
    if listed:
        return [(int(h), int(w)) for h, w in listed]
    step = getattr(data, "bucket_step", None) or multiple
    return generate_buckets(resolution * resolution, int(step), float(getattr(data, "bucket_max_ratio", 2.0)))


def allow_compiled_sizes(count: int) -> int:
    """Lets a `torch.compile`d part take `count` input sizes without falling back to eager.

    Dynamo compiles a frame again for each new input shape until `recompile_limit` (8 by
    default) compiled versions exist, then runs that frame eagerly for good, with only a log
    line. With `automatic_dynamic_shapes` (on by default) the second size already gives a
    graph with dynamic height and width, so a bucketed run compiles about twice, not once per
    bucket; guards on sizes can still split it, so the limit is raised to cover every bucket
    (twice, plus the validation and sampling sizes). Returns the limit set.
    """
    import torch._dynamo.config as dynamo

    limit = max(int(dynamo.recompile_limit), 2 * count + 2)
    dynamo.recompile_limit = limit
    dynamo.accumulated_recompile_limit = max(int(dynamo.accumulated_recompile_limit), 4 * limit)
    return limit
