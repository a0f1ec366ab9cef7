"""What `pleura config` shows: every setting's value in effect and where it came from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config.secrets import mask_values
from config.settings import CONFIG_FILE_ENV, ENV_PREFIX, Settings, toml_keys


def _registry_shown(settings: Settings, value: Path | None) -> str | None:
    """A model location as `pleura config` shows it: unset while no other names one, the registry
    in the storage directory."""
    if value is not None:
        return str(value)
    others = (settings.model_registry_dir, settings.model_bundle_dir, settings.model_dir)
    return str(settings.storage_dir / "models") if all(other is None for other in others) else None


DERIVED = {
    "storage_dir": lambda s: str(s.storage_dir),
    "database_url": lambda s: s.ledger_url,
    "broker_url": lambda s: s.celery_broker_url,
    "model_registry_dir": lambda s: _registry_shown(s, s.model_registry_dir),
    "model_dir": lambda s: _registry_shown(s, s.model_dir),
    "onnx_cache_dir": lambda s: str(s.onnx_cache),
}
"""Settings whose unset value means something derived: what is shown is what is in effect."""


def describe_settings(settings: Settings, config_file: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """Every setting's value in effect (derived locations resolved, secrets masked) and where it came
    from: ``default``, ``environment (PLEURA_X)`` or ``TOML file F, key k``; for `pleura config`."""
    config_file = config_file or os.environ.get(CONFIG_FILE_ENV)
    in_file = toml_keys(config_file)
    values = settings.model_dump(mode="json")
    report: dict[str, dict[str, Any]] = {}
    for name in Settings.model_fields:
        env = ENV_PREFIX + name.upper()
        if env in os.environ:
            source = f"environment ({env})"
        elif name in in_file:
            source = f"TOML file {config_file}, key {name}"
        else:
            source = "default"
        value = DERIVED[name](settings) if name in DERIVED else values[name]
        report[name] = {"value": mask_values(value), "source": source}
    return report
