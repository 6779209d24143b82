"""ProlificDreamer's three stages in one command: VSD on a NeRF, SDS on a DMTet's normal maps, VSD on
the frozen mesh's colours; every particle through every stage, exported textured on its own; exact
resume in any stage; stage 1 alone as before; refining an earlier stage-1 run. Real Lightning,
diffusers, peft, ffmpeg, xatlas, files."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
import trimesh

from helpers import Crash, assert_export_shows_the_renders, compose_cfg
from text23d.run import run

# Small parts: a 16³ grid, 8³-cube tet grids, 16² renders on the tiny pixel model; 6 steps split
# 25000 : 15000 : 30000 -> 2 + 1 + 3.
SMALL = ["geometry=grid", "geometry.resolution=16", "system.stage.geometry.geometry.resolution=8",
         "system.stage.texture.geometry.resolution=8", "export.texture_size=64",
         "guidance.lora_pretrained_model_name_or_path=null"]  # a LoRA on the tiny prior (sd21base pairs it with SD 2.1)


def pd(model, out, *extra):
    return compose_cfg(["prompt=a red cube", "system=vsd", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
                        f"output_dir={out}", "trainer.enable_progress_bar=false", "trainer.max_steps=6",
                        *SMALL, *extra])


@pytest.fixture(scope="module")
def three(tiny_pixel_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pd") / "straight"
    return run(pd(tiny_pixel_model, out, "system.num_particles=2", "deterministic=true",
                  "checkpoint.every_n_train_steps=1")), out


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_every_particle_goes_through_the_three_stages_and_is_exported_textured(three):
    summary, out = three
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("nerf", 2), ("geometry", 1), ("texture", 3)]
    assert summary["system"] == "prolificdreamer"
    for s in summary["stages"]:
        assert s["train_time_s"] > 0 and s["final_loss"] is not None
    assert summary["train_time_s"] == round(sum(s["train_time_s"] for s in summary["stages"]), 2)
    particles = summary["artifacts"]["particles"]
    assert len(particles) == 2 and particles[0]["mesh_glb"] != particles[1]["mesh_glb"]
    for p in particles:
        assert Path(p["mesh_glb"]).parent.name == "texture-it000006-export"
        mesh = trimesh.load(p["mesh_glb"], force="mesh", process=False)
        assert mesh.visual.kind == "texture" and len(mesh.faces) > 20
        assert Path(p["mesh_obj"]).with_suffix(".png").is_file()
    save = {p.name for p in (out / "save").iterdir()}
    assert {"nerf-it000002-particles.png", "geometry-it000003-particles.png"} <= save
    ckpt = torch.load(out / "ckpts" / "last.ckpt", weights_only=True)
    assert ckpt["text23d"]["stage"] == "texture" and ckpt["state_dict"]["stage_started"].tolist() == [True] * 3
    assert {p.name for p in (out / "ckpts").iterdir()} >= {"nerf.ckpt", "geometry.ckpt", "last.ckpt"}


def test_the_geometry_stage_moves_the_surface_and_the_texture_stage_keeps_it(three):
    _, out = three
    start, mid, end = (_state(out / "ckpts" / f) for f in ("nerf.ckpt", "geometry.ckpt", "last.ckpt"))
    for i in range(2):
        key = f"stages.1.particles.{i}.geometry.sdf"
        # Stage 2 starts from the stage-1 density (init_from_density) and its SDS step moves it.
        assert not torch.equal(start[key], mid[key])
        # Stage 3 is a copy of stage 2's mesh, frozen: the SDF and deformation are those stage 2 left.
        for name in ("sdf", "deform"):
            assert torch.equal(mid[f"stages.1.particles.{i}.geometry.{name}"],
                               end[f"stages.2.particles.{i}.geometry.{name}"])
        # ... while its colour field trains.
        colour = [k for k in end if k.startswith(f"stages.2.particles.{i}.geometry.color.")]
        assert colour and any(not torch.equal(mid[k.replace("stages.2", "stages.1")], end[k]) for k in colour)


def test_one_lora_trains_in_the_vsd_stages_only(three):
    _, out = three
    start, mid, end = (_state(out / "ckpts" / f) for f in ("nerf.ckpt", "geometry.ckpt", "last.ckpt"))
    lora = [k for k in end if k.startswith("lora_params.") and "lora_B" in k]
    assert lora
    assert all(torch.equal(start[k], mid[k]) for k in lora)  # the SDS stage on normals leaves it alone
    assert any(not torch.equal(mid[k], end[k]) for k in lora)  # the texture stage trains it on


def test_normal_shading_renders_the_normal_as_a_colour():
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.geometry.dmtet import DMTet
    from text23d.geometry.grid import DenseGrid
    from text23d.renderers.background import Background
    from text23d.renderers.mesh import MeshRenderer

    geometry = DMTet(resolution=12, color=DenseGrid(resolution=8))
    out = MeshRenderer(implementation="torch")(geometry, Background(mode="solid", color=[0, 0, 0]),
                                                RandomCameraSampler().orbit(1), 24, 24, shading="normal")
    inside = out["opacity"][0, ..., 0] > 0.999
    expected = (out["comp_normal"][0][inside] + 1) / 2
    assert inside.sum() > 50
    torch.testing.assert_close(out["comp_rgb"][0][inside], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("crash_at", [  # stages end at steps 2, 3, 6: in stage 1, at each boundary, in stage 3
    pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3,
    pytest.param(5, marks=pytest.mark.slow)])
def test_killed_in_any_stage_and_resumed_ends_bit_identical(three, tiny_pixel_model, tmp_path, crash_at):
    _, reference = three
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(pd(tiny_pixel_model, out, "system.num_particles=2", "deterministic=true",
               "checkpoint.every_n_train_steps=1"), callbacks=[Crash(crash_at)])
    resumed = run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}"])
    assert resumed["steps"] == 6 and [s["name"] for s in resumed["stages"]] == ["nerf", "geometry", "texture"]
    a, b = _state(reference / "ckpts" / "last.ckpt"), _state(out / "ckpts" / "last.ckpt")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, different


def test_lora_reset_starts_the_texture_stage_from_the_built_weights(tiny_pixel_model, tmp_path):
    from text23d.prior.loading import load_prior
    from text23d.run import build_system

    cfg = pd(tiny_pixel_model, tmp_path, "system.stage.texture.lora=reset")
    system = build_system(cfg)
    system.prior = load_prior(**OmegaConf.to_container(cfg.prior, resolve=True), device="cpu")
    system.setup_guidance()
    built = system.lora.trainable_state_dict()
    with torch.no_grad():  # as if stage 1 had trained it
        for p in system.lora.trainable_parameters():
            p.add_(0.5)
    system.lora_optimizer.state[system.lora.trainable_parameters()[0]] = {"step": torch.tensor(7.0)}
    system.begin_stage(1)  # the geometry stage (SDS) carries it: nothing changes
    assert all(torch.equal(built[k] + 0.5, v) for k, v in system.lora.trainable_state_dict().items())
    system.begin_stage(2)
    now = system.lora.trainable_state_dict()
    assert now.keys() == built.keys() and all(torch.equal(built[k], now[k]) for k in built)
    assert not system.lora_optimizer.state  # and a new optimizer


@pytest.mark.parametrize("crash_at", [pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])  # at the reset, just after
def test_a_run_that_resets_the_lora_resumes_bit_identical(tiny_pixel_model, tmp_path, crash_at):
    reset = ["deterministic=true", "checkpoint.every_n_train_steps=1", "system.stage.texture.lora=reset"]
    run(pd(tiny_pixel_model, tmp_path / "straight", *reset))
    carried = _state(tmp_path / "straight" / "ckpts" / "last.ckpt")
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(pd(tiny_pixel_model, out, *reset), callbacks=[Crash(crash_at)])
    run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}"])
    a, b = carried, _state(out / "ckpts" / "last.ckpt")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, different
    # ... and the reset changed the outcome: the carried-on LoRA ends elsewhere.
    run(pd(tiny_pixel_model, tmp_path / "carry", "deterministic=true"))
    c = _state(tmp_path / "carry" / "ckpts" / "last.ckpt")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("lora_params."))


def test_lora_reset_is_refused_where_no_lora_could_be_reset(tiny_pixel_model, tmp_path):
    from text23d.errors import ConfigError
    from text23d.run import build_system

    for stage in ("nerf", "geometry"):
        with pytest.raises(ConfigError, match=rf"system.stage.{stage}.lora=reset: only a VSD stage after the first"):
            build_system(pd(tiny_pixel_model, tmp_path, f"+system.stage.{stage}.lora=reset"))
    with pytest.raises(ConfigError, match=r"system.stage.texture.lora='keep': allowed are \['carry', 'reset'\]"):
        build_system(pd(tiny_pixel_model, tmp_path, "system.stage.texture.lora=keep"))
    sds = compose_cfg(["prompt=a red cube", "system=magic3d", "debug=smoke", "+system.stage.fine.lora=reset",
                       f"prior.pretrained_model_name_or_path={tiny_pixel_model}"])
    with pytest.raises(ConfigError, match=r"system.stage.fine.lora=reset: system magic3d trains no LoRA"):
        build_system(sds)


def test_stage_one_alone_and_then_refined_from_it(tiny_pixel_model, tmp_path):
    first = tmp_path / "nerf_only"
    one = run(pd(tiny_pixel_model, first, "system.stages=[nerf]", "trainer.max_steps=2"))
    assert [s["name"] for s in one["stages"]] == ["nerf"] and "it000002-export" in one["artifacts"]["mesh_glb"]
    refined = run(pd(tiny_pixel_model, tmp_path / "refined", f"init_from={first}", "trainer.max_steps=4"))
    assert [(s["name"], s["steps"]) for s in refined["stages"]][0] == ("nerf", 0)
    assert str(first) in refined["stages"][0]["from"] and sum(s["steps"] for s in refined["stages"]) == 4
    assert "texture-it000004-export" in refined["artifacts"]["mesh_glb"]


def test_a_stage_two_run_is_textured_by_init_from(tiny_pixel_model, tmp_path):
    first = tmp_path / "geometry_done"
    two = run(pd(tiny_pixel_model, first, "system.stages=[nerf,geometry]", "trainer.max_steps=3"))
    assert [s["name"] for s in two["stages"]] == ["nerf", "geometry"]
    textured = run(pd(tiny_pixel_model, tmp_path / "textured", f"init_from={first}", "trainer.max_steps=2"))
    assert [(s["name"], s["steps"]) for s in textured["stages"]] == [("geometry", 0), ("texture", 2)]
    sdf = "stages.1.particles.0.geometry.sdf"
    assert torch.equal(_state(first / "ckpts" / "last.ckpt")[sdf],
                       _state(tmp_path / "textured" / "ckpts" / "last.ckpt")[sdf.replace("stages.1", "stages.2")])


def test_init_from_carries_the_lora_on_unless_the_stage_resets_it(tiny_pixel_model, tmp_path):
    from text23d.prior.loading import load_prior
    from text23d.run import build_system
    from text23d.systems import init_from

    first = tmp_path / "geometry_done"
    run(pd(tiny_pixel_model, first, "system.stages=[nerf,geometry]", "trainer.max_steps=3"))
    source = {k: v for k, v in _state(first / "ckpts" / "last.ckpt").items() if k.startswith("lora_params.")}
    for lora, same in (("carry", True), ("reset", False)):
        cfg, loaded = init_from.prepare(pd(tiny_pixel_model, tmp_path / lora, f"init_from={first}",
                                           f"system.stage.texture.lora={lora}"))
        system = build_system(cfg)
        init_from.apply(system, loaded)
        system.prior = load_prior(**OmegaConf.to_container(cfg.prior, resolve=True), device="cpu")
        system.setup_guidance()
        # Loaded when the LoRA is built, with AdamW's moments ...
        assert source and all(torch.equal(system.state_dict()[k], v) for k, v in source.items())
        assert system.lora_optimizer.state
        system.begin_stage(2)  # ... and, with lora=reset, replaced when the stage starts
        # (lora_B starts at zero, so a trained one differs from the initial one)
        assert all(torch.equal(system.state_dict()[k], v) == same for k, v in source.items() if "lora_B" in k)
        assert bool(system.lora_optimizer.state) == same


def test_a_frozen_name_that_matches_nothing_is_refused(tiny_pixel_model, tmp_path):
    from text23d.errors import ConfigError
    from text23d.run import build_system

    with pytest.raises(ConfigError, match=r"system.stage.texture.freeze: 'geometry.sfd' matches no parameter"):
        build_system(pd(tiny_pixel_model, tmp_path, "system.stage.texture.freeze=[geometry.sfd]"))


def test_prolificdreamer_on_the_builtin_prior_through_the_command(tmp_path):
    import os
    import subprocess
    import sys

    text23d = str(Path(sys.executable).parent / "text23d")
    p = subprocess.run([text23d, "prompt=a blue cube", "system=vsd", "prior=builtin", "debug=smoke",
                        f"output_root={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_steps=6",
                        "system.stage.geometry.geometry.resolution=12", "system.stage.texture.geometry.resolution=12"],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    [run_dir] = list((tmp_path / "prolificdreamer").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["nerf", "geometry", "texture"]
    assert "texture-it000006-export" in summary["artifacts"]["mesh_glb"]
    assert_export_shows_the_renders(run_dir, summary["artifacts"]["mesh_glb"])
