"""The fingerprint of a run's settings, and the message that names the settings a rerun changed.

A stage records the settings that determine its output with their `config_fingerprint`; a rerun with
the same fingerprint resumes, one with another is refused with `settings_diff` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and fixed separators: equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the settings that determine the output (caller's choice).

    Values must be JSON types; note ``7`` and ``7.0`` differ, so normalise numbers first.
    """
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


def _flag(name: str, value: Any) -> str:
    shown = "(unset)" if value is None else value if isinstance(value, (str, int, float)) else json.dumps(value)
    return f"--{name.replace('_', '-')} {shown}"


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The settings that differ between `old` and `new`, as flags ("--steps 25, now --steps 30; ..."); "" if none."""
    return "; ".join(f"{_flag(k, old.get(k))}, now {_flag(k, new.get(k))}"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
