"""ProlificDreamer (system=vsd) end to end: particles, LoRA in the checkpoint, exact resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import Crash, assert_export_shows_the_renders, compose_cfg
from text23d.errors import ConfigError
from text23d.run import build_system, run


def vsd_cfg(model, out, *extra):
    """Stage 1 only (system.stages=[nerf]): the three stages are tests/test_prolificdreamer.py's."""
    return compose_cfg(["prompt=a red cube", "system=vsd", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
                        f"output_dir={out}", "trainer.enable_progress_bar=false", "geometry=grid",
                        "geometry.resolution=16", "system.stages=[nerf]", *tiny_lora(extra), *extra])


def tiny_lora(extra):  # a LoRA on the tiny prior itself (prior=sd21base pairs VSD with SD 2.1 from the hub)
    return [] if "guidance=sds" in extra else ["guidance.lora_pretrained_model_name_or_path=null"]


def test_two_particles_are_exported_separately_and_differ(tiny_pixel_model, tmp_path):
    prior_before = load_file(str(Path(tiny_pixel_model) / "unet" / "diffusion_pytorch_model.safetensors"))
    s = run(vsd_cfg(tiny_pixel_model, tmp_path / "run", "system.num_particles=2", "trainer.max_steps=6"))
    a = s["artifacts"]
    assert len(a["particles"]) == 2
    for p in a["particles"]:
        assert Path(p["video"]).is_file() and Path(p["mesh_obj"]).is_file()
    assert a["particles"][0]["video"] != a["particles"][1]["video"]
    assert Path(a["grid"]).name.endswith("-particles.png") and Path(a["lora"]).is_file()
    state = torch.load(tmp_path / "run/ckpts/last.ckpt", weights_only=True)["state_dict"]
    g0, g1 = state["stages.0.particles.0.geometry.density_grid"], state["stages.0.particles.1.geometry.density_grid"]
    assert not torch.equal(g0, g1), "particles must differ"
    lora = load_file(a["lora"])
    # the LoRA trained: peft's B matrices and the camera MLP's last layer start at zero
    moved = [k for k, v in lora.items() if ("lora_B" in k or "class_embedding" in k) and v.abs().sum() > 0]
    assert any("lora_B" in k for k in moved) and any("class_embedding" in k for k in moved), sorted(lora)[:5]
    assert any(k.startswith("lora_params.") for k in state)  # the LoRA rides in the checkpoint
    # the frozen prior on disk is untouched
    after = load_file(str(Path(tiny_pixel_model) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(prior_before[k], after[k]) for k in prior_before)
    assert json.loads((tmp_path / "run/summary.json").read_text())["system"] == "prolificdreamer"


def test_vsd_resume_is_bit_identical(tiny_pixel_model, tmp_path):
    extra = ["deterministic=true", "trainer.max_steps=5", "checkpoint.every_n_train_steps=2"]
    run(vsd_cfg(tiny_pixel_model, tmp_path / "a", *extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(vsd_cfg(tiny_pixel_model, tmp_path / "b", *extra), callbacks=[Crash(3)])
    run(compose_cfg([f"resume={tmp_path / 'b'}"]), overrides=[f"resume={tmp_path / 'b'}"])
    a = torch.load(tmp_path / "a/ckpts/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b/ckpts/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 5
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different
    la, lb = load_file(str(tmp_path / "a/ckpts/lora.safetensors")), load_file(str(tmp_path / "b/ckpts/lora.safetensors"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_export_from_a_vsd_checkpoint(tiny_pixel_model, tmp_path):
    run(vsd_cfg(tiny_pixel_model, tmp_path / "r", "trainer.max_steps=2"))
    res = run(compose_cfg(["export.texture_size=64", f"export.ckpt={tmp_path / 'r'}", "export.format=obj",
                           "export.video_views=2"]))
    assert Path(res["artifacts"]["mesh_obj"]).is_file()


def test_vsd_needs_vsd_guidance(tiny_pixel_model, tmp_path):
    with pytest.raises(ConfigError, match="guidance=vsd"):
        build_system(vsd_cfg(tiny_pixel_model, tmp_path, "guidance=sds"))


def test_vsd_on_the_builtin_prior_from_the_command_line_and_resume(tmp_path):
    import os
    import subprocess
    import sys

    text23d = str(Path(sys.executable).parent / "text23d")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [text23d, "prompt=a red cube", "system=vsd", "prior=builtin", "debug=smoke", "system.stages=[nerf]",
            f"output_root={tmp_path}", "trainer.enable_progress_bar=false"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    [run_dir] = list((tmp_path / "prolificdreamer").iterdir())
    p = subprocess.run([text23d, f"resume={run_dir}", "trainer.max_steps=6"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] and Path(summary["artifacts"]["lora"]).is_file()
    assert_export_shows_the_renders(run_dir, summary["artifacts"]["mesh_glb"])


def test_vsd_terms_script_measures_each_term_of_a_trained_run(tiny_pixel_model, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vsd_terms", Path(__file__).parents[1] / "scripts/vsd_terms.py")
    vsd_terms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vsd_terms)
    run(vsd_cfg(tiny_pixel_model, tmp_path / "run", "trainer.max_steps=4", "guidance.lora_lr=1e-2"))
    r = vsd_terms.terms(tmp_path / "run", n_views=4)
    assert r["step"] == 4 and set(r["terms"]) == {"t=0.2T", "t=0.5T", "t=0.8T"}
    for row in r["terms"].values():  # an untrained LoRA predicts exactly ε_c: its term starts at 0
        assert row["lora_term"] > 0 and row["guidance_term"] > 0 and row["sds_noise_term"] > 0
