"""The one function that reads Flower's run config, and the one that writes it.

The resolved :class:`~fedft.config.RunConfig` travels as canonical JSON under a single key,
``"fedft-config"``, so the ServerApp and every ClientApp validate the very same
configuration with the same code (:func:`fedft.config.config_from_json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedft.config import ConfigError, RunConfig, config_from_json

#: the run-config key that holds the resolved RunConfig as JSON.
RUN_CONFIG_KEY = "fedft-config"


def to_run_config(cfg: RunConfig) -> dict[str, str]:
    """Flower run config carrying ``cfg``: ``{"fedft-config": cfg.to_json()}``."""
    return {RUN_CONFIG_KEY: cfg.to_json()}


def read_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Rebuild and validate the RunConfig from Flower's run config (``context.run_config``).

    Args:
        run_config: Flower's run config mapping; must hold ``"fedft-config"`` (a JSON
            string written by :func:`to_run_config`).

    Returns:
        The validated RunConfig.

    Raises:
        ConfigError: the key is missing, is not a string, is not JSON, or holds a config
            that does not validate (the message names the bad key and value).
    """
    if RUN_CONFIG_KEY not in run_config:
        raise ConfigError(
            f"Flower's run config has no {RUN_CONFIG_KEY!r} key (found: "
            f"{sorted(run_config) or 'nothing'}); start the run with `fedft simulate`, "
            f"`fedft server` or `fedft client`, which set it from the TOML file"
        )
    text = run_config[RUN_CONFIG_KEY]
    if not isinstance(text, str):
        raise ConfigError(
            f"{RUN_CONFIG_KEY} = {text!r} is not allowed: a JSON string written by "
            "fedft.transport.flower_config.to_run_config"
        )
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{RUN_CONFIG_KEY} is not valid JSON ({exc.msg} at character {exc.pos}); it must "
            "be written by fedft.transport.flower_config.to_run_config"
        ) from exc
    return config_from_json(text)
