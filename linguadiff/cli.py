"""``key=value`` command lines for the tools beside train.py (generate.py, evaluation scripts)."""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from linguadiff.config import ConfigError


def parse_args(argv: Sequence[str], options: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    """Parse ``key=value`` items against `options` (name -> default); values are YAML-typed.

    An unknown key names the closest known one; a value of the wrong type names its key.
    """
    values = dict(options)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got '{arg}'")
        key, raw = arg.split("=", 1)
        if key not in options:
            hint = difflib.get_close_matches(key, list(options), n=1)
            raise ConfigError(f"unknown option '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                              + f"; options: {', '.join(sorted(options))}")
        value = OmegaConf.from_dotlist([f"v={raw}"]).v if raw != "" else ""
        default = options[key]
        if default is not None and not isinstance(default, str) and value is not None:
            if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (type(default), int) if isinstance(default, float) else type(default)):
                raise ConfigError(f"option '{key}' must be {type(default).__name__}, got {raw!r}")
        values[key] = str(value) if isinstance(default, str) and value is not None else value
    missing = [k for k in required if values.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"option '{missing[0]}' is required ({missing[0]}=...)")
    return values
