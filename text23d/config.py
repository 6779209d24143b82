"""Config helpers: the prompt slug used in folder names, literal prompts in YAML, composing the
config as the CLI does, and `validate`: every value checked against its schema (text23d/schema/)."""
from __future__ import annotations

import hashlib
import re
import unicodedata

from omegaconf import DictConfig, OmegaConf

from text23d.errors import ConfigError

SLUG_MAX = 48


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """A safe, short folder name for user text: ASCII letters, digits, '_' and '-' only, so no
    path separators, '..', emoji or control characters reach the file system. Other scripts are
    transliterated (anyascii: 一个菠萝 → YiGeBoLuo, 🍍 → pineapple), not dropped. A hash is
    appended whenever information was lost, so different long prompts still get different folders."""
    from anyascii import anyascii

    text = str(text)
    ascii_text = anyascii(unicodedata.normalize("NFC", text))
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


from text23d.schema import check_run, register  # noqa: E402  (after the resolvers it may use)
from text23d.schema.core import check_node  # noqa: E402
from text23d.schema.run import MESH_FORMATS, ExportConfig, check_printable  # noqa: E402,F401  (re-exported)

register()  # the schemas conf/'s YAML files extend


def validate(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Check every value a run needs against its schema (text23d/schema/), before anything
    expensive happens. `on_this_machine` False: a job a cluster launcher runs elsewhere (its GPUs
    are not this machine's)."""
    check_run(cfg, on_this_machine)


def check_export(cfg: DictConfig) -> None:
    """The export block, before training (and before an export-only run loads anything)."""
    from text23d.export.budget import check_export_memory

    check_node(cfg.export, ExportConfig, "export")
    check_export_memory(cfg.export)


def export_formats(export: DictConfig) -> list[str]:
    """The mesh formats of an export block (export.format: one or a list)."""
    f = export.format
    return [f] if isinstance(f, str) else list(f)


def compose(overrides: list[str]) -> DictConfig:
    """The config the CLI would build for these overrides (for scripts, notebooks and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from hydra.errors import ConfigCompositionException

    from text23d.schema import describe

    with initialize_config_module("text23d.conf", version_base="1.3"):
        try:
            return hydra_compose("config", overrides=overrides)
        except ConfigCompositionException as e:  # a value of the wrong type for its schema field
            said = describe(e.__cause__)
            if said is None:
                raise
            raise ConfigError(said) from None


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation of the config resolves (${oc.env:X} of an unset X does not): said in one
    line now, not as a traceback wherever the value is first read. Resolves a copy: a prompt's
    escaped `\\${` stays escaped in `cfg`."""
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, InterpolationToMissingValueError) as e:
        key = getattr(e, "full_key", None) or "?"
        typed = OmegaConf.to_container(cfg, resolve=False)
        for part in (p for p in re.split(r"[.\[\]]", key) if p):
            try:
                typed = typed[int(part) if isinstance(typed, list) else part]
            except (KeyError, IndexError, ValueError, TypeError):
                typed = "?"
                break
        raise ConfigError(f"{key}={typed}: cannot be resolved ({str(e).splitlines()[0]}). Fix: give the value "
                          f"itself, or set what it refers to") from None
