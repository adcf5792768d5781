"""Memory planner: will this run fit the GPUs, and if not, what is the cheapest change that makes it fit?

    python -m linguadiff.plan stage=2 model=sdxl llm=qwen2.5-7b strategy=fsdp trainer.devices=8 gpu_memory=80

takes train.py's own ``key=value`` arguments (the same config: presets, stage file, dotted
overrides) plus the planner's options (`PLAN_OPTIONS`: ``gpu_memory=`` GiB per GPU,
``samples=`` for disk and epoch time, ``cached_latents=``/``cached_llm_states=`` for a run
that reads `scripts/cache_features.py` shards, ``tokens=`` for the padded prompt length) and
prints, per rank, what the run's memory holds:

- weights: parameter counts come from the real classes (the LLM's ``AutoModel``, diffusers'
  UNet and VAE, CLIP, our `QueryAdapter`) instantiated on the meta device from config files
  only: the local folder's when a preset points to one, else the copy shipped in
  ``linguadiff/model_configs/`` (every preset's), else the Hugging Face cache. Nothing is
  downloaded. Frozen parts in their dtype, trained ones as fp32 master weights;
- gradients (fp32), AdamW's two fp32 states and the EMA's fp32 copy, for what trains;
- under ``strategy=fsdp`` all of these are split over the ranks of a shard group, unit by
  unit as `linguadiff.strategy.fsdp_units` wraps them (the VAE stays whole on every rank):
  FSDP2 (fsdp.version=2) splits each weight by rows, FSDP1 each unit's flat weight
  (`unit_share`); ``fsdp.frozen=replicate`` keeps the frozen LLM whole on every rank;
  under DDP every rank holds all of it, plus DDP's gradient buckets;
- bf16 working copies of the trained weights (autocast's cast cache, FSDP's gathered units);
- activations: the peak of the step's phases (VAE encode, LLM forward, the trained parts'
  forward + backward; `unet_saved_bytes` and CALIBRATION say how they are counted and fitted);
- a margin for the CUDA context and the allocator.

Exit status: 0 when it fits (or no ``gpu_memory`` was given), 1 when it does not, 2 for a
configuration mistake. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from linguadiff.cli import parse_args
from linguadiff.config import ConfigError, load_config, resolve

GIB = 2**30
CONFIG_FILES = Path(__file__).resolve().parent / "model_configs"

#: The planner's own options (everything else is train.py's config).
PLAN_OPTIONS: dict[str, Any] = {
    "gpu_memory": 0.0,           # GiB per GPU as nvidia-smi shows it (an "80 GB" A100/H100: 80); 0: just print
    "samples": 0,                # training pairs: what caches would cost on disk, time per epoch
    "cached_latents": False,     # the run reads cached VAE latents (no VAE encode in the step)
    "cached_llm_states": False,  # the run reads cached LLM states (no LLM forward in the step)
    "tokens": 0,                 # padded prompt tokens per batch for activations (0: llm.max_length, the worst case)
    "caption_tokens": 32,        # mean real tokens per caption (BOS included) for the LLM-state cache size
    "ema": True,                 # stages 2-3 keep an EMA (false only to compare with benchmarks run --no-ema)
}

BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}

# ------------------------------------------------------------------------------ calibration
# Activations are counted (bytes autograd saves per UNet block type, measured on a CPU, see
# `unet_activation_bytes`) and then scaled by factors fitted once to the GPU peaks measured
# in README "Measured" (one H200, torch 2.11, bf16-mixed, random SDXL + Qwen2.5-7B, paper
# adapter, batch 8 at 1024 px, prompts padded to 121 tokens; benchmarks/bench_stage2.py).
# `calibrate()` recomputes them from ANCHORS; tests/test_plan.py checks they agree.
ANCHORS = {
    "eager": (["stage=2", "model=sdxl", "llm=qwen2.5-7b", "data.batch_size=8", "tokens=121"], 130.2,
              "README Measured row e: full step on the fly, eager, 130.2 GiB"),
    "compiled": (["stage=2", "model=sdxl", "llm=qwen2.5-7b", "data.batch_size=8", "tokens=121", "cached_latents=true",
                  "speed.compile=[unet]"], 108.9, "README Measured row f': cached latents + compiled UNet, 108.9 GiB"),
    "fsdp_checkpointing": (["stage=2", "model=sdxl", "llm=qwen2.5-7b", "data.batch_size=8", "tokens=121",
                            "cached_latents=true", "strategy=fsdp", "fsdp.version=1"], 82.5,
                           "README Measured row g: FSDP1 on one GPU, activation checkpointing, 82.5 GiB"),
}
# UNet step alone at SDXL 1024 px batch 8 (DESIGN.md anchors): 100 GiB eager, 58 GiB with
# diffusers' gradient checkpointing; the UNet's weights, gradients and AdamW states hold 38.3 GiB.
GRADIENT_CHECKPOINTING = (58.0 - 38.26) / (100.0 - 38.26)
# Fitted by calibrate() (see above): measured activation peak / counted saved bytes, and the
# compiled and FSDP-checkpointed peaks relative to the eager one.
CALIBRATION = {"eager": 0.963, "compiled": 0.6, "fsdp_checkpointing": 0.105}
# Activations under trainer.precision=32-true (fp32 compute): about twice bf16's (not measured).
FP32_ACTIVATIONS = 2.0
CONTEXT_GIB = 1.0         # CUDA context, cuBLAS/cuDNN workspaces: not in max_memory_allocated
ALLOCATOR_SLACK = 0.05    # caching allocator fragmentation (expandable segments), of the allocated peak

# Measured img/s per GPU (one H200, README "Measured"), by (model kind, latents cached, UNet compiled, FSDP).
RATES = {
    ("sdxl", False, False, False): (9.27, "SDXL on the fly, eager (README row e)"),
    ("sdxl", True, False, False): (13.09, "SDXL cached latents, eager (README row f)"),
    ("sdxl", True, True, False): (15.56, "SDXL cached latents + compiled UNet (README row f')"),
    ("sdxl", True, False, True): (5.62, "SDXL cached latents, FSDP on one GPU (README row g)"),
    ("sd15", True, False, False): (72.05, "SD1.5 512 px batch 32, cached latents, eager (README)"),
}


class PlanError(ConfigError):
    """The planner cannot count a model (no config file at hand) or was given a bad option."""


# ------------------------------------------------------------------------------ config files

def config_file(path: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The config.json of a model: in its local folder, else shipped with the package, else in
    the Hugging Face cache. Never downloads."""
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    local = Path(str(path)).expanduser()
    if local.is_dir():
        if (local / name).is_file():
            return local / name
        raise PlanError(f"{local} has no {name}: the planner counts parameters from it")
    shipped = CONFIG_FILES / str(path).replace("/", "--") / name
    if shipped.is_file():
        return shipped
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(path), name, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    raise PlanError(f"no {name} for {path!r}: not a local folder, not shipped in {CONFIG_FILES}, not in the Hugging "
                    "Face cache; point the preset to a local copy of the model (its config files suffice)")


# ------------------------------------------------------------------------------ parts on the meta device

@dataclass
class Part:
    name: str           # the stage module's child name (train.trainable, FSDP unit names)
    what: str           # for people
    params: int
    dtype: str          # weights' dtype when frozen; trained parts keep fp32 master weights
    trains: bool
    source: str         # config file counted from


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_parts(cfg: DictConfig):
    """The stage module's parts, built on the meta device: an nn.Module whose children carry
    the stage module's names (so `fsdp_units` wraps it as it wraps the real one), and the
    list of `Part`s. Also returns the UNet config (for activations) and the LLM config."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding

    from linguadiff.models.adapter import QueryAdapter
    from linguadiff.models.prompt_encoder import QUERY_ADAPTER_KEYS

    stage = int(cfg.stage)
    m, llm = cfg.model, cfg.llm
    container = nn.Module()
    container.fsdp_ignored = ("vae",)  # as DiffusionStage: the VAE stays whole on every rank
    sources: dict[str, str] = {}
    unet_config = None
    with torch.device("meta"):
        llm_file = config_file(llm.path, revision=llm.revision)
        try:
            llm_config = AutoConfig.from_pretrained(str(llm_file.parent))
        except ValueError as err:  # a model_type transformers does not know (remote code)
            raise PlanError(f"{llm_file}: {err}".split("\n")[0]) from None
        loader = AutoModelForTextEncoding if getattr(llm_config, "is_encoder_decoder", False) else AutoModel
        text_encoder = nn.Module()
        text_encoder.model = loader.from_config(llm_config)
        container.text_encoder = text_encoder
        sources["text_encoder"] = str(llm_file)
        layers = list(llm.layers)
        llm_width = int(llm_config.hidden_size if hasattr(llm_config, "hidden_size") else llm_config.d_model)
        width = llm_width * (len(layers) if llm.layer_mix == "concat" else 1)
        container.adapter = QueryAdapter(llm_dim=width, **{k: cfg.adapter[k] for k in QUERY_ADAPTER_KEYS})
        sources["adapter"] = "config: adapter.*"
        if stage == 1:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            teacher = nn.Module()
            files = [config_file(m.path, "text_encoder", m.revision)]
            teacher.text_encoder = CLIPTextModel(AutoConfig.from_pretrained(str(files[0].parent)))
            if m.kind == "sdxl":
                files.append(config_file(m.path, "text_encoder_2", m.revision))
                teacher.text_encoder_2 = CLIPTextModelWithProjection(AutoConfig.from_pretrained(str(files[1].parent)))
            container.teacher = teacher
            sources["teacher"] = ", ".join(map(str, files))
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            unet_file = config_file(m.path, "unet", m.revision)
            unet_config = UNet2DConditionModel.load_config(str(unet_file.parent))
            container.unet = UNet2DConditionModel.from_config(unet_config)
            sources["unet"] = str(unet_file)
            if m.kind != "demo":  # the demo's base is pixel-space: no VAE
                vae_file = config_file(m.path, "vae", m.revision)
                container.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(vae_file.parent)))
                sources["vae"] = str(vae_file)
    children = dict(container.named_children())
    wanted = list(cfg.train.trainable)
    unknown = [n for n in wanted if n not in children]
    if unknown:
        raise PlanError(f"config key 'train.trainable' names {unknown}, which stage {stage} does not have; "
                        f"its parts are {sorted(children)}")
    for name, child in children.items():
        child.requires_grad_(name in wanted)
    what = {"text_encoder": f"LLM {llm.name}", "adapter": "adapter", "unet": f"{m.name} UNet", "vae": f"{m.name} VAE",
            "teacher": f"{m.name} CLIP teacher"}
    dtypes = {"text_encoder": str(llm.dtype), "vae": str(m.dtype), "teacher": str(m.dtype)}
    parts = [Part(name, what[name], _count(child), "float32" if name in wanted else dtypes.get(name, "float32"),
                  name in wanted, sources[name]) for name, child in children.items()]
    return container, parts, unet_config, llm_config


# ------------------------------------------------------------------------------ activations

def unet_saved_bytes(unet_config: dict, latent_side: int, context_tokens: int) -> float:
    """Bytes autograd saves for backward in one sample's UNet forward under bf16 autocast.

    Counted per block from the config, with what each block type saves per element of its
    feature map, measured on a CPU with `torch.autograd.graph.saved_tensors_hooks` on
    diffusers' blocks under bf16 autocast (independent of the width, within 0.5%):
    ResnetBlock2D 10 bytes per input and 6 per output element (+2 per input element with a
    1x1 shortcut); each BasicTransformerBlock (self-attention, cross-attention, GEGLU
    feed-forward) 56, its Transformer2DModel wrapper (norm, projections) 8; Upsample2D 8 per
    input element, Downsample2D 2. Cross-attention also keeps K and V of the context.
    """
    c = unet_config
    channels = list(c["block_out_channels"])
    levels = len(channels)
    layers = c.get("transformer_layers_per_block", 1)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    lpb = c["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * levels

    def pixels(level: int) -> int:
        side = max(1, latent_side // 2**level)
        return side * side

    def resnet(cin: int, cout: int, level: int) -> float:
        return (10 * cin + 6 * cout + (2 * cin if cin != cout else 0)) * pixels(level)

    def transformer(width: int, n: int, level: int) -> float:
        return (8 + 56 * n) * width * pixels(level) + n * 4 * context_tokens * width

    total = 10.0 * channels[0] * pixels(0)  # conv_in's output, norm_out + SiLU + conv_out
    prev = channels[0]
    for i, kind in enumerate(c["down_block_types"]):
        for j in range(lpb[i]):
            total += resnet(prev if j == 0 else channels[i], channels[i], i)
            if "CrossAttn" in kind:
                total += transformer(channels[i], layers[i], i)
        if i < levels - 1:
            total += 2 * channels[i] * pixels(i)
        prev = channels[i]
    mid = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid:
        total += 2 * resnet(channels[-1], channels[-1], levels - 1)
        if "CrossAttn" in mid:
            total += transformer(channels[-1], layers[-1], levels - 1)
    reversed_channels, reversed_layers, reversed_lpb = channels[::-1], layers[::-1], lpb[::-1]
    prev = reversed_channels[0]
    for j, kind in enumerate(c["up_block_types"]):
        level = levels - 1 - j
        out = reversed_channels[j]
        skip_in = reversed_channels[min(j + 1, levels - 1)]
        n = reversed_lpb[j] + 1
        for k in range(n):
            skip = skip_in if k == n - 1 else out
            total += resnet((prev if k == 0 else out) + skip, out, level)
            if "CrossAttn" in kind:
                total += transformer(out, reversed_layers[j], level)
        if j < levels - 1:
            total += 8 * out * pixels(level)
        prev = out
    return total


def adapter_saved_bytes(adapter: dict, tokens: int) -> float:
    """One sample's trained adapter forward (pre-norm layers, bf16): per token and layer about
    10 x dim + 2 x ffn values of 2 bytes (norms, q/k/v, attention, output, feed-forward),
    the decoder's cross-attention 4 x dim more; the encoder runs over the prompt's tokens,
    the decoder over the queries."""
    d, f = adapter["dim"], adapter["ffn_dim"]
    encoder = adapter["encoder_layers"] * tokens * (10 * d + 2 * f) * 2
    decoder = adapter["decoder_layers"] * adapter["num_queries"] * (14 * d + 2 * f) * 2
    return float(encoder + decoder)


def llm_forward_bytes(llm_config, batch: int, tokens: int, dtype_bytes: int, keep_all_layers: bool) -> float:
    """The frozen LLM's forward under no_grad: one layer's working set (hidden, attention
    and MLP intermediates) alive at a time, plus every layer's hidden state when several
    layers are read."""
    h = getattr(llm_config, "hidden_size", None) or llm_config.d_model
    inner = getattr(llm_config, "intermediate_size", None) or getattr(llm_config, "d_ff", 4 * h)
    n_layers = getattr(llm_config, "num_hidden_layers", None) or llm_config.num_layers
    work = batch * tokens * (6 * h + 3 * inner) * dtype_bytes
    kept = (n_layers + 1) * batch * tokens * h * dtype_bytes if keep_all_layers else 2 * batch * tokens * h * dtype_bytes
    return float(work + kept)


def vae_encode_bytes(batch: int, resolution: int, first_channels: int, dtype_bytes: int) -> float:
    """The frozen VAE's encoder under no_grad at full resolution: about four tensors of its
    first level's width alive at once (input, normalised, convolved, residual)."""
    return float(4 * batch * first_channels * resolution * resolution * dtype_bytes)


# ------------------------------------------------------------------------------ the plan

@dataclass
class Row:
    label: str
    gib: float
    note: str = ""


@dataclass
class Plan:
    summary: str
    world: int
    shard_group: int
    parts: list[dict]
    rows: list[Row]
    activation_phase: str
    allocated_gib: float
    margin_gib: float
    total_gib: float
    gpu_memory: float
    fits: bool | None
    per_rank_elements: dict[str, int] = field(default_factory=dict)  # sharded parameter elements on rank 0
    suggestions: list[dict] = field(default_factory=list)
    disk: list[dict] = field(default_factory=list)
    epoch: dict | None = None
    calibration: list[str] = field(default_factory=list)
    activation_parts: dict[str, float] = field(default_factory=dict)  # bytes: UNet as counted (before factors), adapter

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        return out


def split_arguments(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], bool]:
    """train.py's arguments, the planner's options, and whether --json was asked."""
    as_json = "--json" in argv
    train_args, plan_args = [], []
    for arg in argv:
        if arg == "--json":
            continue
        key = arg.split("=", 1)[0]
        (plan_args if key in PLAN_OPTIONS else train_args).append(arg)
    return train_args, parse_args(plan_args, PLAN_OPTIONS), as_json


def plan_config(train_args: Sequence[str]) -> DictConfig:
    """train.py's config for these arguments, resolved without its data sources (the planner
    reads no shard; the demo data's resolver would build the demo set)."""
    cfg = load_config(list(train_args))
    OmegaConf.update(cfg, "data.train.urls", "none", merge=False)
    OmegaConf.update(cfg, "data.val.urls", None, merge=False)
    cfg = resolve(cfg)
    from linguadiff.settings_check import settings_problems

    checked = cfg.copy()
    if int(checked.stage) > 1 and not checked.init_from:
        checked.init_from = "(a previous stage's run: not needed to plan)"
    problems = [p for p in settings_problems(checked) if "init_from" not in p]  # train.py's checks, run_dir aside
    if problems:
        raise PlanError("; ".join(problems))
    return cfg


def _units(container) -> list[dict]:
    """FSDP units as linguadiff/strategy.py chooses them: (name, parameters it owns, trains,
    and each weight's rows: (first dimension, elements per row), which FSDP2 shards by).
    A weight tied between modules (mT5's shared embedding) is counted once, in the first unit
    that owns it (`unit_of_parameters`)."""
    from linguadiff.strategy import fsdp_units, unit_of_parameters

    params = dict(container.named_parameters())
    summary: dict[str, dict] = {}
    for name, unit in unit_of_parameters(container, fsdp_units(container, activation_checkpointing=False)).items():
        p = params[name]
        entry = summary.setdefault(unit, {"unit": unit, "parameters": 0, "trains": p.requires_grad, "rows": []})
        entry["parameters"] += p.numel()
        rows = p.shape[0] if p.dim() else 1
        entry["rows"].append((rows, p.numel() // max(rows, 1)))
    return list(summary.values())


def unit_share(unit: dict, group: int, version: int) -> int:
    """Elements of `unit` on the rank holding the most of it, sharded over `group` ranks.
    FSDP1: one flat weight padded to a multiple of the group, 1/group each. FSDP2: each weight
    split by rows (its first dimension) into chunks of ceil(rows / group): rank 0 holds a full
    chunk of every weight (so it is the largest), the last ranks may hold less, or nothing."""
    if group <= 1:
        return unit["parameters"]
    if version == 1:
        return math.ceil(unit["parameters"] / group)
    return sum(min(rows, math.ceil(rows / group)) * per_row for rows, per_row in unit["rows"])


def _part_of(unit: str) -> str:
    return unit.split(".", 1)[0]


def make_plan(train_args: Sequence[str], options: dict[str, Any], _built: dict | None = None) -> Plan:
    cfg = plan_config(train_args)
    key = json.dumps(OmegaConf.to_container(cfg.model), sort_keys=True) + json.dumps(
        OmegaConf.to_container(cfg.llm), sort_keys=True) + json.dumps(
        OmegaConf.to_container(cfg.adapter), sort_keys=True) + str(cfg.stage) + str(list(cfg.train.trainable))
    built = _built if _built is not None else {}
    if key not in built:
        container, parts, unet_config, llm_config = build_parts(cfg)
        built[key] = (parts, unet_config, llm_config, _units(container))
    parts, unet_config, llm_config, units = built[key]
    return _plan(cfg, options, parts, unet_config, llm_config, units)


def _plan(cfg: DictConfig, o: dict[str, Any], parts: list[Part], unet_config, llm_config, units: list[dict]) -> Plan:
    stage = int(cfg.stage)
    t = cfg.trainer
    devices, nodes = int(t.devices), int(t.num_nodes)
    if devices < 1 or nodes < 1:
        raise PlanError("trainer.devices and trainer.num_nodes must be >= 1 (the planner needs a number of GPUs)")
    world = devices * nodes
    strategy = "ddp" if t.strategy == "auto" and world > 1 else str(t.strategy)
    fsdp = strategy == "fsdp"
    version = int(OmegaConf.select(cfg, "fsdp.version", default=2))
    sharding = str(cfg.fsdp.sharding) if fsdp else None
    if fsdp and world == 1 and version == 1:
        sharding = "NO_SHARD"  # FSDP1 on one GPU does not shard (DESIGN.md)
    group = {"FULL_SHARD": world, "SHARD_GRAD_OP": world, "HYBRID_SHARD": devices, "NO_SHARD": 1}.get(sharding, 1)
    # fsdp.frozen=replicate (FSDP2): the frozen parts are no units, whole in their dtype on every rank.
    replicate_frozen = fsdp and version == 2 and str(OmegaConf.select(cfg, "fsdp.frozen", default="shard")) == "replicate"
    if replicate_frozen:
        units = [u for u in units if u["trains"]]
    offload = fsdp and bool(cfg.fsdp.cpu_offload)
    precision = str(t.precision)
    mixed = precision in ("auto", "bf16-mixed", "16-mixed", "bf16", "16")
    batch = int(cfg.data.batch_size)
    compiled = "unet" in list(cfg.speed.compile)
    gc = bool(cfg.diffusion.gradient_checkpointing) and stage > 1
    fsdp_ac = fsdp and bool(cfg.fsdp.activation_checkpointing)
    ema = stage > 1 and bool(o["ema"])
    tokens = int(o["tokens"]) or int(cfg.llm.max_length)

    # Per-rank elements of each part (the rank that holds the most): sharded unit by unit
    # (`unit_share`), whole where not sharded, ignored (the VAE) or replicated (fsdp.frozen).
    by_part: dict[str, int] = {}
    for u in units:
        share = unit_share(u, group, version)
        by_part[_part_of(u["unit"])] = by_part.get(_part_of(u["unit"]), 0) + share
    per_rank = {p.name: (by_part.get(p.name, p.params) if fsdp else p.params) for p in parts}
    trained = [p for p in parts if p.trains]
    trained_elements = sum(per_rank[p.name] for p in trained)
    trained_total = sum(p.params for p in trained)
    on_gpu = 0.0 if offload else 1.0  # cpu_offload keeps shards, gradients and optimizer state in CPU memory

    rows: list[Row] = []
    for p in parts:
        if not p.trains:
            where = "whole on every rank" if fsdp and p.name not in by_part else (
                f"1/{group} per rank" if fsdp and group > 1 else "")
            rows.append(Row(f"frozen weights: {p.what} ({p.dtype})", per_rank[p.name] * BYTES[p.dtype] / GIB * (
                on_gpu if p.name in by_part else 1.0), where))
    names = "+".join(p.name for p in trained)
    shard_note = f"1/{group} per rank" if fsdp and group > 1 else ""
    rows.append(Row(f"trained weights ({names}, fp32)", 4 * trained_elements / GIB * on_gpu, shard_note))
    rows.append(Row("gradients (fp32)", 4 * trained_elements / GIB * on_gpu, shard_note))
    if strategy == "ddp" and world > 1:
        rows.append(Row("DDP gradient buckets (fp32)", 4 * trained_total / GIB, "a second copy of the gradients"))
    rows.append(Row("optimizer state (AdamW: 2 x fp32)", 8 * trained_elements / GIB * on_gpu, shard_note))
    if ema:
        rows.append(Row("EMA (fp32)", 4 * trained_elements / GIB * on_gpu, "in the optimizer state, sharded with it"))
    copy_bytes = 2 if mixed else 4
    # FULL_SHARD (and offload) gathers unit by unit: the frozen ones only in their forward
    # (counted in the LLM's phase below), the trained ones in forward and backward. FSDP2 casts
    # to bf16 unit by unit even on one GPU (its "gathered" copies are the bf16 ones).
    gathers_units = fsdp and ((sharding in ("FULL_SHARD", "HYBRID_SHARD") and (group > 1 or (version == 2 and mixed)))
                              or offload)
    if not fsdp:
        copies = (2 * trained_total / GIB, "autocast's bf16 copies of the trained weights") if mixed else (0.0, "")
    elif gathers_units:
        biggest_trained = max((u["parameters"] for u in units if u["trains"]), default=0)
        copies = (biggest_trained * (3 * copy_bytes + 4) / GIB,
                  "two gathered trained units in flight + one unit's full gradients")
    else:  # SHARD_GRAD_OP / NO_SHARD: the trained weights stay gathered from forward to backward
        copies = (trained_total * copy_bytes / GIB if (mixed or group > 1) else 0.0,
                  "trained weights gathered in " + ("bf16" if mixed else "fp32"))
    rows.append(Row("working copies of trained weights", copies[0], copies[1]))

    # Activations: the largest phase of the step.
    act_scale = 1.0 if mixed else FP32_ACTIVATIONS
    activation_parts: dict[str, float] = {}
    phases: dict[str, float] = {}
    calibration = []
    if stage > 1:
        vae = next((p for p in parts if p.name == "vae"), None)
        latent_factor = 8 if vae is not None else 1
        side = int(cfg.model.resolution) // latent_factor
        unet = unet_saved_bytes(unet_config, side, int(cfg.adapter.num_queries))
        factor = CALIBRATION["eager"]
        calibration.append(f"UNet activations: counted saved bytes x {CALIBRATION['eager']} ({ANCHORS['eager'][2]})")
        if compiled:
            factor *= CALIBRATION["compiled"]
            calibration.append(f"x {CALIBRATION['compiled']} with speed.compile=[unet] ({ANCHORS['compiled'][2]})")
        if fsdp_ac:
            factor *= CALIBRATION["fsdp_checkpointing"]
            calibration.append(f"x {CALIBRATION['fsdp_checkpointing']} for fsdp.activation_checkpointing "
                               f"({ANCHORS['fsdp_checkpointing'][2]})")
        elif gc:
            factor *= GRADIENT_CHECKPOINTING
            calibration.append(f"x {GRADIENT_CHECKPOINTING:.3f} for diffusion.gradient_checkpointing "
                               "(DESIGN.md: SDXL UNet alone 100 GiB, 58 GiB checkpointed)")
        adapter_bytes = (adapter_saved_bytes(cfg.adapter, tokens) * batch * act_scale
                         if any(p.name == "adapter" and p.trains for p in parts) else 0.0)
        activation_parts = {"unet_counted": unet * batch * act_scale, "adapter": adapter_bytes}
        train_phase = unet * factor * batch * act_scale + adapter_bytes
        phases["UNet + adapter forward/backward"] = train_phase
        if vae is not None and not o["cached_latents"]:
            phases["VAE encode"] = vae_encode_bytes(batch, int(cfg.model.resolution), 128, BYTES[vae.dtype])
    else:
        phases["adapter forward/backward"] = adapter_saved_bytes(cfg.adapter, tokens) * batch * act_scale * CALIBRATION["eager"]
    if not o["cached_llm_states"] or stage == 1:
        frozen_units = [u["parameters"] for u in units if not u["trains"] and _part_of(u["unit"]) == "text_encoder"]
        # Frozen units are gathered for their forward whenever they are sharded (FSDP2 reshards
        # them after forward under every mode: no backward would free them).
        frozen_gathered = gathers_units or (fsdp and version == 2 and group > 1)
        gathered = 2 * max(frozen_units, default=0) * BYTES[str(cfg.llm.dtype)] if frozen_gathered else 0
        phases["LLM forward"] = gathered + llm_forward_bytes(llm_config, batch, tokens, BYTES[str(cfg.llm.dtype)],
                                                             list(cfg.llm.layers) != [-1])
    phase, act = max(phases.items(), key=lambda kv: kv[1])
    rows.append(Row(f"activations ({phase}, {batch} per rank)", act / GIB,
                    "largest of: " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in phases.items())))
    allocated = sum(r.gib for r in rows)
    margin = CONTEXT_GIB + ALLOCATOR_SLACK * allocated
    total = allocated + margin
    gpu = float(o["gpu_memory"] or 0)
    precision_name = "bf16-mixed" if mixed else precision
    summary = (f"stage {stage}, model={cfg.model.name} llm={cfg.llm.name}, strategy={strategy}"
               + (f" (FSDP{version} {sharding}{', frozen replicated' if replicate_frozen else ''}"
                  f"{', cpu_offload' if offload else ''})" if fsdp else "")
               + f", {world} rank{'s' if world > 1 else ''} ({devices} x {nodes} node{'s' if nodes > 1 else ''}), "
               f"{precision_name}, batch {batch} per rank"
               + (f" at {cfg.model.resolution} px" if stage > 1 else "")
               + (", gradient checkpointing" if gc else "") + (", compiled UNet" if compiled else "")
               + (", cached latents" if o["cached_latents"] and stage > 1 else "")
               + (", cached LLM states" if o["cached_llm_states"] and stage > 1 else "")
               + ("" if ema or stage == 1 else ", no EMA"))
    return Plan(summary=summary, world=world, shard_group=group, parts=[asdict(p) for p in parts], rows=rows,
                activation_phase=phase, allocated_gib=allocated, margin_gib=margin, total_gib=total, gpu_memory=gpu,
                fits=(total <= gpu) if gpu else None, per_rank_elements={p.name: per_rank[p.name] for p in parts},
                calibration=calibration, activation_parts=activation_parts)


# ------------------------------------------------------------------------------ suggestions

def _with(args: Sequence[str], **changes: Any) -> list[str]:
    """`args` with keys replaced (dotted keys as key__sub: trainer__devices)."""
    keys = {k.replace("__", "."): v for k, v in changes.items()}
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+") not in keys]
    return kept + [f"{k}={v}" for k, v in keys.items()]


def suggestions(train_args: list[str], options: dict[str, Any], plan: Plan, built: dict) -> list[dict]:
    """The cheapest changes that make the run fit, in order (smaller batch, gradient
    checkpointing, cached features, sharding the frozen LLM, full sharding, more GPUs, CPU
    offload), each alone with its predicted per-rank total; when none of the first five fits
    alone, also all of them together with the largest batch that then fits."""
    cfg = plan_config(train_args)
    gpu = plan.gpu_memory
    stage = int(cfg.stage)
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    fsdp = cfg.trainer.strategy == "fsdp"
    sharding = str(cfg.fsdp.sharding)

    def attempt(change: str, changes: dict[str, Any], opts: dict[str, Any]) -> dict:
        p = make_plan(_with(train_args, **changes), opts, built)
        shown = [f"{k.replace('__', '.')}={v}" for k, v in changes.items()]
        shown += [f"{k}={str(v).lower()}" for k, v in opts.items() if v != options[k]]
        return {"change": change, "arguments": shown, "total_gib": round(p.total_gib, 1), "fits": p.total_gib <= gpu}

    def smaller_batch(changes: dict[str, Any], opts: dict[str, Any], label: str) -> dict | None:
        batch, accumulate = int(cfg.data.batch_size), int(cfg.trainer.accumulate_grad_batches)
        b, tried = batch // 2, None
        while b >= 1:
            keep = {"trainer__accumulate_grad_batches": accumulate * batch // b} if batch % b == 0 else {}
            tried = attempt(label.format(b=b), {**changes, "data__batch_size": b, **keep}, opts)
            if tried["fits"]:
                break
            b //= 2
        return tried

    steps: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if stage > 1 and not cfg.diffusion.gradient_checkpointing and not (fsdp and cfg.fsdp.activation_checkpointing):
        steps.append(("gradient checkpointing (a slower step: 11.6 instead of 15.0 img/s, DESIGN.md)",
                      {"diffusion__gradient_checkpointing": "true"}, options))
    if stage > 1 and not (options["cached_latents"] and options["cached_llm_states"]):
        steps.append(("cached features (scripts/cache_features.py with cache.llm_states=true)", {},
                      {**options, "cached_latents": True, "cached_llm_states": True}))
    if world > 1 and fsdp and str(OmegaConf.select(cfg, "fsdp.frozen", default="shard")) == "replicate":
        steps.append(("shard the frozen LLM too", {"fsdp__frozen": "shard"}, options))
    if world > 1 and not (fsdp and sharding in ("SHARD_GRAD_OP", "FULL_SHARD")):
        steps.append(("shard the frozen LLM, gradients and optimizer state (ZeRO-2-like)",
                      {"strategy": "fsdp", "fsdp__sharding": "SHARD_GRAD_OP"}, options))
    if world > 1 and not (fsdp and sharding == "FULL_SHARD"):
        steps.append(("full sharding", {"strategy": "fsdp", "fsdp__sharding": "FULL_SHARD"}, options))
    out = []
    first = smaller_batch({}, options, "data.batch_size={b} (the same global batch through gradient accumulation)")
    if first is not None:
        out.append(first)
    for change, changes, opts in steps:
        tried = attempt(change, changes, opts)
        if tried["total_gib"] < plan.total_gib - 0.05:
            out.append(tried)
    if steps and not any(s["fits"] for s in out):
        changes, opts = {}, dict(options)
        for _, step_changes, step_opts in steps:
            changes.update(step_changes)
            opts.update({k: v for k, v in step_opts.items() if v != options[k]})
        together = attempt("all of the above together", changes, opts)
        if not together["fits"]:
            together = smaller_batch(changes, opts, "all of the above together, data.batch_size={b}") or together
        out.append(together)
    devices = int(cfg.trainer.devices)
    for more in (2, 4, 8, 16, 32, 64, 128):
        if more <= world:
            continue
        per_node = min(more, max(devices, 8))
        tried = attempt(f"{more} GPUs with full sharding",
                        {"strategy": "fsdp", "fsdp__sharding": "FULL_SHARD", "trainer__devices": per_node,
                         "trainer__num_nodes": max(1, more // per_node)}, options)
        if tried["fits"] or more == 128:
            out.append(tried)
            break
    if not (fsdp and cfg.fsdp.cpu_offload):
        out.append(attempt("CPU offload (slow, not measured: weights, gradients and optimizer state in CPU memory)",
                           {"strategy": "fsdp", "fsdp__cpu_offload": "true"}, options))
    return out


# ------------------------------------------------------------------------------ disk and time

def disk_and_time(cfg: DictConfig, options: dict[str, Any], plan: Plan, parts: list[Part], llm_config) -> tuple[list, dict | None]:
    samples = int(options["samples"])
    if not samples or int(cfg.stage) == 1:
        return [], None
    tar_member = 512 + 256  # tar header + on average half a 512-byte block of padding
    rows = []
    res = int(cfg.model.resolution)
    if any(p.name == "vae" for p in parts):
        # cache_features.py writes the VAE's output dtype; numpy has no bf16, so a bf16 VAE's
        # moments are written as float32 (datamodules/cached.to_npy); float16 from an fp16 VAE.
        moment_bytes = 2 if str(cfg.model.dtype) in ("float16", "fp16", "half") else 4
        per = 2 * 4 * (res // 8) ** 2 * moment_bytes + 128 + tar_member
        rows.append({"cache": f"VAE latent moments (2 x 4 x {res // 8} x {res // 8}, "
                     f"{'float16' if moment_bytes == 2 else 'float32'})", "bytes_per_sample": per,
                     "total_tib": per * samples / 2**40})
        if moment_bytes == 4:
            per16 = 2 * 4 * (res // 8) ** 2 * 2 + 128 + tar_member
            rows.append({"cache": "same in float16 (an fp16 VAE's output)", "bytes_per_sample": per16,
                         "total_tib": per16 * samples / 2**40})
    hidden = int(getattr(llm_config, "hidden_size", None) or llm_config.d_model)
    layers = list(cfg.llm.layers)
    width = hidden * (len(layers) if cfg.llm.layer_mix == "concat" else 1)
    t = int(options["caption_tokens"])
    # One float16 [T, width] array per caption at its own length, plus the empty prompt's
    # [1, width]; each npz member costs a zip entry and an npy header (~250 bytes).
    per = (t + 1) * width * 2 + 2 * 250 + tar_member
    rows.append({"cache": f"LLM states ({t} tokens + the empty prompt, {width} wide, float16)",
                 "bytes_per_sample": per, "total_tib": per * samples / 2**40})
    kind = str(cfg.model.kind)
    fsdp = cfg.trainer.strategy == "fsdp"
    key = (kind, bool(options["cached_latents"]), "unet" in list(cfg.speed.compile), fsdp)
    rate = RATES.get(key)
    caveat = "one H200's measured rate x the number of GPUs (scaling and slower GPUs not measured)"
    if rate is None and fsdp and key[:3] + (False,) in RATES:
        rate = RATES[key[:3] + (False,)]
        caveat = ("the same step's rate without FSDP: FSDP's own was measured only on one GPU (0.43x, README row g); "
                  + caveat)
    epoch = {"samples": samples, "world": plan.world}
    if rate is None:
        epoch["note"] = f"no measured rate for {kind} with these settings (README 'Measured' has: " + \
                        "; ".join(v[1] for v in RATES.values()) + ")"
    else:
        per_second = rate[0] * plan.world
        epoch.update({"img_s_per_gpu": rate[0], "rate_source": rate[1], "hours": samples / per_second / 3600,
                      "note": caveat})
    return rows, epoch


# ------------------------------------------------------------------------------ output

def format_plan(plan: Plan) -> str:
    lines = [f"Memory plan per rank: {plan.summary}", "", "parameters (meta device, counted from config files):"]
    for p in plan.parts:
        lines.append(f"  {p['name']:<13} {p['params'] / 1e6:>10.1f}M  {'trains' if p['trains'] else 'frozen'}"
                     f"  {p['dtype'] if not p['trains'] else 'float32'}  <- {p['source']}")
    lines += ["", f"{'per rank':<60} {'GiB':>8}"]
    for r in plan.rows:
        lines.append(f"  {r.label:<58} {r.gib:>8.2f}" + (f"  {r.note}" if r.note else ""))
    lines.append(f"  {'= allocated peak (torch.cuda.max_memory_allocated)':<58} {plan.allocated_gib:>8.2f}")
    lines.append(f"  {'+ CUDA context and allocator margin':<58} {plan.margin_gib:>8.2f}"
                 f"  {CONTEXT_GIB:.0f} GiB + {ALLOCATOR_SLACK:.0%} of the peak")
    lines.append(f"  {'= total':<58} {plan.total_gib:>8.2f}")
    if plan.fits is not None:
        lines.append(f"fits in {plan.gpu_memory:g} GiB: " + (f"yes ({plan.gpu_memory - plan.total_gib:.1f} GiB to spare)"
                                                          if plan.fits else f"NO (short by {plan.total_gib - plan.gpu_memory:.1f} GiB)"))
    if plan.suggestions:
        lines += ["", "changes that would make it fit, cheapest first (predicted per-rank total):"]
        for s in plan.suggestions:
            lines.append(f"  {'fits' if s['fits'] else 'no  '} {s['total_gib']:>7.1f} GiB  {s['change']}: {' '.join(s['arguments'])}")
    if plan.disk:
        lines += ["", "caches on disk (scripts/cache_features.py):"]
        for d in plan.disk:
            lines.append(f"  {d['cache']}: {d['bytes_per_sample'] / 1024:.0f} KiB per sample, {d['total_tib']:.1f} TiB")
    if plan.epoch:
        e = plan.epoch
        if "hours" in e:
            lines.append(f"time per epoch of {e['samples']:,} samples on {e['world']} GPUs: {e['hours']:.1f} h "
                         f"at {e['img_s_per_gpu']} img/s per GPU ({e['rate_source']}; {e['note']})")
        else:
            lines.append(f"time per epoch: {e['note']}")
    lines += ["", "activation estimate (expected error about 10-15%, to be checked on a GPU: benchmarks/gpu_check.sh):"]
    lines += [f"  {c}" for c in plan.calibration] or ["  (stage 1: the adapter's counted bytes x the eager factor)"]
    return "\n".join(lines)


def run(argv: Sequence[str]) -> tuple[Plan, int]:
    train_args, options, _ = split_arguments(argv)
    built: dict = {}
    plan = make_plan(train_args, options, built)
    if plan.fits is False:
        plan.suggestions = suggestions(list(train_args), options, plan, built)
    cfg = plan_config(train_args)
    parts, _, llm_config, _ = next(iter(built.values()))
    plan.disk, plan.epoch = disk_and_time(cfg, options, plan, parts, llm_config)
    return plan, 1 if plan.fits is False else 0


def calibrate() -> dict[str, float]:
    """Refit CALIBRATION from ANCHORS: each anchor's measured peak minus the planner's own
    non-activation bytes, over its counted activation bytes (relative to the eager one)."""
    global CALIBRATION
    saved = dict(CALIBRATION)
    try:
        CALIBRATION = {"eager": 1.0, "compiled": 1.0, "fsdp_checkpointing": 1.0}
        fitted = {}
        for name, (args, measured, _) in ANCHORS.items():
            train_args, options, _ = split_arguments(args)
            plan = make_plan(train_args, options)
            assert plan.activation_phase.startswith("UNet"), plan.activation_phase
            rest = plan.allocated_gib - plan.rows[-1].gib
            parts = plan.activation_parts
            fitted[name] = (measured - rest - parts["adapter"] / GIB) / (parts["unet_counted"] / GIB)
        eager = fitted["eager"]
        return {"eager": round(eager, 3), "compiled": round(fitted["compiled"] / eager, 3),
                "fsdp_checkpointing": round(fitted["fsdp_checkpointing"] / eager, 3)}
    finally:
        CALIBRATION = saved


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    if "--calibrate" in argv:
        print(json.dumps(calibrate()))
        return 0
    try:
        plan, status = run(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if "--json" in argv else format_plan(plan))
    return status


if __name__ == "__main__":
    sys.exit(main())
