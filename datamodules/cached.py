"""Cached features in image-text shards: what `scripts/cache_features.py` writes and the
stage-2/3 datamodule reads instead of images (and, optionally, instead of running the LLM).

Per sample, beside the original `KEY.txt` and `KEY.json`:

- `KEY.moments.npy`: the VAE encoder's output for the centre crop, [2C, h, w] (mean and
  log-variance, the parameters of the latent distribution). Training samples from it as
  the VAE would (`linguadiff.models.diffusion.sample_latents`), so a cached batch gives the same loss as the image
  would with the same random state. Stored in the VAE's dtype (bf16 as float32: numpy has
  no bf16, and the widening is exact).
- `KEY.pixels.npy`: for pixel-space bases (the demo), the centre crop as uint8 [3, R, R].
- `KEY.llm.npz` (optional): the frozen LLM's features in float16, one array per caption,
  named `LANG/INDEX` in the order `caption_candidates` lists them, trimmed to the caption's
  own tokens (the mask is all ones up to that length), plus `empty` for the empty prompt
  that caption dropout feeds.
- `KEY.json` gains `linguadiff_cache`: resolution, `original_size` and `crop_top_left` of the
  crop (SDXL's micro-conditioning), and the LLM settings the features were made with;
  features from another LLM setting are ignored (the LLM then runs as usual).
"""
from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

MOMENTS, PIXELS, LLM_STATES = "moments.npy", "pixels.npy", "llm.npz"
CACHE_MEMBERS = frozenset((MOMENTS, PIXELS, LLM_STATES))
META_KEY = "linguadiff_cache"
# The LLM settings cached features depend on (config `llm` keys). `dtype`: a bf16 LLM's
# states differ from an fp32 one's; caches written before it was recorded lack it, and are
# stale like any other mismatch.
LLM_SIGNATURE_KEYS = ("path", "revision", "layers", "layer_mix", "max_length", "bos", "dtype")
EMPTY = "empty"
# Bounds on cached arrays, checked from the npy header before anything is allocated.
MAX_CACHED_ARRAY_BYTES = 64 * 1024 * 1024
MOMENTS_DTYPES = ("float32", "float16")
PIXELS_DTYPES = ("uint8",)
LLM_STATES_DTYPES = ("float16",)


def llm_signature(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The `llm` settings cached states are valid for, in plain types (the dtype by its
    canonical name, so `bf16` and `bfloat16` agree)."""
    signature = {key: (list(settings[key]) if key == "layers" else settings.get(key)) for key in LLM_SIGNATURE_KEYS}
    if signature["dtype"] is not None:
        from linguadiff.models.text_encoder import torch_dtype

        signature["dtype"] = str(torch_dtype(str(signature["dtype"]))).removeprefix("torch.")
    return signature


def signature_difference(cached: Any, wanted: Mapping[str, Any]) -> str | None:
    """None when cached LLM states were made with the settings `wanted`, else which `llm.*`
    keys differ, cached value against this run's (a key the cache does not record: "not
    recorded", e.g. `dtype` in caches written before it was part of the signature)."""
    if not isinstance(cached, Mapping):
        return "the cache records no LLM settings"
    if dict(cached) == dict(wanted):
        return None
    parts = []
    for key in sorted(set(wanted) | set(cached), key=lambda k: (k not in LLM_SIGNATURE_KEYS, k)):
        if key not in cached:
            parts.append(f"llm.{key}: not recorded in the cache (written before it was part of the signature), "
                         f"this run {wanted[key]!r}")
        elif cached.get(key) != wanted.get(key):
            parts.append(f"llm.{key}: cached {cached[key]!r}, this run {wanted.get(key)!r}")
    return "; ".join(parts) or "the cache's LLM settings differ"


def to_npy(array: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def from_npy(
    payload: bytes,
    dtypes: Sequence[str] | None = None,
    ndim: int | None = None,
    max_bytes: int = MAX_CACHED_ARRAY_BYTES,
) -> np.ndarray:
    """An npy payload as an array, its header checked first: dtype among `dtypes` (never
    objects, so never pickles), `ndim` dimensions, at most `max_bytes`, and exactly as many
    data bytes as the header claims. A header claiming terabytes is refused before any
    allocation. Raises ValueError."""
    buffer = io.BytesIO(payload)
    major, _ = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buffer)
    if dtype.hasobject or (dtypes is not None and dtype.name not in dtypes):
        raise ValueError(f"npy dtype {dtype} (expected {'/'.join(dtypes or ('a plain number type',))})")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"npy shape {shape} has {len(shape)} dimensions, expected {ndim}")
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"npy shape {shape} is not a shape")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise ValueError(f"npy header claims {nbytes} bytes > {max_bytes}")
    if nbytes != len(payload) - buffer.tell():
        raise ValueError(f"npy header claims {nbytes} data bytes, the member has {len(payload) - buffer.tell()}")
    return np.load(io.BytesIO(payload), allow_pickle=False)


def llm_npz(states: Mapping[str, torch.Tensor]) -> bytes:
    """{name: [T, D]} -> npz bytes (float16)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: s.detach().cpu().to(torch.float16).numpy() for name, s in states.items()})
    return buffer.getvalue()


def read_llm_npz(payload: bytes, max_bytes: int = MAX_CACHED_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """{name: [T, D] float16} from an llm.npz, every member checked like `from_npy` (no
    pickles, no object arrays, sizes bounded before reading, also when compressed).
    Raises ValueError."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or info.file_size > max_bytes:
                raise ValueError(f"llm.npz member {info.filename[:80]!r} ({info.file_size} bytes) refused")
            arrays[info.filename[: -len(".npy")]] = from_npy(archive.read(info), LLM_STATES_DTYPES, 2, max_bytes)
    return arrays


def caption_name(lang: str, index: int) -> str:
    return f"{lang}/{index}"


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] float16 -> features [B, T, D] float32 (zeros after each one's end) and mask [B, T]."""
    width = max(1, max(s.shape[0] for s in states))
    features = torch.zeros(len(states), width, states[0].shape[1])
    mask = torch.zeros(len(states), width, dtype=torch.bool)
    for i, s in enumerate(states):
        features[i, : s.shape[0]] = s.float()
        mask[i, : s.shape[0]] = True
    return features, mask
