"""What a run leaves for the next stage and for strangers: the export's metadata, its model
card, and the checks a stage makes on the export it starts from (`init_from`).

An export is `run_dir/export/`: `adapter.safetensors` (weights + the metadata below), from
stage 2 on the UNet, and `README.md` (the model card). The UNet is `unet/` in diffusers format
(a full fine-tune), or for `train.unet=lora` the LoRA in `lora/` (diffusers' LoRA format,
applied to the base's UNet) and, with `export.merge_lora=true`, also `unet/` with the LoRA
merged in. Where both are there, `unet/` is the whole UNet and is what generation loads.

A control run (`text_encoder=clip`: the base's own frozen CLIP, only the UNet trained) has no
adapter: its metadata is `METADATA_FILE` (JSON, the same entries, `text_encoder: clip` and
`llm: null`) beside `unet/` (or `lora/`). `find_export` and `read_export_metadata` read both
forms; `find_adapter` (generation.py) is for what needs the adapter itself.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from omegaconf import DictConfig

from linguadiff.config import ConfigError
from linguadiff.models.adapter import read_adapter_metadata
from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS

ADAPTER_FILE = "adapter.safetensors"
# A control export's metadata (no adapter to carry it): JSON, read with a size bound.
METADATA_FILE = "linguadiff_export.json"
MAX_METADATA_BYTES = 1 << 20
TEXT_ENCODERS = ("llm", "clip")  # config key `text_encoder`
# Written last into an export, which is built in a temporary folder and renamed into place:
# an export without it is unfinished (a kill during the export) and is never started from.
COMPLETE_FILE = "export_complete.json"


def export_complete(directory: Path) -> bool:
    """Whether `directory` is a whole export: its completion marker, and every file it lists."""
    import json

    marker = Path(directory) / COMPLETE_FILE
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(files, list) and all((Path(directory) / str(name)).exists() for name in files)


def mark_complete(directory: Path, global_step: int) -> None:
    """Write the completion marker (last: after every file of the export is on disk)."""
    import json
    import os

    directory = Path(directory)
    files = sorted(p.name for p in directory.iterdir() if p.name != COMPLETE_FILE)
    partial = directory / f".{COMPLETE_FILE}.partial"
    partial.write_text(json.dumps({"global_step": int(global_step), "files": files}) + "\n")
    os.replace(partial, directory / COMPLETE_FILE)


def find_export(path: str | Path) -> Path:
    """The export folder `path` names: a run_dir, its export folder, or a file in it (the
    adapter or a control's metadata). FileNotFoundError says when the run has not exported."""
    path = Path(path).expanduser()
    for folder in (path.parent if path.is_file() else path, path / "export"):
        if (folder / ADAPTER_FILE).is_file() or (folder / METADATA_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"no {ADAPTER_FILE} (nor a control run's {METADATA_FILE}) at {path} (nor in {path / 'export'}): "
        "has that run finished? Export happens at the end of training."
    )


def read_export_metadata(export: str | Path) -> dict:
    """The metadata of the export folder `export` (see `find_export`): the adapter's header,
    or a control export's JSON. Always has `text_encoder` (llm for exports made before the
    key existed). ValueError names the file when it is not a LinguaDiff export's."""
    export = Path(export)
    if (export / ADAPTER_FILE).is_file():
        return {"text_encoder": "llm", **read_adapter_metadata(export / ADAPTER_FILE)}
    path = export / METADATA_FILE
    try:
        payload = path.read_bytes() if path.stat().st_size <= MAX_METADATA_BYTES else None
        meta = json.loads(payload) if payload is not None else None
    except OSError as err:
        raise ValueError(f"{path} is not readable: {err}") from err
    except (ValueError, RecursionError) as err:  # malformed, not UTF-8, nested too deep
        raise ValueError(f"{path} is not valid JSON: {type(err).__name__}") from None
    if payload is None:
        raise ValueError(f"{path} is larger than {MAX_METADATA_BYTES} bytes: not an export's metadata")
    base = meta.get("base_model") if isinstance(meta, dict) else None
    if (not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("kind", "path"))
            or meta.get("text_encoder") != "clip" or not isinstance(meta.get("stage"), int)):
        raise ValueError(f"{path} is not a LinguaDiff control export's metadata (it needs text_encoder: clip, "
                         "an integer stage and base_model.kind/path)")
    return meta


def write_export_metadata(directory: Path, metadata: dict) -> Path:
    """A control export's metadata file (written under a temporary name, then renamed)."""
    import os

    path = Path(directory) / METADATA_FILE
    partial = path.with_name(f".{METADATA_FILE}.partial")
    partial.write_text(json.dumps(metadata, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def export_text_encoder(init_from: str) -> str | None:
    """The text encoder of the export `init_from` names (llm | clip); None when there is no
    readable export there (init_export then says what is wrong)."""
    try:
        return str(read_export_metadata(find_export(init_from)).get("text_encoder", "llm"))
    except (FileNotFoundError, ValueError):
        return None


def adapter_metadata(cfg: DictConfig) -> dict:
    """Everything a stranger needs to use the adapter without the training config, and what
    its model card says of the training (`stamped` adds the step, the time and the BOS id).
    A control run (`text_encoder=clip`) records `llm: null`: it has no LLM."""
    clip = cfg.text_encoder == "clip"
    return {
        "stage": int(cfg.stage),
        "text_encoder": str(cfg.text_encoder),
        "presets": {k: v for k, v in cfg.presets.items() if v and not (clip and k == "llm")},
        "llm": None if clip else {
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
        "training": {
            "trainable": list(cfg.train.trainable),
            "unet": str(cfg.train.unet) if int(cfg.stage) >= 2 else None,
            "init_from": cfg.init_from,
            "lr": float(cfg.optim.lr),
            "weight_decay": float(cfg.optim.weight_decay),
            "batch_size": int(cfg.data.batch_size),
            "devices": cfg.trainer.devices,
            "num_nodes": int(cfg.trainer.num_nodes),
            "precision": str(cfg.trainer.precision),
            "data": str(cfg.data.train.urls or [s.urls for s in cfg.data.train.sources]),
        },
    }


def stamped(metadata: dict, global_step: int, bos_token_id: int | None = None) -> dict:
    """The metadata of an export written now, at `global_step`. `bos_token_id`: the id the run's
    tokenizer put first (None: no BOS), so a later load can tell when a tokenizer resolves it
    differently."""
    llm = None if metadata.get("llm") is None else {**metadata["llm"], "bos_token_id": bos_token_id}
    return {**metadata, "llm": llm, "global_step": int(global_step),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


STAGE_NAMES = {1: "text-only alignment to the base's CLIP features", 2: "end-to-end image-text training",
               3: "aesthetic fine-tuning"}


def write_model_card(directory: Path, metadata: dict, adapter: dict | None) -> None:
    """export/README.md: what this is, how it was trained, how to load it (from the metadata alone).
    `adapter`: the adapter's config; None for a control run (text_encoder=clip)."""
    if adapter is None:
        write_control_card(directory, metadata)
        return
    has_unet = (directory / "unet").is_dir()
    lora = metadata.get("lora")
    llm, base, train, stage = metadata["llm"], metadata["base_model"], metadata["training"], int(metadata["stage"])
    lines = [
        f"# LinguaDiff export: {base['name']} + {llm['name']} (stage {stage})",
        "",
        f"An adapter that lets the frozen LLM `{llm['path']}` replace CLIP as the text encoder of",
        f"`{base['path']}` ({base['kind']}), after OmniDiffusion (ECCV 2024).",
        f"Stage {stage}, {STAGE_NAMES[stage]}: trained {', '.join(train['trainable'])} for {metadata['global_step']} steps"
        + (f", starting from `{train['init_from']}`." if train["init_from"] else "."),
        "",
        "## Files",
        "",
        "- `adapter.safetensors`: the adapter; its metadata names the LLM, layers, base model and sizes.",
    ]
    if lora:
        on = "the base's UNet" if lora.get("on") == "base" else "the UNet of the stage-2 export it started from (init_from)"
        lines.append(f"- `{LORA_DIR}/{LORA_WEIGHTS}`: the UNet LoRA (EMA weights) in diffusers' format, on {on}: "
                     f"rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}"
                     + (f", learning rate {lora['lr']}" if lora.get("lr") is not None else "")
                     + f". `pipeline.load_lora_weights(\"path/to/this/export/{LORA_DIR}\")` puts it on a pipeline of that UNet.")
    if has_unet:
        lines.append("- `unet/`: the UNet with the LoRA merged in (EMA weights) in diffusers format." if lora else
                     "- `unet/`: the trained UNet (EMA weights) in diffusers format.")
    lines += [
        "",
        "## Training settings",
        "",
        f"- LLM layers {list(llm['layers'])} ({llm['layer_mix']}), max {llm['max_length']} tokens, dtype {llm['dtype']}, "
        f"BOS {llm['bos']}" + (f" (token id {llm['bos_token_id']})" if llm.get("bos_token_id") is not None else ""),
        f"- adapter: width {adapter['dim']}, {adapter['num_queries']} queries, "
        f"{adapter['encoder_layers']}+{adapter['decoder_layers']} layers, {adapter['heads']} heads"
        + (f", pooled {adapter['pooled_dim']}" if adapter.get("pooled_dim") else ""),
        *_training_and_use_lines(train, directory),
        "```python",
        "from linguadiff.models.prompt_encoder import PromptEncoder",
        f"encoder, meta = PromptEncoder.from_export(\"{directory / 'adapter.safetensors'}\")",
        "cond = encoder.encode([\"a red circle\"])  # {'context': [1, N, D], 'pooled': ... or None}",
        "# then pass cond['context'] as prompt_embeds to the diffusers pipeline of the base model",
        "```",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _training_and_use_lines(train: dict, directory: Path) -> list[str]:
    """The model cards' optimiser and data lines, then how to draw with the export."""
    return [
        f"- AdamW lr {train['lr']}, weight decay {train['weight_decay']}, batch {train['batch_size']} per device, "
        f"{train['devices']} device(s) x {train['num_nodes']} node(s), precision {train['precision']}",
        f"- data: `{train['data']}`",
        "",
        "## Use",
        "",
        "```bash",
        f"python generate.py run_dir={directory.parent} prompt=\"a red circle\" num_images=4 out_dir=out",
        "```",
        "",
    ]


def write_control_card(directory: Path, metadata: dict) -> None:
    """The model card of a control export: the base's UNet fine-tuned with its own frozen CLIP."""
    lora = metadata.get("lora")
    base, train, stage = metadata["base_model"], metadata["training"], int(metadata["stage"])
    lines = [
        f"# LinguaDiff control export: {base['name']} with its own CLIP (stage {stage})",
        "",
        f"A control run: the UNet of `{base['path']}` ({base['kind']}) fine-tuned with the base's own frozen CLIP",
        "text encoder(s) (text_encoder=clip), on the same data, schedule and seed as an LLM run, to tell what the",
        "LLM adds from what the data adds. There is no adapter and no LLM.",
        f"Stage {stage}, {STAGE_NAMES[stage]}: trained {', '.join(train['trainable'])} for {metadata['global_step']} steps"
        + (f", starting from `{train['init_from']}`." if train["init_from"] else ", starting from the base."),
        "",
        "## Files",
        "",
        f"- `{METADATA_FILE}`: what this is (text_encoder clip, the base, the training settings).",
    ]
    if lora:
        lines.append(f"- `{LORA_DIR}/{LORA_WEIGHTS}`: the UNet LoRA (EMA weights) in diffusers' format: rank "
                     f"{lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}.")
    if (directory / "unet").is_dir():
        lines.append("- `unet/`: the trained UNet (EMA weights) in diffusers format"
                     + (", the LoRA merged in." if lora else "."))
    lines += [
        "",
        "## Training settings",
        "",
        *_training_and_use_lines(train, directory),
    ]
    if (directory / "unet").is_dir() and base["kind"] in ("sd15", "sdxl"):
        pipeline = "StableDiffusionXLPipeline" if base["kind"] == "sdxl" else "StableDiffusionPipeline"
        lines += [
            "```python",
            f"from diffusers import {pipeline}, UNet2DConditionModel",
            f"unet = UNet2DConditionModel.from_pretrained(\"{directory / 'unet'}\")",
            f"pipeline = {pipeline}.from_pretrained(\"{base['path']}\", unet=unet)",
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
    if not (export / ADAPTER_FILE).is_file() and not (export / METADATA_FILE).is_file():
        raise ConfigError(
            f"init_from={cfg.init_from} has no export/adapter.safetensors"
            + (f" (nor a control run's export/{METADATA_FILE})" if cfg.get("text_encoder") == "clip" else "")
            + f": has its stage-{expected_stage} run finished? (export happens at the end of training)"
        )
    if not export_complete(export):
        raise ConfigError(
            f"init_from={cfg.init_from}: the export in {export} is incomplete (no {COMPLETE_FILE}, or a file it "
            f"lists is missing): relaunch its stage-{expected_stage} run to export it again"
        )
    try:
        meta = read_export_metadata(export)
    except ValueError as err:
        raise ConfigError(f"init_from={cfg.init_from}: {err}") from None
    if meta.get("stage") != expected_stage:
        raise ConfigError(f"init_from={cfg.init_from} is a stage-{meta.get('stage')} export; stage {cfg.stage} starts from stage {expected_stage}")
    if expected_stage >= 2 and not (export / "unet").is_dir() and not (export / LORA_DIR / LORA_WEIGHTS).is_file():
        raise ConfigError(f"init_from={cfg.init_from} is a stage-{expected_stage} export without its unet/ folder "
                          f"(nor a {LORA_DIR}/ one): relaunch its stage-{expected_stage} run to export it again")
    return export


def check_handoff(cfg: DictConfig, meta: dict, export: Path) -> None:
    """The previous stage must have used the same LLM (and layers) and the same base model."""
    problems = []
    found, wanted = meta.get("text_encoder", "llm"), cfg.text_encoder
    if found != wanted:
        raise ConfigError(
            f"init_from export {export} was trained with text_encoder={found}, this run has text_encoder={wanted}: "
            + ("a control run (the base's own CLIP) continues as one; drop text_encoder=llm" if found == "clip" else
               "a CLIP control starts stage 2 from the base (no init_from) and stage 3 from a control's export")
        )
    if found == "clip":  # no LLM to compare
        base = meta["base_model"]
        if base["path"] != cfg.model.path or base["kind"] != cfg.model.kind:
            raise ConfigError(f"init_from export {export} does not fit this run: it was made for base {base['path']} "
                              f"({base['kind']}), this run's is {cfg.model.path} ({cfg.model.kind})")
        return
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
