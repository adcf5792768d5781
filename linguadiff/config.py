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
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
PRESET_GROUPS = ("model", "llm", "data", "strategy")
STAGES = (1, 2, 3)


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who typed it."""


def register_resolver(name: str, fn: Callable[..., Any]) -> None:
    """Makes `${name:...}` call `fn` in configs; registering the same name again does nothing."""
    # omegaconf 2.4 renamed register_new_resolver; keep 2.3 working too.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    if not OmegaConf.has_resolver(name):
        register(name, fn)


def _project_root() -> str:
    return str(PROJECT_ROOT)


# ${project_root:} -> where configs/ and assets/ live, so presets work from any cwd.
register_resolver("project_root", _project_root)

# Resolvers that a package above this one registers when imported (config must not import
# data code): `resolve` names the package to import when a config uses one unregistered.
_RESOLVER_OWNERS = {"demo_shards": "datamodules"}
_RESOLVER_CALL = re.compile(r"\$\{\s*([\w.]+)\s*:")


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _closest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not match:  # a wrong leaf under a right parent: suggest a sibling
        parent = key.rsplit(".", 1)[0]
        match = difflib.get_close_matches(key, [k for k in known if k.startswith(parent + ".")], n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _tree(cfg: DictConfig) -> dict:
    """The config as plain dicts and lists, interpolations unresolved: `${...}` strings stay,
    a required value stays MISSING ("???"), null is None."""
    return OmegaConf.to_container(cfg, resolve=False)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value  # OmegaConf's own test, escaped ones too


def _key_paths(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every key, interior nodes and leaves alike."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys.extend(_key_paths(value, path + "."))
    return keys


def _open_maps(schema: dict) -> set[str]:
    """Dicts whose keys are free-form (language weights and the like): marked `{}` in base.yaml."""
    return {k for k in _key_paths(schema) if isinstance(node := _node_at(schema, k), dict) and not node}


def _check_keys(layer: dict, schema: dict, source: str) -> None:
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


def _check_types(layer: dict, schema: dict, source: str) -> None:
    """A value must have the type of its default; null, ??? and ${...} defaults accept anything."""
    for key in _key_paths(layer):
        default, value = _node_at(schema, key), _node_at(layer, key)
        # None: null, or a key the schema lacks (free-form, or reported by _check_keys).
        if any(n is None or n == MISSING or _is_interpolation(n) for n in (default, value)):
            continue
        if isinstance(default, (dict, list)) or isinstance(value, (dict, list)):
            if type(default) is not type(value):
                want = "a mapping" if isinstance(default, dict) else "a list" if isinstance(default, list) else _TYPE_NAMES.get(type(default), "a value")
                raise ConfigError(f"config key '{key}' in {source} must be {want}, got {value!r}")
            continue
        expected, got = default, value
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


def _node_at(tree: dict, dotted: str) -> Any:
    """The value at a dotted path of a plain tree (interpolations unresolved), or None."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
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

    cfg, schema_tree = schema, _tree(schema)
    for layer, source in layers:
        layer_tree = _tree(layer)
        _check_keys(layer_tree, schema_tree, source)
        _check_types(layer_tree, schema_tree, source)
        cfg = OmegaConf.merge(cfg, layer)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    _text_encoder_defaults(cfg, override_cfg, stage)
    cfg.presets = {g: choices.get(g) for g in PRESET_GROUPS}
    return cfg


def _text_encoder_defaults(cfg: DictConfig, override_cfg: DictConfig, stage: int) -> None:
    """What `text_encoder` changes in the defaults.

    A stage 3 continues with the text encoder of the stage-2 export it starts from (a CLIP
    control stays a control) unless the command line names one. A `text_encoder=clip` run has
    no adapter: the stage file's `train.trainable` loses it (a command line's own list is
    left as given, for the settings check to judge)."""
    if stage == 3 and "text_encoder" not in override_cfg:
        from linguadiff.export import export_text_encoder  # export imports this module

        try:
            init_from = OmegaConf.select(cfg, "init_from")
        except Exception:  # noqa: BLE001 - an interpolation not resolvable yet: init_export reports it later
            init_from = None
        found = export_text_encoder(init_from) if isinstance(init_from, str) and init_from else None
        if found is not None:
            cfg.text_encoder = found
    if (stage in (2, 3) and OmegaConf.select(cfg, "text_encoder") == "clip"
            and OmegaConf.select(override_cfg, "train.trainable") is None):
        cfg.train.trainable = [part for part in cfg.train.trainable if part != "adapter"]


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check that nothing required (``???``) is left unset."""
    cfg = cfg.copy()
    _check_resolvers(cfg)
    OmegaConf.resolve(cfg)
    tree = _tree(cfg)
    missing = [k for k in _key_paths(tree) if _node_at(tree, k) == MISSING]
    if missing:
        raise ConfigError(f"config key '{missing[0]}' must be set (on the command line: {missing[0]}=...)")
    return cfg


def _check_resolvers(cfg: DictConfig) -> None:
    """Names the key and the package to import when a `${name:...}` has no resolver registered
    (OmegaConf would only say "Unsupported interpolation type")."""
    for key, text in _strings(_tree(cfg)):
        for name in _RESOLVER_CALL.findall(text):
            if not OmegaConf.has_resolver(name):
                owner = _RESOLVER_OWNERS.get(name)
                raise ConfigError(
                    f"config key '{key}' uses the resolver '{name}', which is not registered"
                    + (f": it comes with the {owner} package, so import {owner} before resolving the config"
                       if owner else "")
                )


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) of every string in a plain container, inside lists too."""
    if isinstance(value, dict):
        for child, item in value.items():
            yield from _strings(item, f"{key}.{child}" if key else str(child))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, str):
        yield key, value


def to_plain(cfg: DictConfig | ListConfig | Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
