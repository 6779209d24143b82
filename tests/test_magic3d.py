"""Magic3D in one command: the coarse NeRF stage, the DMTet fine stage started from it, stage
bookkeeping in checkpoints and the summary, exact resume across the boundary, export from either
stage, and refining an earlier run with init_from. Real Lightning, diffusers, ffmpeg, files."""
import json
from pathlib import Path

import pytest
import torch
import trimesh

from helpers import Crash, assert_export_shows_the_renders, compose_cfg
from text23d.run import run

# Small parts so both stages run in seconds: a 4-level hash grid, a 12³-cube tet grid, 16² renders.
SMALL = ["geometry.n_levels=4", "geometry.log2_table=12", "geometry.base_resolution=8",
         "system.stage.fine.geometry.resolution=12", "renderer.num_samples=16", "renderer.occupancy.resolution=8",
         "renderer.occupancy.warmup_steps=2", "renderer.occupancy.update_every=2"]


def magic3d(model, out, *extra):
    return compose_cfg(["prompt=a red cube", "system=magic3d", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
                        f"output_dir={out}", "trainer.enable_progress_bar=false", "trainer.max_steps=6",
                        "system.shading.ambient_only_steps=1", *SMALL, *extra])


@pytest.fixture(scope="module")
def straight(tiny_latent_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("m3") / "straight"
    return run(magic3d(tiny_latent_model, out, "deterministic=true", "checkpoint.every_n_train_steps=1")), out


def test_both_stages_run_in_one_command_and_every_artefact_says_which(straight):
    summary, out = straight
    assert [s["name"] for s in summary["stages"]] == ["coarse", "fine"]
    assert [s["steps"] for s in summary["stages"]] == [4, 2]  # 6 steps split 10000 : 5000
    for s in summary["stages"]:
        assert s["train_time_s"] > 0 and s["final_loss"] is not None and Path(s["outputs"]["video"]).is_file()
    save = sorted(p.name for p in (out / "save").iterdir())
    assert "coarse-it000004-test.mp4" in save and "fine-it000006-test.mp4" in save
    assert any(n.startswith("coarse-it") and n.endswith("-val.png") for n in save)
    assert any(n.startswith("fine-it") and n.endswith("-val.png") for n in save)
    glb = summary["artifacts"]["mesh_glb"]
    assert Path(glb).parent.name == "fine-it000006-export"
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 50 and mesh.visual.kind == "texture" and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert "isosurface_threshold" not in summary["metrics"]  # a DMTet mesh: no level was chosen
    ckpt = torch.load(out / "ckpts" / "last.ckpt", weights_only=True)
    assert ckpt["text23d"]["stage"] == "fine" and ckpt["state_dict"]["stage_started"].tolist() == [True, True]
    coarse = torch.load(out / "ckpts" / "coarse.ckpt", weights_only=True)  # kept at the stage's end
    assert coarse["global_step"] == 4 and coarse["text23d"]["stage"] == "coarse"


def _final(out: Path) -> dict:
    ckpt = torch.load(out / "ckpts" / "last.ckpt", weights_only=True)
    opt = [t for s in ckpt["optimizer_states"] for st in s["state"].values() for t in st.values()
           if isinstance(t, torch.Tensor)]
    return {**ckpt["state_dict"], **{f"opt{i}": t for i, t in enumerate(opt)}}


@pytest.mark.parametrize("crash_at", [  # inside the coarse stage, at the boundary, inside the fine stage
    pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(5, marks=pytest.mark.slow)])
def test_killed_anywhere_and_resumed_ends_bit_identical(straight, tiny_latent_model, tmp_path, crash_at):
    _, reference = straight
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(magic3d(tiny_latent_model, out, "deterministic=true", "checkpoint.every_n_train_steps=1"),
            callbacks=[Crash(crash_at)])
    resumed = run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}"])
    assert resumed["steps"] == 6 and [s["name"] for s in resumed["stages"]] == ["coarse", "fine"]
    a, b = _final(reference), _final(out)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_export_from_a_coarse_and_a_fine_checkpoint(straight, tiny_latent_model, tmp_path):
    out = tmp_path / "coarse_only"
    run(magic3d(tiny_latent_model, out, "system.stages=[coarse]", "trainer.max_steps=2"))
    coarse = run(compose_cfg(["export.texture_size=64", f"export.ckpt={out}", "export.format=glb",
                              "export.video_views=2",
                              "export.resolution=32"]))
    assert "isosurface_threshold" in coarse["metrics"]  # a density stage: marching cubes at a chosen level
    assert trimesh.load(coarse["artifacts"]["mesh_glb"], force="mesh").faces.shape[0] > 50
    _, fine_run = straight
    fine = run(compose_cfg(["export.texture_size=64", f"export.ckpt={fine_run}", "export.format=obj",
                            "export.video_views=2"]))
    assert "fine-it000006-export" in fine["artifacts"]["mesh_obj"]
    kept = run(compose_cfg(["export.texture_size=64", f"export.ckpt={fine_run / 'ckpts' / 'coarse.ckpt'}",
                            "export.format=obj",
                            "export.video_views=2", "export.resolution=32"]))
    assert "coarse-it000004-export" in kept["artifacts"]["mesh_obj"] and "isosurface_threshold" in kept["metrics"]


def test_init_from_refines_an_earlier_run_without_copying_paths(tiny_latent_model, tmp_path):
    coarse = tmp_path / "dreamfusion"
    run(compose_cfg(["prompt=a red cube", "debug=smoke", "geometry=grid", "geometry.resolution=16",
                     f"prior.pretrained_model_name_or_path={tiny_latent_model}", f"output_dir={coarse}",
                     "trainer.enable_progress_bar=false"]))
    summary = run(magic3d(tiny_latent_model, tmp_path / "refined", f"init_from={coarse}", "trainer.max_steps=2"))
    assert summary["steps"] == 2
    assert summary["stages"][0]["steps"] == 0 and str(coarse) in summary["stages"][0]["from"]
    assert summary["stages"][1]["name"] == "fine" and summary["stages"][1]["steps"] == 2
    assert Path(summary["artifacts"]["mesh_glb"]).is_file()


def test_a_mesh_geometry_with_the_volume_renderer_is_refused(tmp_path):
    from text23d.errors import ConfigError
    from text23d.run import build_system

    with pytest.raises(ConfigError, match=r"renderer VolumeRenderer needs a density field.*Fix: renderer=rasterize"):
        build_system(compose_cfg(["prompt=x", "geometry=dmtet", f"output_dir={tmp_path}"]))


def test_magic3d_on_the_builtin_prior_through_the_command(tmp_path):
    import os
    import subprocess
    import sys

    text23d = str(Path(sys.executable).parent / "text23d")
    p = subprocess.run([text23d, "prompt=a blue cube", "system=magic3d", "prior=builtin", "debug=smoke",
                        f"output_root={tmp_path}", "trainer.enable_progress_bar=false",
                        "system.stage.fine.geometry.resolution=12"],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    said = [line.split("] - ", 1)[1] for line in p.stdout.splitlines() if "][text23d][" in line]
    assert len(said) == len(set(said)), said  # each line once: the stage plan, each stage's start, its estimate
    assert sum("stage fine starts from stage coarse" in line for line in said) == 1
    [run_dir] = list((tmp_path / "magic3d").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["coarse", "fine"] and summary["steps"] == 4
    assert "fine-it000004-export" in summary["artifacts"]["mesh_glb"]
    assert_export_shows_the_renders(run_dir, summary["artifacts"]["mesh_glb"])  # the fine stage's mesh
