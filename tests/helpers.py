"""Helpers shared by tests."""
from text23d.config import compose as compose_cfg  # noqa: F401  the config the CLI would build
