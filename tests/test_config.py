import re
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import compose_cfg
from text23d.config import slugify, validate
from text23d.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["system", "geometry", "guidance", "renderer", "prior", "camera",
                                   "trainer", "debug", "experiment"])
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        cfg = compose_cfg([f"{group}={option}", "prompt=a red cube"])
        OmegaConf.resolve(cfg)
        assert cfg.prompt


@pytest.mark.parametrize("group", ["geometry", "renderer", "guidance", "camera"])
def test_every_part_instantiates(group):
    for option in group_options(group):
        obj = instantiate(compose_cfg([f"{group}={option}", "prompt=x"])[group])
        assert type(obj).__module__.startswith("text23d.")


def test_sds_is_an_alias_of_dreamfusion():
    a, b = compose_cfg(["system=sds", "prompt=x"]), compose_cfg(["system=dreamfusion", "prompt=x"])
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
    assert a.system.name == "dreamfusion"


def test_command_line_values_win_over_debug_preset():
    cfg = compose_cfg(["debug=smoke", "trainer.max_steps=7", "checkpoint.every_n_train_steps=3",
                       "seed=5", "deterministic=true", "prompt=x"])
    assert (cfg.trainer.max_steps, cfg.checkpoint.every_n_train_steps, cfg.seed) == (7, 3, 5)
    assert cfg.deterministic is True
    assert compose_cfg(["debug=smoke", "prompt=x"]).trainer.max_steps == 4


def test_unknown_keys_are_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_cfg(["trainer.max_stepz=3", "prompt=x"])


@pytest.mark.parametrize("override,match", [
    ("trainer.max_steps=-5", "trainer.max_steps=-5"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("export.format=stl", "export.format"),
    ("export.isosurface_threshold=-1", "isosurface_threshold"),
    ("system.width=2", "system.width"),
])
def test_bad_values_get_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg([override, "prompt=x"]))


def test_empty_prompt_is_an_error():
    with pytest.raises(ConfigError, match='prompt="a hamburger"'):
        validate(compose_cfg(["prompt=   "]))


@pytest.mark.parametrize("text", [
    "a hamburger", "../../etc/passwd", "a/b\\c", "🍔 a burger 🍔", "x" * 2000,
    ("a very long prompt with / slashes, .. dots and émojis 🚀 " * 40)[:2000], "..", "", "con",
])
def test_slug_is_a_safe_single_path_component(text, tmp_path):
    slug = slugify(text)
    assert 1 <= len(slug) <= 48 + 9
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in slug)
    assert slug not in (".", "..")
    d = tmp_path / slug
    d.mkdir()
    assert d.parent == tmp_path


def test_slug_keeps_simple_prompts_readable_and_distinguishes_long_ones():
    assert slugify("a hamburger") == "a_hamburger"
    assert slugify("x" * 100 + "a") != slugify("x" * 100 + "b")


@pytest.mark.parametrize("text,readable", [("一个菠萝", "YiGeBoLuo"), ("كوب أحمر", "kwb_hmr"), ("🍍 a pineapple", "pineapple_a_pineapple"),
                                           ("Ελληνικά", "Ellinika"), ("café", "cafe")])
def test_a_prompt_in_any_script_gets_a_readable_folder_name(text, readable):
    """Transliterated (anyascii), not dropped: no prompt becomes untitled-<hash> for being non-Latin."""
    slug = slugify(text)
    assert slug.startswith(readable + "-") and len(slug) == len(readable) + 9


@pytest.mark.parametrize("override,match", [
    ("export.resolution=-1", r"export.resolution=-1: must be an integer in \[2, 1024\]. Fix: e.g. export.resolution=128"),
    ("export.resolution=100000", r"export.resolution=100000: must be an integer in \[2, 1024\]. Fix: e.g. export.resolution=128"),
    ("export.video_views=0", r"export.video_views=0: must be an integer in \[1, 3600\]"),
    ("export.video_resolution=2.5", r"export.video_resolution=2.5: must be an integer in \[8, 4096\]"),
    ("export.fps=0", r"export.fps=0: must be an integer in \[1, 240\]"),
    ("validation.views=0", r"validation.views=0: must be an integer in \[1, 64\]"),
])
def test_export_and_validation_sizes_are_checked_before_the_first_step(override, match):
    from text23d.config import validate
    from text23d.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["prompt=a red cube", "prior=builtin", "debug=smoke", override]))


@pytest.mark.parametrize("override,match", [
    ("trainer.precision=17", r"^trainer.precision=17: allowed are \['32-true', .*Fix: trainer.precision=32-true"),
    ("trainer.accelerator=tpu", r"^trainer.accelerator='tpu': allowed are \['auto', 'cpu', 'gpu', 'cuda', 'mps'\]"),
    ("trainer.devices=0", r"^trainer.devices=0: a count ≥ 1, -1 \(all\), auto, or a list of device indices"),
    ("trainer.devices=[]", r"^trainer.devices=\[\]: a count"),
    ("trainer.enable_progress_bar=maybe", r"^trainer.enable_progress_bar='maybe': must be true or false"),
    ("trainer.log_every_n_steps=0", r"^trainer.log_every_n_steps=0: must be an integer ≥ 1"),
    ("+trainer.num_nodez=2", r"^\+trainer.num_nodez: not an argument of lightning.Trainer"),
    ("+trainer.callbacks=[]", r"^\+trainer.callbacks: not an argument of lightning.Trainer \(or one text23d sets itself\)"),
])
def test_every_trainer_option_is_checked_before_anything_loads(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["prompt=x", override]))


def test_trainer_options_lightning_takes_are_accepted():
    for override in ("trainer.precision=bf16-mixed", "trainer.devices=2", "trainer.devices=auto", "trainer.devices=[0]",
                     "trainer.accelerator=cpu", "+trainer.gradient_clip_val=1.0", "trainer.precision=32"):
        validate(compose_cfg(["prompt=x", override]))


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_with_the_fix():
    import torch

    if torch.cuda.is_available():  # on a GPU machine: more devices than it has
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=rf"^trainer.devices={n + 1}: this machine has {n} gpu device"):
            validate(compose_cfg(["prompt=x", "trainer.accelerator=gpu", f"trainer.devices={n + 1}"]))
    else:
        with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu: this machine has no CUDA device .* "
                                              r"Fix: trainer.accelerator=cpu, or auto"):
            validate(compose_cfg(["prompt=x", "trainer.accelerator=gpu"]))


@pytest.mark.parametrize("text,what", [("a red\rcube", "U+000D (carriage return) at position 5"),
                                       ("a red\u2028cube", "U+2028 (line separator) at position 5"),
                                       ("a red\u2029cube", "U+2029 (paragraph separator)")])
def test_prompts_hold_tabs_and_newlines_but_no_other_breaks(text, what):
    """A carriage return or a Unicode line/paragraph separator is invisible in most terminals and
    logs: refused with its name and position (tabs and newlines are whitespace and allowed)."""
    with pytest.raises(ConfigError, match=rf"^prompt holds 1 control character\(s\), the first {re.escape(what)}"):
        validate(_with_prompt(text))
    validate(_with_prompt("a red\tcube\non a table"))


def _with_prompt(text):
    cfg = compose_cfg(["prompt=x"])
    cfg.prompt = text
    return cfg


def test_an_export_that_cannot_fit_is_refused_before_it_allocates_and_the_estimate_adds_up():
    """export=<run> checks the export block alone (config.check_export): the estimate is the sum of
    its parts, each growing as its setting does, and more than the machine has is refused."""
    import psutil

    from text23d.config import check_export
    from text23d.export.budget import export_bytes

    base = compose_cfg(["prompt=x"]).export
    parts = export_bytes(base)
    assert all(v > 0 for v in parts.values())
    bigger = export_bytes(compose_cfg(["prompt=x", "export.resolution=256"]).export)
    assert bigger["mesh"] == 8 * parts["mesh"] and bigger["video"] == parts["video"]
    assert export_bytes(compose_cfg(["prompt=x", "export.texture=false"]).export)["texture"] == 0
    check_export(compose_cfg(["prompt=x"]))  # the defaults fit
    huge = compose_cfg(["prompt=x", "export.video_views=3600", "export.video_resolution=4096"])
    assert sum(export_bytes(huge.export).values()) > psutil.virtual_memory().total
    with pytest.raises(ConfigError, match=r"^export: these settings need about \d+ GiB .*Fix: e.g. export.video_views"):
        check_export(huge)
