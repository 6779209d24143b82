"""Per-stage render sizes that change at resolution milestones (threestudio's `width: [64, 512]`,
`resolution_milestones: [5000]`): applied by stage-local step, checked before the first step with
fix-it errors, and the same after a resume."""
import lightning as L
import pytest

from helpers import Crash, compose_cfg
from text23d.config import validate
from text23d.errors import ConfigError
from text23d.run import run
from text23d.systems.stages import render_size, stage_configs


def test_prolificdreamer_renders_64_then_512_from_step_5000_of_stage_1():
    nerf, geometry, texture = stage_configs(compose_cfg(["prompt=x", "system=vsd"]))
    assert [render_size(nerf, s, 512) for s in (0, 4999, 5000, 24999)] == [(64, 64)] * 2 + [(512, 512)] * 2
    assert render_size(geometry, 0, 512) == render_size(texture, 9999, 512) == (512, 512)  # null: the prior's
    assert render_size(geometry, 0, 64) == (64, 64)


def check(*overrides):
    cfg = compose_cfg(["prompt=x", *overrides])
    validate(cfg)
    return stage_configs(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["system.width=[16,24]", "system.height=[16,24]"],
     r"system.width=\[16, 24\] with resolution_milestones=\[\]: a list of sizes needs 1 .* Fix: e.g."),
    (["system.width=[16,24,32]", "system.height=[16,24,32]", "system.resolution_milestones=[5,2]"],
     r"system.resolution_milestones=\[5, 2\]: .* integers ≥ 1 in increasing order"),
    (["system.resolution_milestones=[0]"], r"system.resolution_milestones=\[0\]"),
    (["system.width=[16,2]", "system.height=[16,16]", "system.resolution_milestones=[3]"], r"system.width\[1\]=2"),
    (["system=vsd", "+system.stage.nerf.resolution_milestones=[1000,2000]"],
     r"system.stage.nerf.width=\[64, 512\] with resolution_milestones=\[1000, 2000\]: a list of sizes needs 3"),
    (["system=vsd", "+system.stage.nerf.prompt_processor.view_sectors=8"],
     r"system.stage.nerf.prompt_processor has keys \['view_sectors'\]: a stage sets only its view thresholds"),
    (["system=vsd", "system.stage.geometry.prompt_processor.front_threshold=170"],
     r"system.stage.geometry.prompt_processor: front_threshold=170, back_threshold=45.0 are invalid"),
])
def test_a_bad_schedule_is_refused_before_anything_is_built(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check(*overrides)


def test_one_size_with_milestones_is_that_size_throughout():
    [main] = check("system.width=24", "system.height=16", "system.resolution_milestones=[2]")
    assert render_size(main, 0, 512) == render_size(main, 9, 512) == (16, 24)


class Sizes(L.Callback):
    """The (height, width) the training step renders at, by step."""

    def __init__(self):
        self.at = {}

    def on_fit_start(self, trainer, system):
        def hook(module, args, kwargs):
            if kwargs.get("jitter"):  # a training render, not a validation or export view
                self.at.setdefault(trainer.global_step, (args[3], args[4]))
        for stage in system.stages:
            stage.renderer.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_size_changes_at_its_milestone_and_a_resumed_run_renders_alike(tiny_pixel_model, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(["prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={tiny_pixel_model}",
                       f"output_dir={out}", "trainer.enable_progress_bar=false", "trainer.max_steps=4",
                       "system.width=[16,24]", "system.height=[16,20]", "system.resolution_milestones=[2]",
                       "validation.every_n_steps=0"])
    first = Sizes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, callbacks=[first, Crash(3)])  # debug=smoke checkpoints every 2 steps: at step 2
    assert first.at == {0: (16, 16), 1: (16, 16), 2: (20, 24)}
    resumed = Sizes()
    summary = run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}"], callbacks=[resumed])
    assert summary["steps"] == 4 and resumed.at == {2: (20, 24), 3: (20, 24)}


def test_the_memory_estimate_counts_the_sizes_a_run_reaches(tiny_pixel_model, tmp_path):
    # ProlificDreamer's stage 1 renders 512² only from step 5,000: a shorter run is estimated at 64².
    from text23d import memory
    from text23d.run import build_system

    def largest(steps):
        system = build_system(compose_cfg(["prompt=x", "system=vsd", "system.stages=[nerf]", f"trainer.max_steps={steps}",
                                           f"prior.pretrained_model_name_or_path={tiny_pixel_model}",
                                           "guidance.lora_pretrained_model_name_or_path=null", f"output_dir={tmp_path}"]))
        return memory.render_size(system.stages[0], 16)
    assert largest(3) == largest(5000) == (64, 64) and largest(5001) == (512, 512)
