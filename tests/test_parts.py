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
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def combinations() -> list[tuple[str, ...]]:
    return list(itertools.product(*(options(g) for g in GROUPS)))


def build(combo, tmp_path, *extra):
    overrides = [f"{g}={o}" for g, o in zip(GROUPS, combo)]
    return build_system(compose_cfg([*overrides, "prompt=a red cube", f"output_dir={tmp_path}", *extra]))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """combination -> the built system's part classes, or the ConfigError's message."""
    tmp, result = tmp_path_factory.mktemp("parts"), {}
    for combo in combinations():
        try:
            s = build(combo, tmp)
            result[combo] = tuple(type(x).__name__ for x in (s, s.geometry, s.renderer, s.guidance))
        except ConfigError as e:
            result[combo] = str(e)
    return result


def test_every_combination_builds_or_is_refused_with_a_message_that_names_the_parts(outcomes):
    assert len(outcomes) >= 64  # 4 systems × 2 geometries × 2 guidances × 4 priors, at least
    refused = {c: m for c, m in outcomes.items() if isinstance(m, str)}
    for combo, message in refused.items():
        assert "needs" in message and "Fix:" in message, (combo, message)
        assert "guidance" in message and "system" in message, (combo, message)
    # the two known mismatches, whatever prior or geometry
    for combo, outcome in outcomes.items():
        c = dict(zip(GROUPS, combo))
        vsd_system = c["system"] in ("vsd", "prolificdreamer")
        assert isinstance(outcome, str) == (vsd_system != (c["guidance"] == "vsd")), (combo, outcome)
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
                       "prior.latent=auto", "prior.dtype=float32", "trainer.max_steps=1")
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
        trainer.fit(system)
        assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train/loss"])), parts_
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
