"""The schema (text23d/schema/): one dataclass per part is where an option lives.

- each part's constructor takes exactly its schema's fields, so an option cannot be added in one
  place only;
- a value of the wrong type is refused as Hydra composes, in one line worded from the field;
- the config reference (docs/config.md) is generated from the schema and current;
- a new part (here a toy geometry) is added the way the README says: a class, a dataclass
  registered for its group, a YAML that extends it; it is then checked, built, trained and exported.
"""
import inspect
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from hydra.utils import instantiate

from helpers import compose_cfg
from text23d.checkpoint import load_checkpoint_file
from text23d.config import validate
from text23d.errors import ConfigError
from text23d.geometry.grid import DenseGrid
from text23d.schema import add_kind, by_target, reference
from text23d.schema.core import option
from text23d.schema.parts import GridConfig
from text23d.schema.run import CheckpointConfig, ExportConfig, GuardConfig, TrainerConfig, ValidationConfig

GIVEN_BY_THE_SYSTEM = {"PromptProcessor": {"prompt", "negative_prompt"}}  # not settings: the run's own text


def constructor_params(cls) -> set[str]:
    """The keyword arguments `cls(...)` takes, following **kwargs up to the base class that takes them."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return names


def test_every_part_takes_exactly_its_schemas_fields():
    from hydra.utils import get_class

    assert len(by_target()) >= 11  # 4 geometries, 2 renderers, 2 guidances, camera, prompts, background
    for target, schema in by_target().items():
        cls = get_class(target)
        settings = {f.name for f in fields(schema)} - {"_target_"}
        assert constructor_params(cls) - GIVEN_BY_THE_SYSTEM.get(cls.__name__, set()) == settings, target


@pytest.mark.parametrize("schema,prefix", [(TrainerConfig, "trainer"), (ExportConfig, "export"),
                                           (CheckpointConfig, "checkpoint"), (GuardConfig, "guard"),
                                           (ValidationConfig, "validation"), (GridConfig, "geometry")])
def test_a_value_of_the_wrong_type_is_refused_in_one_line_worded_from_its_field(schema, prefix):
    """Every int and bool field of these blocks, given text: refused as Hydra composes (OmegaConf's
    ValidationError), said as the field's rule with the key, the value and a fix."""
    typed = [f for f in fields(schema) if f.type in (int, bool)]
    assert typed
    for f in typed:
        with pytest.raises(ConfigError) as err:
            compose_cfg(["prompt=x", "geometry=grid", f"{prefix}.{f.name}=maybe"])
        said = str(err.value)
        assert said.startswith(f"{prefix}.{f.name}='maybe': must be ") and "Fix: e.g." in said and "\n" not in said
        assert ("true or false" if f.type is bool else "an integer") in said


def test_the_config_reference_is_generated_from_the_schema_and_current():
    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == reference() + "\n", "stale: run python scripts/config_reference.py"
    for key in ("`seed`", "`trainer.max_steps`", "`system.stage.<name>.init`", "`guidance.lora_rank`",
                "`geometry.log2_table`", "`renderer.occupancy.decay`", "`export.texture_size`"):
        assert key in doc.read_text(encoding="utf-8"), key


# --- a toy part, added the way the README's walkthrough says ------------------------------------------


class ScaledGrid(DenseGrid):
    """A dense grid whose density is multiplied by `scale` (the toy's one new option)."""

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def raw(self, x):
        sigma, albedo = super().raw(x)
        return sigma * self.scale, albedo


@dataclass
class ScaledGridConfig(GridConfig):
    """A dense grid with its density scaled (tests/test_schema.py)."""

    _target_: str = option(f"{__name__}.ScaledGrid", "the geometry's class")
    scale: float = option(1.0, "density multiplier", gt=0)


@pytest.fixture
def toy_conf(tmp_path):
    add_kind("geometry", "scaled", ScaledGridConfig)
    (tmp_path / "geometry").mkdir()
    (tmp_path / "geometry" / "scaled.yaml").write_text(
        "defaults:\n  - /schema/geometry/scaled@_here_\n  - _self_\n"
        f"_target_: {__name__}.ScaledGrid\nresolution: 16\nscale: 2.0\n")
    return f"hydra.searchpath=[file://{tmp_path}]"


def test_a_toy_part_added_as_the_readme_says_is_checked_built_trained_and_exported(toy_conf, tmp_path):
    from text23d.run import run

    base = ["prompt=a red cube", "prior=builtin", "debug=smoke", "geometry=scaled", toy_conf,
            "trainer.enable_progress_bar=false", "export.video=false", "export.texture=false"]
    with pytest.raises(ConfigError, match=r"^geometry.scale='big': must be a finite number > 0"):
        compose_cfg([*base, "geometry.scale=big"])  # its type, at composition
    with pytest.raises(ConfigError, match=r"^geometry.scale=-1.0: must be a finite number > 0. Fix: e.g. geometry.scale=1.0"):
        validate(compose_cfg([*base, "geometry.scale=-1"]))  # its rule, before anything loads
    with pytest.raises(ConfigError, match=r"^geometry.scael: no such setting .*did you mean geometry.scale\?"):
        validate(compose_cfg([*base, "+geometry.scael=3"]))
    cfg = compose_cfg([*base, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    assert summary["steps"] == 2 and Path(summary["artifacts"]["mesh_glb"]).is_file()
    state = load_checkpoint_file(tmp_path / "run" / "ckpts" / "last.ckpt")["state_dict"]  # weights_only=True
    grids = [k for k in state if k.endswith("density_grid")]
    assert grids and state[grids[0]].numel() == 16**3  # the toy's YAML default reached the part
    assert instantiate(cfg.geometry).scale == 2.0
