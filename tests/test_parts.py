"""Every combination of the options in conf/ either builds or is refused with a clear ConfigError,
before any model is loaded; and every combination that builds really trains (one step on a tiny
model). New options in conf/ are covered automatically."""
import itertools
import math
from pathlib import Path

import lightning as L
import pytest

from helpers import compose_cfg
from text23d.errors import ConfigError
from text23d.run import build_system

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("system", "geometry", "renderer", "guidance", "prior", "camera", "trainer")


def options(group: str) -> list[str]:
    """The group's options, less aliases (a file that only names another option, such as
    system=sds: test_config checks that an alias composes to the same config)."""
    import yaml

    out = []
    for path in sorted((CONF / group).glob("*.yaml")):
        body = yaml.safe_load(path.read_text()) or {}
        if set(body) == {"defaults"} and len([d for d in body["defaults"] if d != "_self_"]) == 1:
            continue
        out.append(path.stem)
    return out


def combinations() -> list[tuple[str, ...]]:
    return list(itertools.product(*(options(g) for g in GROUPS)))


def build(combo, tmp_path, *extra):
    """Build a combination with small sizes (the parts and their checks are the same at any size)."""
    from omegaconf import OmegaConf

    overrides = [f"{g}={o}" for g, o in zip(GROUPS, combo)]
    cfg = compose_cfg([*overrides, "prompt=a red cube", f"output_dir={tmp_path}", *extra])
    for node in [cfg.geometry, *(st.geometry for st in (cfg.system.get("stage") or {}).values() if st and "geometry" in st)]:
        for key, small in (("resolution", 12), ("log2_table", 12), ("n_levels", 4)):
            if key in node:
                OmegaConf.update(node, key, small)
    return build_system(cfg)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """combination -> the built system's part classes, or the ConfigError's message."""
    tmp, result = tmp_path_factory.mktemp("parts"), {}
    for combo in combinations():
        try:
            s = build(combo, tmp)
            result[combo] = (type(s).__name__,) + tuple(
                type(x).__name__ for st in s.stages for x in (st.particles[0].geometry, st.renderer, st.guidance))
        except ConfigError as e:
            result[combo] = str(e)
    return result


PART = r"(system|guidance|renderer|geometry) [A-Z]\w+"
REFUSAL = r"needs .+, which .+ does not provide\. Fix: .+"


def expected_refusal(c: dict) -> bool:
    """The known mismatches, whatever the prior: VSD guidance without the VSD system or the other
    way round; a mesh geometry without the rasteriser or the other way round. (A DMTet first stage
    hands the next DMTet stage a copy: allowed when their grids match, as `build` makes them.)"""
    vsd_mismatch = (c["system"] == "prolificdreamer") != (c["guidance"] == "vsd")
    mesh_mismatch = (c["geometry"] == "dmtet") != (c["renderer"] == "rasterize")
    return vsd_mismatch or mesh_mismatch


def test_every_combination_builds_or_is_refused_with_a_message_that_names_the_parts(outcomes):
    import re

    assert len(outcomes) >= 3 * 4 * 2 * 2 * 4  # systems × geometries × renderers × guidances × priors
    refused = {c: m for c, m in outcomes.items() if isinstance(m, str)}
    for combo, message in refused.items():
        assert re.search(REFUSAL, message) and len(re.findall(PART, message)) >= 2, (combo, message)
    for combo, outcome in outcomes.items():
        assert isinstance(outcome, str) == expected_refusal(dict(zip(GROUPS, combo))), (combo, outcome)
    assert len(refused) < len(outcomes)


def test_every_combination_that_builds_trains_a_step(outcomes, tiny_pixel_model, tmp_path):
    """One real step per distinct set of parts, on a tiny model: the check lets nothing through
    that then fails at the first step (as VSD guidance in DreamFusion once did)."""
    seen = {}
    for combo, outcome in outcomes.items():
        if not isinstance(outcome, str):
            seen.setdefault(outcome, combo)
    assert len(seen) >= 4
    for parts_, combo in seen.items():
        L.seed_everything(0, verbose=False)
        system = build(combo, tmp_path, "debug=smoke",
                       f"prior.pretrained_model_name_or_path={tiny_pixel_model}", "prior.resolution=null",
                       "prior.latent=auto", "prior.dtype=float32", "trainer.max_steps=3")
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
        trainer.fit(system)  # 3 steps: every stage of Magic3D and ProlificDreamer starts from the one before
        assert trainer.global_step == 3 and math.isfinite(float(trainer.callback_metrics["train/loss"])), parts_
        assert not system.prior.text_encoder_loaded, "prompts are cached: the text encoder is released"


@pytest.mark.parametrize("override,match", [
    (["guidance=vsd"], r"guidance VSDGuidance needs each view's camera pose and a training loop for the "
                       r"LoRA score model, which system DreamFusion does not provide\. Fix: system=vsd"),
    (["system=vsd", "guidance=sds"], r"system ProlificDreamer needs a LoRA score model of the renders \(VSD\), "
                                     r"which guidance SDSGuidance does not provide\. Fix: guidance=vsd"),
])
def test_a_mismatch_is_named_with_its_fix(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        build_system(compose_cfg(["prompt=x", f"output_dir={tmp_path}", *override]))


def test_a_loss_term_the_renderer_cannot_feed_is_refused(tmp_path):
    """A renderer without per-sample weights (a rasteriser) cannot feed the orientation loss."""
    from text23d.renderers.volume import VolumeRenderer
    from text23d.systems import parts

    class NoWeights(VolumeRenderer):
        provides = VolumeRenderer.provides - {"sample_weights"}

    system = build_system(compose_cfg(["prompt=x", f"output_dir={tmp_path}", "geometry=grid", "geometry.resolution=8"]))
    args = (system, system.geometry, NoWeights(), system.guidance)
    with pytest.raises(ConfigError, match=r"lambda_orient needs per-sample volume-rendering weights.*lambda_orient=0"):
        parts.check(*args, {"orient": [0, 10.0, 1000.0, 5000]}, shading_needs_normals=False)
    parts.check(*args, {"orient": 0.0, "sparsity": 1.0}, shading_needs_normals=False)  # weight 0: fine


def test_a_copied_mesh_stage_of_another_size_is_refused(tmp_path):
    """A DMTet stage that starts from a DMTet stage copies it: their grids must match."""
    with pytest.raises(ConfigError, match=r"stage fine: geometry DMTet \(init: previous\) needs a copy of its own size "
                                          r"\(deform: \(2197, 3\)\), which stage coarse's geometry DMTet does not provide "
                                          r"\(\(35937, 3\)\)\. Fix: the same geometry.resolution"):
        build_system(compose_cfg(["prompt=x", f"output_dir={tmp_path}", "system=magic3d", "geometry=dmtet",
                                  "renderer=rasterize", "geometry.resolution=32",
                                  "system.stage.fine.geometry.resolution=12"]))


@pytest.mark.parametrize("system,usual", [("magic3d", "coarse,fine"), ("vsd", "nerf,geometry,texture"),
                                          ("dreamfusion", "main")])
def test_an_unknown_stage_is_refused_with_the_systems_own_stages_in_order(system, usual):
    from text23d.systems.stages import stage_configs

    with pytest.raises(ConfigError, match=rf"system.stages=\['bogus'\]: stages \['bogus'\] are not defined; .* "
                                          rf"Fix: system.stages=\[{usual}\] \(the system's own, in order\)"):
        stage_configs(compose_cfg(["prompt=x", f"system={system}", "system.stages=[bogus]"]))
