"""The schema of every setting: one dataclass per part (schema/parts.py, schema/run.py).

- Hydra composes conf/ against it: conf/config.yaml extends `schema/run` (RunConfig), each YAML of
  the geometry, renderer and guidance groups extends its own kind (`/schema/geometry/grid@_here_`),
  so a value of the wrong type is refused as the config is composed (`describe` words it).
- `check_run(cfg)` checks every value against its field's rule and each part's cross-field
  `check`, once, on the composed config, before anything heavy loads; a stage's merged settings
  are checked the same way (schema/stages.py).
- docs/config.md, the config reference, is generated from it (scripts/config_reference.py).

Adding an option: one field on the part's dataclass (type, default, help, rule) and its default in
the part's YAML. Adding a part: a dataclass here, registered in KINDS, and a YAML that extends it.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from text23d.errors import ConfigError

from text23d.schema.core import KINDS, OTHER_PARTS, base_type, by_target, check_node, check_part, refuse  # noqa: F401 (the API)
from text23d.schema.parts import GEOMETRIES, GUIDANCES, OTHERS, RENDERERS
from text23d.schema.run import RunConfig, check_machine
from text23d.schema.stages import stage_configs

KINDS.update({"geometry": GEOMETRIES, "renderer": RENDERERS, "guidance": GUIDANCES})
OTHER_PARTS[:] = OTHERS


def register() -> None:
    """Put the schemas into Hydra's ConfigStore, where conf/'s YAML files find them."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="run", node=RunConfig)
    for group, kinds in KINDS.items():
        for name, cls in kinds.items():
            store.store(group=f"schema/{group}", name=name, node=cls)


def add_kind(group: str, name: str, cls) -> None:
    """A new part of `group` (a plug-in, or a test's toy part): its schema, found by its YAML's
    `- /schema/<group>/<name>@_here_` and by its `_target_`."""
    from hydra.core.config_store import ConfigStore

    KINDS[group][name] = cls
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=cls)


def check_run(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Every value of a composed run config, before anything expensive happens. `on_this_machine`
    False: a job a cluster launcher runs elsewhere (its GPUs are not this machine's)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"Missing key {missing[0]}: every run's config has it (conf/config.yaml). Fix: compose the "
                          "config with text23d.config.compose([...]) rather than by hand")
    check_node(cfg, RunConfig, "")
    for key in ("geometry", "renderer", "guidance"):
        check_part(cfg[key], key)
    stage_configs(cfg)  # each stage's merged settings, checked as it is merged
    check_machine(cfg.trainer, on_this_machine)
    if on_this_machine:  # the export's memory, before training: it must not fail after an hour
        from text23d.export.budget import check_export_memory

        check_export_memory(cfg.export)


def missing_keys(cfg, schema=RunConfig, where: str = "") -> list[str]:
    """The keys of `schema` (and of its nested blocks) that `cfg` lacks: a config another version
    wrote, or one built by hand. A composed config has them all."""
    out = []
    for f in fields(schema):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in cfg:
            out.append(key)
        elif is_dataclass(base_type(f.type)[0]) and cfg[f.name] is not None:
            out += missing_keys(cfg[f.name], base_type(f.type)[0], key)
    return out


def describe(error) -> str | None:
    """One line for an OmegaConf ValidationError raised as Hydra composes (a value of the wrong type
    for a schema's field), worded from the field's rule; None when it is not about a schema field."""
    schema, key = getattr(error, "object_type", None), getattr(error, "key", None)
    if not (is_dataclass(schema) and key in schema.__dataclass_fields__):
        return None
    f = schema.__dataclass_fields__[key]
    if "help" not in f.metadata:
        return None
    return str(refuse(f, getattr(error, "full_key", None) or str(key), getattr(error, "value", None)))


def reference() -> str:
    """The config reference (docs/config.md) in Markdown: each schema's key, type, default, allowed
    values and help, generated from the dataclasses."""
    from text23d.schema import parts, run
    from text23d.schema.core import requirement

    out = ["# Config reference", "",
           "Generated from the dataclasses in `text23d/schema/` by `python scripts/config_reference.py`; "
           "a test fails when it is stale. Every key can be set on the command line (`key=value`).", ""]
    sections = [("Run (top level)", run.RunConfig, ""), ("trainer", run.TrainerConfig, "trainer."),
                ("checkpoint", run.CheckpointConfig, "checkpoint."), ("guard", run.GuardConfig, "guard."),
                ("faults", run.FaultsConfig, "faults."), ("validation", run.ValidationConfig, "validation."),
                ("export", run.ExportConfig, "export."), ("camera", parts.CameraConfig, "camera."),
                ("prior", parts.PriorConfig, "prior."), ("system", run.SystemConfig, "system."),
                ("system.stage.&lt;name&gt;", run.StageConfig, "system.stage.<name>."),
                ("system.prompt_processor", parts.PromptProcessorConfig, "system.prompt_processor."),
                ("system.background", parts.BackgroundConfig, "system.background."),
                ("renderer.occupancy", parts.OccupancyConfig, "renderer.occupancy.")]
    sections += [(f"{group}={name}", cls, f"{group}.") for group, kinds in KINDS.items() for name, cls in kinds.items()]
    for title, cls, prefix in sections:
        out += [f"## {title}", "", cls.__doc__.strip().replace("\n", " "), "",
                "| key | type | default | allowed | help |", "|---|---|---|---|---|"]
        for f in fields(cls):
            if "help" not in f.metadata or f.name == "_target_" or (prefix == "" and is_dataclass(_kind(f))):
                continue
            default = _default(f)
            kind = getattr(_kind(f), "__name__", str(_kind(f))).replace("typing.", "")
            out.append(f"| `{prefix}{f.name}` | {kind} | `{default}` | {requirement(f).replace('|', '/')} | "
                       f"{f.metadata['help'].replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def _kind(f):
    return base_type(f.type)[0]


def _default(f):
    from dataclasses import MISSING

    value = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else "(group)"
    if is_dataclass(value):
        return "{…}"
    text = OmegaConf.to_yaml({"v": value}).strip()[3:] if not isinstance(value, str) else value
    return "null" if value is None else text.replace("\n", " ").replace("|", "/")
