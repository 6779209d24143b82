"""Config helpers: the prompt slug used in folder names, and checks with fix-it messages."""
from __future__ import annotations

import hashlib
import re
import unicodedata

from omegaconf import DictConfig, OmegaConf

from text23d.errors import ConfigError

SLUG_MAX = 48
EXPORT_FORMATS = ("obj", "glb")


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """A safe, short folder name for user text: ASCII letters, digits, '_' and '-' only, so no
    path separators, '..', emoji or control characters reach the file system. A hash is appended
    whenever information was lost, so different long prompts still get different folders."""
    text = str(text)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9-]+", "_", ascii_text).strip("_-")
    lossy = slug.replace("_", " ") != text.strip() or len(slug) > max_len
    slug = slug[:max_len].rstrip("_-") or "untitled"
    if lossy and text.strip():
        slug = f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return slug


def builtin_prior_path() -> str:
    """The built-in prior's folder inside the installed package (see scripts/train_prior.py)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "builtin" / "model")


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slugify)
if not OmegaConf.has_resolver("builtin_prior"):
    OmegaConf.register_new_resolver("builtin_prior", builtin_prior_path)


def _positive_int(value, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r}: must be an integer ≥ {minimum}; e.g. {name}={max(minimum, 100)}")


def validate(cfg: DictConfig) -> None:
    """Check the values every run needs, before anything expensive happens."""
    prompt = cfg.get("prompt")
    if prompt is None or not str(prompt).strip():
        raise ConfigError('prompt is empty: pass one, e.g. text23d prompt="a hamburger"')
    _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    _positive_int(cfg.checkpoint.every_n_train_steps, "checkpoint.every_n_train_steps", 0)
    _positive_int(cfg.validation.every_n_steps, "validation.every_n_steps", 0)
    _positive_int(cfg.system.batch_size, "system.batch_size")
    for key in ("width", "height"):
        _positive_int(cfg.system[key], f"system.{key}", 4)
    formats = cfg.export.format
    formats = [formats] if isinstance(formats, str) else list(formats)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad:
        raise ConfigError(f"export.format={bad}: allowed are {list(EXPORT_FORMATS)}, "
                          "e.g. export.format=glb or export.format=[obj,glb]")
    thr = cfg.export.isosurface_threshold
    if not (thr == "auto" or (isinstance(thr, (int, float)) and thr > 0)):
        raise ConfigError(f"export.isosurface_threshold={thr!r}: use 'auto' or a density > 0 (e.g. 10.0)")


def export_formats(cfg: DictConfig) -> list[str]:
    f = cfg.export.format
    return [f] if isinstance(f, str) else list(f)


def compose(overrides: list[str]) -> DictConfig:
    """The config the CLI would build for these overrides (for scripts, notebooks and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("text23d.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)
