"""End to end through the real run(): Lightning, diffusers, ffmpeg, files on disk."""
import json
from pathlib import Path

import imageio.v3 as iio
import lightning as L
import pytest
import torch
import trimesh
from PIL import Image

from helpers import Crash, compose_cfg
from text23d.errors import CheckpointError, ConfigError
from text23d.run import run


def smoke_cfg(model, out, *extra):
    return compose_cfg(["prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
                        f"output_dir={out}", "trainer.enable_progress_bar=false", *extra])


@pytest.fixture(scope="module")
def smoke_run(tiny_latent_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a_red_cube"
    return run(smoke_cfg(tiny_latent_model, out)), out


def test_a_run_writes_every_artifact(smoke_run):
    summary, out = smoke_run
    assert summary["steps"] == 4 and summary["prompt"] == "a red cube"
    assert json.loads((out / "summary.json").read_text()) == summary
    a = summary["artifacts"]
    assert (out / "config.yaml").is_file() and (out / "ckpts" / "last.ckpt").is_file()
    assert [Path(p).name for p in a["validation_images"]] == ["it000002-val.png", "it000004-val.png"]
    frames = list(iio.imiter(a["video"]))
    assert len(frames) == 8 and frames[0].shape[1] >= 2 * 32  # rgb | normals
    assert iio.imread(a["grid"]).ndim == 3
    obj, glb = trimesh.load(a["mesh_obj"], process=False), trimesh.load(a["mesh_glb"], force="mesh", process=False)
    assert len(obj.vertices) > 100 and len(glb.vertices) == len(obj.vertices)
    for mesh in (obj, glb):  # textured by default: one UV per vertex and the baked PNG
        assert mesh.visual.kind == "texture" and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert (Path(a["mesh_obj"]).parent / "model.png").is_file()
    assert summary["metrics"]["texture_size"] == 64 and summary["metrics"]["bake_s"] > 0  # debug=smoke's size
    assert Image.open(Path(a["mesh_obj"]).parent / "model.png").size == (64, 64)
    # the initial blob (radius 0.5) is what a 4-step run holds: the mesh must be about that size
    assert 0.25 < obj.bounding_sphere.primitive.radius < 0.8
    assert summary["metrics"]["mesh_silhouette_iou"] > 0.8
    assert (out / "logs" / "csv" / "metrics.csv").read_text().count("\n") >= 4
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents*"))
    assert summary["final_loss"] is not None and summary["wall_time_s"] > 0


def test_export_from_a_checkpoint_needs_no_diffusion_model(smoke_run):
    _, out = smoke_run
    cfg = compose_cfg([f"export.ckpt={out}", "export.format=glb", "export.video_views=4", "export.texture_size=64",
                       "prior.pretrained_model_name_or_path=/nonexistent/model"])
    res = run(cfg)
    assert set(res["artifacts"]) == {"video", "grid", "mesh_glb"}
    assert len(list(iio.imiter(res["artifacts"]["video"]))) == 4
    assert Path(res["artifacts"]["mesh_glb"]).stat().st_size > 1000


def test_export_texture_false_writes_vertex_colours(smoke_run):
    _, out = smoke_run
    res = run(compose_cfg(["export.texture_size=64", f"export.ckpt={out}", "export.texture=false",
                           "export.video_views=2"]))
    obj = trimesh.load(res["artifacts"]["mesh_obj"], process=False)
    assert obj.visual.kind == "vertex" and obj.visual.vertex_colors.shape[0] == len(obj.vertices)
    assert "texture_size" not in res["metrics"] and res["metrics"]["mesh_faces"] > 100


def test_export_video_false_writes_the_grid_and_mesh_but_no_turntable(smoke_run):
    _, out = smoke_run  # for a machine without ffmpeg (the GPU check's)
    res = run(compose_cfg(["export.texture_size=64", f"export.ckpt={out}", "export.texture=false", "export.format=obj",
                           "export.video=false"]))
    assert set(res["artifacts"]) == {"grid", "mesh_obj"} and Path(res["artifacts"]["grid"]).stat().st_size > 100
    with pytest.raises(ConfigError, match=r"export.video='maybe': must be true .* Fix: e.g. export.video=true"):
        run(compose_cfg([f"export.ckpt={out}", "export.video=maybe"]))


def _final_state(out: Path) -> dict:
    ckpt = torch.load(out / "ckpts" / "last.ckpt", weights_only=True)
    return {**ckpt["state_dict"], **{f"opt{i}": v for i, v in enumerate(_flat(ckpt["optimizer_states"]))}}


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in _flat(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


@pytest.mark.parametrize("crash_at", [3])
def test_interrupted_and_resumed_run_is_bit_identical(tiny_latent_model, tmp_path, crash_at):
    extra = ["deterministic=true", "trainer.max_steps=6", "checkpoint.every_n_train_steps=2",
             "system.shading.ambient_only_steps=1"]
    run(smoke_cfg(tiny_latent_model, tmp_path / "straight", *extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(smoke_cfg(tiny_latent_model, tmp_path / "crashed", *extra), callbacks=[Crash(crash_at)])
    assert torch.load(tmp_path / "crashed/ckpts/last.ckpt", weights_only=True)["global_step"] == 2
    summary = run(compose_cfg([f"resume={tmp_path / 'crashed'}"]), overrides=[f"resume={tmp_path / 'crashed'}"])
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("last.ckpt")
    # metrics logged before the crash are kept; the resumed part is logged beside them
    assert (tmp_path / "crashed/logs/csv/metrics.csv").read_text().count("\n") >= 2
    assert (tmp_path / "crashed/logs/csv/resumed-2/metrics.csv").is_file()
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "crashed")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differs after resume: {different}"
    # and the run really trained: weights moved away from initialisation
    assert not torch.equal(a[GEOMETRY_WEIGHT], run_init_weights(tiny_latent_model, tmp_path))


GEOMETRY_WEIGHT = "stages.0.particles.0.geometry.density_net.0.weight"  # the default hash grid's density MLP


def run_init_weights(model, tmp_path):
    from text23d.run import build_system
    L.seed_everything(0, verbose=False)
    return build_system(smoke_cfg(model, tmp_path / "init")).state_dict()[GEOMETRY_WEIGHT]


def test_resume_can_extend_a_finished_run(smoke_run):
    _, out = smoke_run
    s = run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}", "trainer.max_steps=5"])
    assert s["steps"] == 5 and s["output_dir"] == str(out)


@pytest.mark.parametrize("make_bad,match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "holds no checkpoint"),
    (lambda p: (p / "last.ckpt").write_bytes(b"not a checkpoint") and p / "last.ckpt", "cannot read checkpoint"),
])
def test_resume_from_a_bad_checkpoint_is_a_clear_error(tmp_path, make_bad, match):
    bad = make_bad(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        run(compose_cfg([f"resume={bad}"]))


def test_export_keeps_the_runs_settings_changes_only_what_is_asked_and_writes_a_new_folder(smoke_run, caplog):
    """text23d export=<run>: the run's own export settings (the smoke run's 64² texture, 8 frames of
    32 px), into <run>/exports/1, 2, ...; the run's files are never touched. Only what the command
    changes applies, and the log says what differs from the run's; a key typed at its default value
    (the CLI passes what was typed) still applies."""
    import hashlib
    import logging

    from PIL import Image

    _, out = smoke_run
    own = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file() and "exports" not in p.parts}
    n = len(list((out / "exports").iterdir())) if (out / "exports").exists() else 0  # other tests' exports
    with caplog.at_level(logging.INFO, logger="text23d"):
        same = run(compose_cfg([f"export.ckpt={out}"]))
    assert Path(same["folder"]) == out / "exports" / str(n + 1) and same["changed"] == {}
    assert "the run's own export settings" in caplog.text and "changed here" not in caplog.text
    assert same["settings"]["texture_size"] == 64 and same["settings"]["video_views"] == 8
    frames = list(iio.imiter(same["artifacts"]["video"]))
    assert len(frames) == 8 and frames[0].shape[:2] == (32, 64)  # rgb | normals, 32 px each
    assert Image.open(sorted(Path(same["folder"]).rglob("model.png"))[0]).size == (64, 64)
    assert json.loads((Path(same["folder"]) / "export.json").read_text())["changed"] == {}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="text23d"):
        changed = run(compose_cfg([f"export.ckpt={out}", "export.texture_size=32", "export.video_resolution=128"]),
                      overrides=[f"export.ckpt={out}", "export.texture_size=32", "export.video_resolution=128"])
    assert Path(changed["folder"]) == out / "exports" / str(n + 2)
    assert changed["changed"] == {"texture_size": 32, "video_resolution": 128}  # 128 is the default: typed, so it applies
    assert "export.texture_size=32 (the run's: 64)" in caplog.text
    assert Image.open(sorted(Path(changed["folder"]).rglob("model.png"))[0]).size == (32, 32)
    assert next(iter(iio.imiter(changed["artifacts"]["video"]))).shape[:2] == (128, 256)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in own} == own  # the run's files as they were


def test_a_failed_export_leaves_no_folder_and_the_run_untouched(smoke_run, monkeypatch):
    from text23d.export import artifacts

    _, out = smoke_run
    before = sorted(p.name for p in (out / "exports").iterdir()) if (out / "exports").exists() else []

    def fail(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(artifacts, "save_video", fail)
    with pytest.raises(OSError, match="the disk went away"):
        run(compose_cfg([f"export.ckpt={out}"]))
    after = sorted(p.name for p in (out / "exports").iterdir()) if (out / "exports").exists() else []
    assert after == before


def test_resume_goes_on_making_what_it_started(smoke_run, tmp_path, caplog):
    """resume= may change how a run runs (trainer.max_steps, export.*), not what it makes: a new
    prompt (or guidance, seed, ...) is refused with the fix, the run's files untouched, unless
    resume_overrides_ok=true says so (then it is logged)."""
    import logging
    import shutil

    _, out = smoke_run
    config = (out / "config.yaml").read_text()
    for change in ('prompt=a blue cube', "guidance.guidance_scale=7.5", "seed=3"):
        key = change.partition("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}=.*: the run being resumed has {key}=.*Fix: a new run with it, "
                                              "or add resume_overrides_ok=true"):
            run(compose_cfg([f"resume={out}"]), overrides=[f"resume={out}", change])
    assert (out / "config.yaml").read_text() == config
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    more = json.loads((copy / "summary.json").read_text())["steps"] + 1  # other tests may have extended it
    with caplog.at_level(logging.WARNING, logger="text23d"):
        summary = run(compose_cfg([f"resume={copy}", "resume_overrides_ok=true"]),
                      overrides=[f"resume={copy}", "prompt='a blue cube'", f"trainer.max_steps={more}",
                                 "resume_overrides_ok=true"])
    assert summary["steps"] == more and summary["prompt"] == "a blue cube"
    assert "resume: prompt=a blue cube replaces the run's a red cube" in caplog.text
    with pytest.raises(ConfigError, match=r"resume_overrides_ok='maybe': must be true or false"):
        run(compose_cfg(["prompt=x", "resume_overrides_ok=maybe", f"output_dir={tmp_path / 'n'}"]))


def test_a_checkpoint_copied_into_another_runs_folder_is_refused(smoke_run, tmp_path):
    """A Magic3D checkpoint in a DreamFusion run's folder must not turn that run into Magic3D."""
    import shutil

    _, out = smoke_run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    text = (other / "config.yaml").read_text()
    assert "text23d.systems.dreamfusion.DreamFusion" in text
    (other / "config.yaml").write_text(text.replace("text23d.systems.dreamfusion.DreamFusion",
                                                    "text23d.systems.prolificdreamer.ProlificDreamer"))
    with pytest.raises(CheckpointError, match=r"holds a DreamFusion run \(stages \['main'\]\), but its folder's "
                                              r"config.yaml is a ProlificDreamer run's .* Fix: resume the run it came from"):
        run(compose_cfg([f"resume={other}"]), overrides=[f"resume={other}", "trainer.max_steps=6"])
