"""Run configuration: YAML presets + ``key=value`` command-line overrides, OmegaConf only.

Layers, later ones win:

1. ``configs/base.yaml``: every key a run knows, with defaults (the schema);
2. presets picked by group on the command line (``model=sdxl llm=qwen2.5-7b data=demo
   strategy=ddp``), each a file ``configs/<group>/<name>.yaml`` or a path to a YAML file;
3. ``configs/stage<N>.yaml``: what stage N changes;
4. dotted overrides (``trainer.max_steps=100``).

Presets and overrides may only set keys that base.yaml defines: a typo is an error that names
the key and the closest known one, and a value of the wrong type names the key too.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
PRESET_GROUPS = ("model", "llm", "data", "strategy")
STAGES = (1, 2, 3)


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who typed it."""


def _project_root() -> str:
    return str(PROJECT_ROOT)


def _demo_shards(stage: int, split: str) -> str:
    """Shard URLs of the demo data set for a stage: parallel text for stage 1, image-text
    shards for stages 2-3 (generated on first use)."""
    from datamodules.demo_data import demo_shard_urls

    return demo_shard_urls(int(stage), split)


def _register_resolvers() -> None:
    # omegaconf 2.4 renamed register_new_resolver; keep 2.3 working too.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in (("project_root", _project_root), ("demo_shards", _demo_shards)):
        # ${project_root:} -> where configs/ and assets/ live, so presets work from any cwd;
        # ${demo_shards:${stage},train} -> the demo's shards for that stage, made on first use.
        if not OmegaConf.has_resolver(name):
            register(name, fn)


_register_resolvers()


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _closest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not match:  # a wrong leaf under a right parent: suggest a sibling
        parent = key.rsplit(".", 1)[0]
        match = difflib.get_close_matches(key, [k for k in known if k.startswith(parent + ".")], n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _key_paths(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every key, interior nodes and leaves alike."""
    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            keys.extend(_key_paths(node, path + "."))
    return keys


def _open_maps(schema: DictConfig) -> set[str]:
    """Dicts whose keys are free-form (language weights and the like): marked `{}` in base.yaml."""
    return {k for k in _key_paths(schema) if isinstance(node := _node_at(schema, k), DictConfig) and len(node) == 0}


def _check_keys(layer: DictConfig, schema: DictConfig, source: str) -> None:
    known = _key_paths(schema)
    known_set, open_maps = set(known), _open_maps(schema)
    for key in _key_paths(layer):
        if key in known_set or any(key.startswith(m + ".") for m in open_maps):
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent and parent not in known_set:
            continue  # reported once, at the parent
        raise ConfigError(f"unknown config key '{key}' in {source}{_closest(key, known)}")


# Keys whose value is one of a few words (checked once all layers are merged).
CHOICES = {"llm.bos": ("auto", "none")}

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _check_types(layer: DictConfig, schema: DictConfig, source: str) -> None:
    """A value must have the type of its default; null, ??? and ${...} defaults accept anything."""
    for key in _key_paths(layer):
        default, value = _node_at(schema, key), _node_at(layer, key)
        if default is None or value is None:
            continue
        if any(n._is_none() or n._is_missing() or n._is_interpolation() for n in (default, value)):
            continue
        if isinstance(default, (DictConfig, ListConfig)) or isinstance(value, (DictConfig, ListConfig)):
            if type(default) is not type(value):
                want = "a mapping" if isinstance(default, DictConfig) else "a list" if isinstance(default, ListConfig) else _TYPE_NAMES.get(type(default._value()), "a value")
                raise ConfigError(f"config key '{key}' in {source} must be {want}, got {OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value._value()!r}")
            continue
        expected, got = default._value(), value._value()
        if isinstance(expected, bool):
            ok = isinstance(got, bool)
        elif isinstance(expected, int):
            ok = isinstance(got, int) and not isinstance(got, bool)
        elif isinstance(expected, float):
            ok = isinstance(got, (int, float)) and not isinstance(got, bool)
        elif isinstance(expected, str):
            ok = not isinstance(got, bool)  # "1e-4"-like strings and numbers both read fine as text
        else:
            ok = True
        if not ok:
            raise ConfigError(
                f"config key '{key}' in {source} must be {_TYPE_NAMES.get(type(expected), type(expected).__name__)} "
                f"(default {expected!r}), got {got!r}"
            )


def _node_at(cfg: DictConfig, dotted: str):
    """The raw node at a dotted path (interpolations unresolved), or None."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or part not in node.keys():
            return None
        node = node._get_node(part)
    return node


def _load_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {path}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what}: {path} must hold a mapping")
    return cfg if cfg is not None else OmegaConf.create()


def _preset_path(group: str, name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name).expanduser()
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        names = available_presets(group)
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"unknown {group} preset '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; available: {', '.join(names)} (or a path to a .yaml file)"
        )
    return path


def parse_overrides(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into preset choices and dotted overrides."""
    presets: dict[str, str] = {}
    dotted: list[str] = []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"expected key=value, got '{arg}' (for example trainer.max_steps=100)")
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key in PRESET_GROUPS:
            presets[key] = value
        else:
            dotted.append(f"{key}={value}")
    return presets, dotted


def load_config(argv: Sequence[str] = (), defaults: dict[str, str] | None = None) -> DictConfig:
    """Build the run's config from the command line (``sys.argv[1:]`` style); not yet resolved."""
    presets, dotted = parse_overrides(argv)
    override_cfg = OmegaConf.from_dotlist(dotted) if dotted else OmegaConf.create()
    stage = override_cfg.get("stage", 1)
    if stage not in STAGES:
        raise ConfigError(f"config key 'stage' must be one of {STAGES}, got {stage!r}")

    schema = _load_yaml(CONFIG_DIR / "base.yaml", "base config")
    choices = dict(schema.get("presets", {}))
    choices.update(defaults or {})
    stage_cfg = _load_yaml(CONFIG_DIR / f"stage{stage}.yaml", f"stage {stage}")
    choices.update(stage_cfg.pop("presets", {}) or {})
    choices.update(presets)

    layers: list[tuple[DictConfig, str]] = []
    per_stage: list[tuple[DictConfig, str]] = []
    for group in PRESET_GROUPS:
        if choices.get(group):
            path = _preset_path(group, choices[group])
            preset = _load_yaml(path, f"{group} preset")
            # A preset may tune each stage (`stages: {2: {optim: {lr: ...}}}`); those settings
            # win over the stage file's generic defaults, the command line over both.
            stages = preset.pop("stages", None) or {}
            unknown = [k for k in stages if k not in STAGES]
            if unknown:
                raise ConfigError(f"{group} preset {path.name}: 'stages' keys must be among {STAGES}, got {unknown}")
            layers.append((preset, f"{group} preset {path.name}"))
            if stage in stages:
                per_stage.append((stages[stage], f"{group} preset {path.name} (stages.{stage})"))
    layers.append((stage_cfg, f"configs/stage{stage}.yaml"))
    layers.extend(per_stage)
    layers.append((override_cfg, "the command line"))

    cfg = schema
    for layer, source in layers:
        _check_keys(layer, schema, source)
        _check_types(layer, schema, source)
        cfg = OmegaConf.merge(cfg, layer)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    cfg.presets = {g: choices.get(g) for g in PRESET_GROUPS}
    return cfg


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check that nothing required (``???``) is left unset."""
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    missing = [k for k in _key_paths(cfg) if _node_at(cfg, k) is not None and _node_at(cfg, k)._is_missing()]
    if missing:
        raise ConfigError(f"config key '{missing[0]}' must be set (on the command line: {missing[0]}=...)")
    return cfg


def to_plain(cfg: DictConfig | ListConfig | Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
