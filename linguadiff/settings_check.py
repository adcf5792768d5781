"""Settings that cannot work, found before any model loads (`check_settings`).

Loading a 7B LLM takes minutes on a cluster: a learning rate of 0, a misspelt scheduler name
or a data path that matches no file must stop a run before that, with one ``error:`` line.
`load_config` already checks key names and value types; this module checks ranges, choices
and what depends on several keys, on the resolved config, reading no weights (at most the
base's small ``config.json`` files, for the resolution rule). Every problem found is reported
at once, in one message whose parts are separated by "; ", each naming the key, the value
and what is allowed, so one relaunch fixes them all.

Checks that need code above this layer (the data readers' URL expansion) come in as
`extra` callables that return problems the same way (train.py passes
`datamodules.shard_problems`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from linguadiff.buckets import bucket_problems
from linguadiff.config import STAGES, ConfigError

# Choices, as the code that reads each key takes them.
CROPS = ("square", "buckets")  # datamodules/image_shards.py
LAYER_MIXES = ("mean", "concat")  # models/text_encoder.py
LLM_BOS = ("auto", "none")  # models/text_encoder.py PromptTokenizer
LOSS_TYPES = ("cos_len", "mse")  # models/losses.py ALIGNMENT_LOSSES
PREDICTION_TYPES = (None, "epsilon", "v_prediction")  # models/diffusion.py
SCHEDULES = ("cosine", "constant")  # lightning_modules/base.py
SAMPLERS = ("dpm++", "ddim", "euler", "ddpm")  # generation.py make_scheduler
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")  # torch ShardingStrategy
FSDP_VERSIONS = (1, 2)  # strategy.py: FullyShardedDataParallel | fully_shard
FSDP_FROZEN = ("shard", "replicate")  # strategy.py FROZEN_MODES
# On two one-rank nodes (CPUs, gloo), FSDP1's HYBRID_SHARD run exported weights (rank 0's EMA) that
# differ from its own checkpoint's in 25 of 41 adapter tensors (the checkpoint keeps some tensors
# from the other node): its replicas did not stay equal. FSDP2's 2-D mesh passes the same test.
FSDP1_HYBRID = ("config key 'fsdp.sharding' is HYBRID_SHARD, which needs fsdp.version=2 (in a two-node test, "
                "FSDP1's hybrid sharding exported weights that differ from its own checkpoint)")
STRATEGIES = ("auto", "ddp", "fsdp")  # strategy.py
UNET_TRAINING = ("full", "lora")  # lightning_modules/diffusion_stage.py
MODEL_KINDS = ("demo", "sd15", "sdxl")
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float")  # text_encoder.torch_dtype
# The stage modules' parts (children) that train.trainable and speed.compile may name.
STAGE_PARTS = {1: ("text_encoder", "adapter", "teacher"), 2: ("text_encoder", "adapter", "unet", "vae")}
STAGE_PARTS[3] = STAGE_PARTS[2]
# A control run (text_encoder=clip): the base's own CLIP in place of the LLM + adapter; only the UNet trains.
CONTROL_PARTS = ("text_encoder", "unet", "vae")
TEXT_ENCODERS = ("llm", "clip")  # export.py

# Stable Diffusion bases: a VAE of 8x and a UNet with 3 downsamplings, when the base's own
# config files are not at hand (a Hugging Face name): 8 x 2^3 = 64.
SD_VAE_FACTOR, SD_UNET_LEVELS = 8, 4

Problems = list[str]
ExtraCheck = Callable[[DictConfig], Iterable[str]]


def check_settings(cfg: DictConfig, extra: Iterable[ExtraCheck] = (), training: bool = True) -> None:
    """Raise ConfigError listing every setting of the resolved `cfg` that cannot work.
    `training=False` (tools that only read the config's models and data, like
    scripts/cache_features.py) leaves out what only a training run needs (init_from)."""
    problems = settings_problems(cfg, training)
    for check in extra:
        problems += list(check(cfg))
    if problems:
        raise ConfigError("; ".join(problems))


def settings_problems(cfg: DictConfig, training: bool = True) -> Problems:
    """Every problem in the resolved `cfg`, one sentence each (empty: all fine)."""
    p: Problems = []
    c = _Checker(cfg, p)
    stage = OmegaConf.select(cfg, "stage")
    c.choice("stage", STAGES)
    stage = stage if stage in STAGES else None

    # model and LLM
    c.choice("model.kind", MODEL_KINDS)
    c.choice("model.dtype", DTYPES)
    c.choice("llm.dtype", DTYPES)
    c.integer("llm.max_length", low=1)
    layers = OmegaConf.select(cfg, "llm.layers")
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        p.append(f"config key 'llm.layers' must be a non-empty list of layer indices (-1: the last), got {_show(layers)}")
    c.choice("llm.layer_mix", LAYER_MIXES)
    c.choice("llm.bos", LLM_BOS)
    if stage in (2, 3):  # stage 1 reads text only
        _check_resolution(cfg, p)
        _check_buckets(cfg, c, p)

    # adapter shape
    for key in ("dim", "num_queries", "heads", "ffn_dim", "decoder_layers"):
        c.integer(f"adapter.{key}", low=1)
    c.integer("adapter.encoder_layers", low=0)
    c.integer("adapter.pooled_dim", low=1, nullable=True)
    dim, heads = cfg.adapter.dim, cfg.adapter.heads
    if _is_int(dim) and _is_int(heads) and dim >= 1 and heads >= 1 and dim % heads:
        p.append(f"config key 'adapter.heads' must divide adapter.dim={dim} (attention splits it among heads), got {heads}")
    if cfg.model.kind == "sdxl" and cfg.adapter.pooled_dim is None:
        p.append("config key 'adapter.pooled_dim' must be set for model.kind=sdxl (1280: the pooled text_embeds), got null")

    # what trains, and how fast
    trainable = OmegaConf.select(cfg, "train.trainable")
    control = OmegaConf.select(cfg, "text_encoder") == "clip"
    parts = CONTROL_PARTS if control and stage in (2, 3) else STAGE_PARTS.get(stage, ())
    if not trainable:
        p.append(f"config key 'train.trainable' must name at least one part (stage {stage}: {', '.join(parts)}), got {_show(trainable)}")
    elif control and stage in (2, 3):
        if list(trainable) != ["unet"]:
            p.append(f"config key 'train.trainable' must be [unet] with text_encoder=clip (a control run trains the "
                     f"UNet only; the base's CLIP stays frozen and there is no adapter), got {_show(trainable)}")
    else:
        c.parts("train.trainable", trainable, parts, stage)
    _check_text_encoder(cfg, c, p, stage, training)
    c.parts("speed.compile", OmegaConf.select(cfg, "speed.compile") or [], parts, stage)
    _check_lora(cfg, c, p, stage, trainable or [])
    _check_speed_levers(cfg, p, stage, control)
    c.choice("speed.compile_mode", COMPILE_MODES)

    # diffusion and EMA (stages 2-3; checked always: a typo is a typo)
    c.choice("diffusion.prediction_type", PREDICTION_TYPES)
    c.number("diffusion.min_snr_gamma", low=0, low_open=True, nullable=True)
    c.number("diffusion.input_perturbation", low=0)
    c.number("diffusion.noise_offset", low=0)
    c.int_list("diffusion.val_timesteps", low=0)
    c.number("ema.decay", low=0, high=1, low_open=True, high_open=True)
    c.integer("ema.update_every", low=1)

    # samples
    c.integer("samples.every_n_steps", low=0)
    c.integer("samples.num_images", low=1)
    if stage in (2, 3) and (cfg.samples.every_n_steps or 0) > 0 and not cfg.samples.prompts:
        p.append(f"config key 'samples.prompts' must hold at least one prompt when samples.every_n_steps="
                 f"{cfg.samples.every_n_steps} (or set samples.every_n_steps=0), got {_show(cfg.samples.prompts)}")

    # loss
    c.choice("loss.type", LOSS_TYPES)
    for key in ("norm_weight", "pooled_weight", "empty_prompt_weight"):
        c.number(f"loss.{key}", low=0)
    weights = OmegaConf.select(cfg, "loss.encoder_weights")
    encoders = 2 if cfg.model.kind == "sdxl" else 1  # SDXL's context joins CLIP-L and OpenCLIP-bigG
    if weights is not None and (len(weights) != encoders or not all(_is_number(w) and w >= 0 for w in weights)):
        p.append(f"config key 'loss.encoder_weights' must be null or {encoders} weight(s) >= 0, one per text encoder "
                 f"of the {cfg.model.kind} base's context, got {_show(weights)}")

    # data (shard paths: the `extra` check of the data package)
    c.number("data.caption_dropout", low=0, high=1, high_open=True)
    c.integer("data.batch_size", low=1)
    c.integer("data.val_batch_size", low=1)
    c.integer("data.num_workers", low=0)
    c.integer("data.shuffle_buffer", low=0)
    c.integer("data.min_size", low=0)
    c.number("data.min_aesthetic", nullable=True)
    for code in OmegaConf.select(cfg, "data.languages") or {}:
        c.number(f"data.languages.{code}", low=0)

    # optimizer
    c.number("optim.lr", low=0, low_open=True)
    c.number("optim.adapter_lr", low=0, low_open=True, nullable=True)
    c.number("optim.weight_decay", low=0)
    betas = OmegaConf.select(cfg, "optim.betas")
    if (betas is None or len(betas) != 2
            or not all(_is_number(b) and math.isfinite(b) and 0 <= b < 1 for b in betas)):
        p.append(f"config key 'optim.betas' must be two numbers in [0, 1), got {_show(betas)}")
    c.integer("optim.warmup_steps", low=0)
    c.choice("optim.schedule", SCHEDULES)
    c.number("optim.min_lr_ratio", low=0, high=1)

    # trainer and strategy
    c.integer("trainer.devices", low=1)
    c.integer("trainer.num_nodes", low=1)
    c.choice("trainer.strategy", STRATEGIES)
    c.integer("trainer.max_steps", low=1)
    c.integer("trainer.log_every_n_steps", low=1)
    c.integer("trainer.val_check_interval", low=1)
    c.integer("trainer.accumulate_grad_batches", low=1)
    c.number("trainer.gradient_clip_val", low=0, nullable=True)
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches")
    if not ((_is_int(limit) and limit >= 0) or (_is_number(limit) and 0 <= limit <= 1)):
        p.append(f"config key 'trainer.limit_val_batches' must be a fraction in [0, 1] or a whole number of batches >= 0, got {_show(limit)}")
    c.choice("fsdp.sharding", FSDP_SHARDING)
    c.choice("fsdp.version", FSDP_VERSIONS)
    c.choice("fsdp.frozen", FSDP_FROZEN)
    if OmegaConf.select(cfg, "trainer.strategy") == "fsdp" and OmegaConf.select(cfg, "fsdp.version") == 1:
        if OmegaConf.select(cfg, "speed.compile"):
            p.append("config key 'speed.compile' does not combine with fsdp.version=1 (FSDP1 breaks the graph at every "
                     "unit): use fsdp.version=2, or speed.compile=[]")
        if OmegaConf.select(cfg, "fsdp.frozen") == "replicate":
            p.append("config key 'fsdp.frozen' is replicate, which needs fsdp.version=2 (FSDP1 shards every unit)")
        if OmegaConf.select(cfg, "fsdp.sharding") == "HYBRID_SHARD":
            p.append(FSDP1_HYBRID)

    # checkpoints, evaluation, generation, caching
    c.integer("checkpoint.every_n_steps", low=1)
    c.integer("checkpoint.keep_last", low=-1, note=" (-1: keep all)")
    c.integer("eval.retrieval_pool", low=1)
    c.choice("generate.scheduler", SAMPLERS)
    c.integer("generate.steps", low=1)
    c.number("generate.guidance", low=0)
    splits = OmegaConf.select(cfg, "cache.splits") or []
    if any(s not in ("train", "val") for s in splits):
        p.append(f"config key 'cache.splits' may hold train and val, got {_show(splits)}")

    # where a stage starts from (a stage-2 control starts from the base itself)
    if training and stage in (2, 3) and not (control and stage == 2):  # the export's header only, no weights
        from linguadiff.export import init_export

        try:
            init_export(cfg, stage - 1)
        except ConfigError as err:
            p.append(str(err))
    return p


# ---------------------------------------------------------------------- text encoder


def _check_text_encoder(cfg: DictConfig, c: "_Checker", p: Problems, stage, training: bool) -> None:
    """text_encoder=clip, the control run: stages 2-3 only, from the base (stage 2), and not
    with what only the LLM has (cached LLM states to make, FSDP units for it)."""
    c.choice("text_encoder", TEXT_ENCODERS)
    if OmegaConf.select(cfg, "text_encoder") != "clip":
        return
    if stage == 1:
        p.append("config key 'text_encoder' is clip, which only stages 2 and 3 take (stage 1 trains the adapter "
                 "that replaces CLIP): drop text_encoder=clip, or run stage=2 text_encoder=clip for a control run")
    if training and stage == 2 and OmegaConf.select(cfg, "init_from"):
        p.append(f"config key 'init_from' is {_show(cfg.init_from)}, but a stage-2 control run (text_encoder=clip) "
                 "starts from the base model itself: drop init_from")
    if not training and OmegaConf.select(cfg, "cache.llm_states"):
        p.append("config key 'cache.llm_states' is true, but a text_encoder=clip run reads no LLM states (the base's "
                 "CLIP encodes each caption): set cache.llm_states=false, or cache with the LLM run's settings "
                 "(a control run reads those shards' latents and ignores their LLM states)")
    if OmegaConf.select(cfg, "trainer.strategy") == "fsdp":
        p.append("config key 'text_encoder' is clip, which does not run under strategy=fsdp (trainer.strategy=fsdp; "
                 "FSDP's units are made for the LLM and adapter): use strategy=ddp")


# ---------------------------------------------------------------------- speed levers


def _check_speed_levers(cfg: DictConfig, p: Problems, stage, control: bool) -> None:
    """speed.float8 (linguadiff/models/float8.py) and speed.encode_ahead (linguadiff/models/encode_ahead.py)."""
    from linguadiff.models.float8 import FLOAT8_PARTS, TORCHAO_REQUIREMENT, torchao_missing

    float8 = OmegaConf.select(cfg, "speed.float8")
    if float8 is None or not all(isinstance(n, str) for n in float8) or (float8 and isinstance(float8, str)):
        p.append(f"config key 'speed.float8' must be a list of parts ([] or some of {', '.join(FLOAT8_PARTS)}), "
                 f"got {_show(float8)}")
    elif float8:
        allowed = ("unet",) if control else FLOAT8_PARTS
        unknown = [n for n in float8 if n not in allowed]
        if stage not in (2, 3):
            p.append(f"config key 'speed.float8' is {_show(list(float8))}, which only stages 2 and 3 take (stage "
                     f"{stage} trains the adapter alone, at a small size): set speed.float8=[]")
        elif unknown:
            p.append(f"config key 'speed.float8' names {unknown}: it takes {', '.join(allowed)}"
                     + (" (a text_encoder=clip run has no adapter)" if control else ""))
        if OmegaConf.select(cfg, "trainer.strategy") == "fsdp":
            p.append("config key 'speed.float8' is set, which is not verified under strategy=fsdp "
                     "(trainer.strategy=fsdp): set speed.float8=[], or use strategy=ddp")
        if OmegaConf.select(cfg, "train.unet") == "lora" and "unet" in float8:
            p.append("config key 'speed.float8' names unet, which is not verified with train.unet=lora (a LoRA's "
                     "layers are small and its base frozen): drop unet from speed.float8")
        problem = torchao_missing()
        if problem is not None:
            p.append(f"config key 'speed.float8' needs torchao's float8 training, which does not import ({problem}): "
                     f"pip install -e '.[float8]' ({TORCHAO_REQUIREMENT}), or set speed.float8=[]")
    ahead = OmegaConf.select(cfg, "speed.encode_ahead")
    if not isinstance(ahead, bool):
        p.append(f"config key 'speed.encode_ahead' must be true or false, got {_show(ahead)}")
    elif ahead:
        if stage not in (2, 3):
            p.append(f"config key 'speed.encode_ahead' is true, which only stages 2 and 3 have (stage {stage} "
                     "encodes its own batch's text): set speed.encode_ahead=false")
        if control:
            p.append("config key 'speed.encode_ahead' is true, but a text_encoder=clip run has no LLM to run ahead: "
                     "set speed.encode_ahead=false")
        if OmegaConf.select(cfg, "trainer.strategy") == "fsdp":
            # Under FSDP the LLM's forward gathers its shards: collectives on a second stream,
            # interleaved differently on each rank, is not something verified here.
            p.append("config key 'speed.encode_ahead' is true, which is not verified under strategy=fsdp "
                     "(trainer.strategy=fsdp): set speed.encode_ahead=false, or use strategy=ddp")


# ---------------------------------------------------------------------- LoRA


def _check_lora(cfg: DictConfig, c: "_Checker", p: Problems, stage, trainable) -> None:
    """train.unet=lora: the LoRA's shape, and where it can run (models/lora.py)."""
    c.choice("train.unet", UNET_TRAINING)
    c.integer("lora.rank", low=1)
    c.number("lora.alpha", low=0, low_open=True)
    c.number("lora.dropout", low=0, high=1, high_open=True)
    c.number("lora.lr", low=0, low_open=True, nullable=True)
    targets = OmegaConf.select(cfg, "lora.target_modules")
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        p.append(f"config key 'lora.target_modules' must be a non-empty list of UNet layer names "
                 f"(e.g. [to_q, to_k, to_v, to_out.0]), got {_show(targets)}")
    merge = OmegaConf.select(cfg, "export.merge_lora")
    if not isinstance(merge, bool):
        p.append(f"config key 'export.merge_lora' must be true or false, got {_show(merge)}")
    if OmegaConf.select(cfg, "train.unet") != "lora":
        return
    if stage not in (2, 3):
        p.append(f"config key 'train.unet' is lora, which only stages 2 and 3 have (stage {stage} trains no UNet): "
                 f"drop train.unet=lora")
    elif "unet" not in trainable:
        p.append(f"config key 'train.unet' is lora but train.trainable={_show(trainable)} does not name unet: "
                 f"add unet to train.trainable, or drop train.unet=lora")
    if OmegaConf.select(cfg, "trainer.strategy") == "fsdp":
        # FSDP shards whole units whose parameters must all train or all be frozen (DESIGN.md):
        # a LoRA puts trained and frozen weights in every attention layer. LoRA's point is a
        # UNet that fits one GPU, where DDP (or one process) is the strategy.
        p.append("config key 'train.unet' is lora, which does not run under strategy=fsdp (trainer.strategy=fsdp): "
                 "use strategy=ddp, or train.unet=full with FSDP")


# ---------------------------------------------------------------------- resolution


def resolution_multiple(model: DictConfig) -> tuple[int, str]:
    """What model.resolution must be a multiple of, and why.

    Latent bases (sd15, sdxl): the VAE's factor (8) x 2 per UNet downsampling (3 for the
    Stable Diffusion UNets: 64). The pixel-space demo base: 2 per downsampling (its committed
    UNet has 1: 2). When the base is a local folder its own unet/ and vae/ config.json give
    the numbers; a Hugging Face name gets the Stable Diffusion ones.
    """
    root = Path(str(model.path)).expanduser()
    unet = _read_json(root / "unet" / "config.json")
    if model.kind == "demo":
        vae_factor = 1
    else:
        vae = _read_json(root / "vae" / "config.json")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and vae.get("block_out_channels") else SD_VAE_FACTOR
    levels = len(unet["down_block_types"]) if unet and unet.get("down_block_types") else SD_UNET_LEVELS
    multiple = vae_factor * 2 ** (levels - 1)
    space = "pixel space" if vae_factor == 1 else f"a VAE of {vae_factor}x"
    return multiple, f"{space}, {levels - 1} UNet downsampling(s)"


def _check_resolution(cfg: DictConfig, p: Problems) -> None:
    res = OmegaConf.select(cfg, "model.resolution")
    if cfg.model.kind not in MODEL_KINDS:
        return  # reported as a choice
    multiple, why = resolution_multiple(cfg.model)
    if not (_is_int(res) and res >= multiple and res % multiple == 0):
        p.append(f"config key 'model.resolution' must be a positive multiple of {multiple} for this "
                 f"{cfg.model.kind} base ({why}), got {_show(res)}")


def _check_buckets(cfg: DictConfig, c: _Checker, p: Problems) -> None:
    """data.crop and the bucket set: every size a multiple of the base's step (the VAE factor
    x 2 per UNet downsampling), as model.resolution must be."""
    c.choice("data.crop", CROPS)
    if cfg.model.kind not in MODEL_KINDS:
        return
    multiple, why = resolution_multiple(cfg.model)
    sizes = OmegaConf.select(cfg, "samples.sizes")
    if sizes:
        sizes = OmegaConf.to_container(sizes) if OmegaConf.is_config(sizes) else sizes
        for problem in bucket_problems(sizes, multiple):
            p.append(f"config key 'samples.sizes' {problem} ({cfg.model.kind} base: {why})")
    if OmegaConf.select(cfg, "data.crop") != "buckets":
        return
    listed = OmegaConf.select(cfg, "data.buckets")
    if listed is not None:
        listed = OmegaConf.to_container(listed) if OmegaConf.is_config(listed) else listed
        for problem in bucket_problems(listed, multiple):
            p.append(f"config key 'data.buckets' {problem} ({cfg.model.kind} base: {why})")
        return
    c.number("data.bucket_max_ratio", low=1.0)
    step = OmegaConf.select(cfg, "data.bucket_step")
    if step is not None and not (_is_int(step) and step >= multiple and step % multiple == 0):
        p.append(f"config key 'data.bucket_step' must be null or a positive multiple of {multiple} for this "
                 f"{cfg.model.kind} base ({why}), got {_show(step)}")
        return
    res = OmegaConf.select(cfg, "model.resolution")
    if _is_int(res) and _is_int(step or multiple) and res * res < (step or multiple) ** 2:
        p.append(f"config key 'data.bucket_step' ({step or multiple}) is larger than model.resolution={res}: "
                 "no bucket fits")


def _read_json(path: Path) -> dict | None:
    try:
        if path.is_file() and path.stat().st_size < 1_000_000:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return "null" if value is None else repr(value)


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


class _Checker:
    def __init__(self, cfg: DictConfig, problems: Problems) -> None:
        self.cfg, self.problems = cfg, problems

    def _get(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, key)

    def choice(self, key: str, choices: tuple) -> None:
        value = self._get(key)
        if value not in choices:
            allowed = " | ".join("null" if c is None else str(c) for c in choices)
            self.problems.append(f"config key '{key}' must be one of {allowed}, got {_show(value)}")

    def number(self, key: str, low=None, high=None, low_open=False, high_open=False, nullable=False, note="") -> None:
        value = self._get(key)
        if value is None and nullable:
            return
        ok = _is_number(value) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            what = "a finite number" if low is None else f"a number {_interval(low, high, low_open, high_open)}"
            self.problems.append(f"config key '{key}' must be {what}{' or null' if nullable else ''}{note}, got {_show(value)}")

    def integer(self, key: str, low: int, nullable: bool = False, note: str = "") -> None:
        value = self._get(key)
        if value is None and nullable:
            return
        if not (_is_int(value) and value >= low):
            self.problems.append(f"config key '{key}' must be an integer >= {low}{' or null' if nullable else ''}{note}, got {_show(value)}")

    def int_list(self, key: str, low: int) -> None:
        values = self._get(key)
        if values is None or not all(_is_int(v) and v >= low for v in values):
            self.problems.append(f"config key '{key}' must be a list of integers >= {low}, got {_show(values)}")

    def parts(self, key: str, names, parts: tuple, stage) -> None:
        unknown = [n for n in names if n not in parts]
        if parts and unknown:
            self.problems.append(f"config key '{key}' names {unknown}, which stage {stage} does not have "
                                 f"(its parts: {', '.join(parts)})")
