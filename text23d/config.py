"""Config helpers: the prompt slug used in folder names, and checks with fix-it messages."""
from __future__ import annotations

import hashlib
import re
import unicodedata

from omegaconf import DictConfig, OmegaConf

from text23d.errors import ConfigError

SLUG_MAX = 48
SEED_MAX = 2**32 - 1
MESH_FORMATS = ("obj", "glb")  # the one list: export/mesh.py writes these


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


def escape_interpolations(text: str) -> str:
    """`text` as an OmegaConf string that resolves to exactly `text`: every `${` is escaped as
    `\\${`, and the backslashes right before it doubled (OmegaConf reads `\\\\` there as one)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def resolved_yaml(cfg: DictConfig) -> str:
    """The config with every interpolation resolved, as YAML that loads back to the same values:
    what remains of `${` after resolving is literal text (a prompt), so it is escaped again."""
    def escape(node):
        if isinstance(node, dict):
            return {k: escape(v) for k, v in node.items()}
        if isinstance(node, list):
            return [escape(v) for v in node]
        return escape_interpolations(node) if isinstance(node, str) else node

    return OmegaConf.to_yaml(OmegaConf.create(escape(OmegaConf.to_container(cfg, resolve=True))))


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
    for key in ("prompt", "negative_prompt"):
        if not isinstance(cfg.get(key), str):
            raise ConfigError(f"{key}={cfg.get(key)!r} is a {type(cfg.get(key)).__name__}, not text. Fix: quote "
                              f'it in YAML ({key}: "..."); on the command line every {key}= is text')
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed!r}: must be an integer in [0, {SEED_MAX}] (numpy's and torch's "
                          "common range). Fix: e.g. seed=0")
    if not isinstance(cfg.get("deterministic"), bool):
        raise ConfigError(f"deterministic={cfg.get('deterministic')!r}: must be true or false")
    if cfg.trainer.max_steps is not None:  # null: the sum of the stages' own steps
        _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    _positive_int(cfg.checkpoint.every_n_train_steps, "checkpoint.every_n_train_steps", 0)
    _positive_int(cfg.validation.every_n_steps, "validation.every_n_steps", 0)
    _positive_int(cfg.system.batch_size, "system.batch_size")
    for key in ("width", "height"):
        _positive_int(cfg.system[key], f"system.{key}", 4)
    bad = [f for f in export_formats(cfg) if f not in MESH_FORMATS]
    if bad:
        raise ConfigError(f"export.format={bad}: allowed are {list(MESH_FORMATS)}, "
                          "e.g. export.format=glb or export.format=[obj,glb]")
    if not isinstance(cfg.export.get("texture", False), bool):
        raise ConfigError(f"export.texture={cfg.export.texture!r}: must be true (UV atlas + baked PNG) or false "
                          "(vertex colours)")
    size = cfg.export.get("texture_size", 1024)
    _positive_int(size, "export.texture_size", 16)
    if size > 8192:
        raise ConfigError(f"export.texture_size={size}: at most 8192 texels a side (a {size}² float image "
                          f"needs {size * size * 12 / 2**30:.1f} GiB to bake). Fix: e.g. export.texture_size=1024")
    if cfg.export.get("target_faces") is not None:
        _positive_int(cfg.export.target_faces, "export.target_faces", 100)
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
