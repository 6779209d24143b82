"""Sweep summary on real folders: fake jobs on disk, and one real Hydra multirun."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import yaml
from omegaconf import OmegaConf
from PIL import Image

from text23d.export.video import save_image, save_video
from text23d.sweep import SweepSummary, summarize_sweep

TILE_H, TILE_W = 40, 80


def make_job(sweep, name, overrides, loss=None, grid_value=None, video=False, prompt="a red cube"):
    """A job folder as a run leaves it; no summary.json (a crash) when loss is None."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if loss is None:
        (job / "text23d.log").write_text("Traceback ...\n")
        return job
    save = job / "save"
    artifacts = {"mesh_obj": str(save / "model.obj"), "mesh_glb": str(save / "model.glb")}
    if grid_value is not None:
        image = np.full((TILE_H, TILE_W, 3), grid_value, np.uint8)
        artifacts["grid"] = save_image(image, save / "it2-test.png")
    if video:
        frames = np.full((2, TILE_H, TILE_W, 3), 0.2)
        artifacts["video"] = save_video(frames, save / "it2-test.mp4")
    summary = {"prompt": prompt, "system": "dreamfusion", "steps": 2, "wall_time_s": 1.5,
               "final_loss": loss, "metrics": {}, "artifacts": artifacts, "output_dir": str(job)}
    (job / "summary.json").write_text(json.dumps(summary))
    return job


def make_sweep(root):
    sweep = root / "multirun" / "2024-01-01"
    common = "prompt=a red cube"
    make_job(sweep, "0-a_red_cube", [common, "guidance.guidance_scale=7.5"], 0.25, grid_value=0)
    make_job(sweep, "1-a_red_cube", [common, "guidance.guidance_scale=100"], 0.5, grid_value=128)
    make_job(sweep, "10-a_red_cube", [common, "guidance.guidance_scale=1000"])  # failed
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def table_rows(md_text):
    return [line for line in md_text.splitlines() if line.startswith("|")]


def test_summary_files_list_jobs_swept_override_and_failures(tmp_path):
    sweep = make_sweep(tmp_path)
    out = summarize_sweep(sweep)
    assert out["json"] == str(sweep / "sweep_summary.json") and out["html"] == str(sweep / "index.html")

    jobs = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["folder"] for j in jobs] == ["0-a_red_cube", "1-a_red_cube", "10-a_red_cube"]
    assert [j["status"] for j in jobs] == ["ok", "ok", "failed"]
    assert jobs[0]["final_loss"] == 0.25 and jobs[0]["steps"] == 2 and jobs[0]["wall_time_s"] == 1.5
    assert jobs[1]["overrides"] == ["prompt=a red cube", "guidance.guidance_scale=100"]
    assert jobs[0]["artifacts"]["grid"].endswith("it2-test.png")
    assert jobs[2]["log"] == "10-a_red_cube/text23d.log" and "no summary.json" in jobs[2]["error"]

    rows = table_rows((sweep / "sweep_summary.md").read_text())
    assert len(rows) == 2 + 3  # header, separator, one row per job
    assert "guidance.guidance_scale" in rows[0] and "prompt" not in rows[0]  # only the swept key
    assert "| 7.5 |" in rows[2] and "| 1000 |" in rows[4]
    assert "failed ([log](10-a_red_cube/text23d.log))" in rows[4]
    assert "0.25" in rows[2] and "(0-a_red_cube/save/model.glb)" in rows[2]  # relative links


def test_sweep_grid_puts_every_job_side_by_side(tmp_path):
    sweep = make_sweep(tmp_path)
    grid = np.asarray(Image.open(summarize_sweep(sweep)["grid"]))
    pad = 2
    assert grid.shape[1] == 3 * TILE_W + 4 * pad  # three tiles: the failed job gets a blank one
    assert grid.shape[0] > TILE_H + 2 * pad  # plus a label band
    tiles = [grid[pad : pad + TILE_H, pad + n * (TILE_W + pad) :][:, :TILE_W] for n in range(3)]
    assert tiles[0].max() == 0 and (tiles[1] == 128).all() and (tiles[2] == 200).all()


def test_video_first_frame_when_a_job_has_no_grid(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "0", ["seed=0"], 0.1, video=True)
    make_job(sweep, "1", ["seed=1"], 0.1, grid_value=255)
    grid = np.asarray(Image.open(summarize_sweep(sweep)["grid"]))
    first = grid[2 : 2 + TILE_H, 2 : 2 + TILE_W].astype(float)
    assert abs(first.mean() - 0.2 * 255) < 10  # the video's first frame, not a blank tile


def test_moved_sweep_folder_still_finds_artifacts(tmp_path):
    sweep = make_sweep(tmp_path / "cluster")
    moved = tmp_path / "laptop" / "sweep"
    shutil.copytree(sweep, moved)
    shutil.rmtree(tmp_path / "cluster")
    jobs = summarize_sweep(moved)["jobs"]
    assert jobs[0]["artifacts"]["grid"] == str(moved / "0-a_red_cube" / "save" / "it2-test.png")
    assert os.path.exists(moved / "sweep_grid.png")


def test_empty_or_missing_sweep_does_not_raise(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    out = summarize_sweep(tmp_path / "empty")
    assert out["jobs"] == [] and out["grid"] is None
    assert json.loads((tmp_path / "empty" / "sweep_summary.json").read_text()) == []
    assert summarize_sweep(tmp_path / "missing")["json"] is None
    assert "No job folders" in caplog.text and "does not exist" in caplog.text


def test_callback_reads_the_sweep_dir_from_the_config(tmp_path):
    sweep = make_sweep(tmp_path)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "runtime": {"cwd": "/"}}})
    SweepSummary().on_multirun_end(config)
    assert sorted(p.name for p in sweep.glob("sweep_*")) == [
        "sweep_grid.png", "sweep_summary.json", "sweep_summary.md"]


APP = textwrap.dedent("""
    import json, os, hydra
    from hydra.core.hydra_config import HydraConfig
    from text23d.export.video import save_image

    @hydra.main(version_base=None, config_path=".", config_name="app")
    def main(cfg):
        if cfg.scale == 3:
            raise RuntimeError("diverged")
        out = HydraConfig.get().runtime.output_dir
        grid = save_image(__import__("numpy").zeros((8, 16, 3)), os.path.join(out, "grid.png"))
        summary = {"steps": 1, "wall_time_s": 0.1, "final_loss": cfg.scale / 10,
                   "artifacts": {"grid": grid}, "output_dir": out}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f)

    main()
""")


def test_real_hydra_multirun_with_a_failing_job(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    callback = {"summary": {"_target_": "text23d.sweep.SweepSummary"}}
    config = {"scale": 1, "hydra": {"callbacks": callback}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "app.py", "-m", "scale=1,2,3", "hydra.sweep.dir=multirun/s"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    # Hydra re-raises the failed job's error before on_multirun_end, so the summary must come
    # from the per-job refresh.
    assert proc.returncode != 0 and "diverged" in proc.stderr
    jobs = json.loads((tmp_path / "multirun" / "s" / "sweep_summary.json").read_text())
    statuses = [(j["folder"], j["status"]) for j in jobs]
    assert statuses == [("0", "ok"), ("1", "ok"), ("2", "failed")]
    assert jobs[1]["overrides"] == ["scale=2"] and jobs[1]["final_loss"] == 0.2
    assert (tmp_path / "multirun" / "s" / "sweep_grid.png").exists()
    assert "FAILED" in (tmp_path / "multirun" / "s" / "index.html").read_text()
