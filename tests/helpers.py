"""Helpers shared by tests: compose the real Hydra config the CLI would."""
from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import text23d.config  # noqa: F401  (registers ${slug:})


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_module("text23d.conf", version_base="1.3"):
        return compose("config", overrides=overrides)
