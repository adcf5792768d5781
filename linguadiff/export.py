"""What a run leaves for the next stage and for strangers: the export's metadata, its model
card, and the checks a stage makes on the export it starts from (`init_from`).

An export is `run_dir/export/`: `adapter.safetensors` (weights + the metadata below), from
stage 2 on `unet/` in diffusers format, and `README.md` (the model card).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from omegaconf import DictConfig

from linguadiff.config import ConfigError
from linguadiff.models.adapter import read_adapter_metadata

ADAPTER_FILE = "adapter.safetensors"


def adapter_metadata(cfg: DictConfig, global_step: int, prompt_tokenizer=None) -> dict:
    """Everything a stranger needs to use the adapter without the training config.

    With the run's `PromptTokenizer`, the BOS id it puts first is recorded too
    (`llm.bos_token_id`), so a later load can tell when a tokenizer resolves it differently.
    """
    meta = {
        "stage": int(cfg.stage),
        "global_step": int(global_step),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "presets": {k: v for k, v in cfg.presets.items() if v},
        "llm": {
            "name": cfg.llm.name,
            "path": cfg.llm.path,
            "revision": cfg.llm.revision,
            "dtype": cfg.llm.dtype,
            "layers": list(cfg.llm.layers),
            "layer_mix": cfg.llm.layer_mix,
            "max_length": int(cfg.llm.max_length),
            "bos": cfg.llm.bos,
            "trust_remote_code": bool(cfg.llm.trust_remote_code),
        },
        "base_model": {"name": cfg.model.name, "kind": cfg.model.kind, "path": cfg.model.path, "revision": cfg.model.revision},
        "generate": {k: cfg.generate[k] for k in cfg.generate},
    }
    if prompt_tokenizer is not None:
        meta["llm"]["bos_token_id"] = prompt_tokenizer.bos_id
    return meta


STAGE_NAMES = {1: "text-only alignment to the base's CLIP features", 2: "end-to-end image-text training",
               3: "aesthetic fine-tuning"}


def write_model_card(directory: Path, cfg: DictConfig, metadata: dict, adapter: dict) -> None:
    """export/README.md: what this is, how it was trained, how to load it."""
    has_unet = (directory / "unet").is_dir()
    trained = ", ".join(cfg.train.trainable)
    lines = [
        f"# LinguaDiff export: {cfg.model.name} + {cfg.llm.name} (stage {cfg.stage})",
        "",
        f"An adapter that lets the frozen LLM `{cfg.llm.path}` replace CLIP as the text encoder of",
        f"`{cfg.model.path}` ({cfg.model.kind}), after OmniDiffusion (ECCV 2024).",
        f"Stage {cfg.stage}, {STAGE_NAMES[int(cfg.stage)]}: trained {trained} for {metadata['global_step']} steps"
        + (f", starting from `{cfg.init_from}`." if cfg.init_from else "."),
        "",
        "## Files",
        "",
        "- `adapter.safetensors`: the adapter; its metadata names the LLM, layers, base model and sizes.",
    ]
    if has_unet:
        lines.append("- `unet/`: the trained UNet (EMA weights) in diffusers format.")
    lines += [
        "",
        "## Training settings",
        "",
        f"- LLM layers {list(cfg.llm.layers)} ({cfg.llm.layer_mix}), max {cfg.llm.max_length} tokens, dtype {cfg.llm.dtype}, "
        f"BOS {cfg.llm.bos}" + (f" (token id {metadata['llm']['bos_token_id']})" if metadata["llm"].get("bos_token_id") is not None else ""),
        f"- adapter: width {adapter['dim']}, {adapter['num_queries']} queries, "
        f"{adapter['encoder_layers']}+{adapter['decoder_layers']} layers, {adapter['heads']} heads"
        + (f", pooled {adapter['pooled_dim']}" if adapter.get("pooled_dim") else ""),
        f"- AdamW lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, batch {cfg.data.batch_size} per device, "
        f"{cfg.trainer.devices} device(s) x {cfg.trainer.num_nodes} node(s), precision {cfg.trainer.precision}",
        f"- data: `{cfg.data.train.urls or [s.urls for s in cfg.data.train.sources]}`",
        "",
        "## Use",
        "",
        "```bash",
        f"python generate.py run_dir={directory.parent} prompt=\"a red circle\" num_images=4 out_dir=out",
        "```",
        "",
        "```python",
        "from linguadiff.generation import AdapterTextEncoder",
        f"encoder, meta = AdapterTextEncoder.from_export(\"{directory / 'adapter.safetensors'}\")",
        "cond = encoder([\"a red circle\"])  # {'context': [1, N, D], 'pooled': ... or None}",
        "# then pass cond['context'] as prompt_embeds to the diffusers pipeline of the base model",
        "```",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")


def init_export(cfg: DictConfig, expected_stage: int) -> Path:
    """The export folder of the run `init_from` names, with a clear error when it is unusable."""
    if not cfg.init_from:
        raise ConfigError(
            f"stage {cfg.stage} starts from a stage-{expected_stage} run: set init_from=RUN_DIR "
            f"(e.g. python train.py stage={cfg.stage} init_from=runs/stage{expected_stage} run_dir=runs/stage{cfg.stage})"
        )
    root = Path(cfg.init_from).expanduser()
    export = root / "export" if (root / "export").is_dir() else root
    if not (export / "adapter.safetensors").is_file():
        raise ConfigError(
            f"init_from={cfg.init_from} has no export/adapter.safetensors: "
            f"has its stage-{expected_stage} run finished? (export happens at the end of training)"
        )
    meta = read_adapter_metadata(export / "adapter.safetensors")
    if meta.get("stage") != expected_stage:
        raise ConfigError(f"init_from={cfg.init_from} is a stage-{meta.get('stage')} export; stage {cfg.stage} starts from stage {expected_stage}")
    return export


def check_handoff(cfg: DictConfig, meta: dict, export: Path) -> None:
    """The previous stage must have used the same LLM (and layers) and the same base model."""
    problems = []
    llm = meta["llm"]
    if llm["path"] != cfg.llm.path:
        problems.append(f"its LLM is {llm['path']}, this run's llm.path is {cfg.llm.path}")
    if list(llm["layers"]) != list(cfg.llm.layers) or llm["layer_mix"] != cfg.llm.layer_mix:
        problems.append(f"it reads LLM layers {llm['layers']} ({llm['layer_mix']}), this run {list(cfg.llm.layers)} ({cfg.llm.layer_mix})")
    base = meta["base_model"]
    if base["path"] != cfg.model.path or base["kind"] != cfg.model.kind:
        problems.append(f"it was made for base {base['path']} ({base['kind']}), this run's is {cfg.model.path} ({cfg.model.kind})")
    if problems:
        raise ConfigError(f"init_from export {export} does not fit this run: " + "; ".join(problems))
