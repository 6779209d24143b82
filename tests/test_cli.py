"""The `text23d` command as a user runs it: real processes, real Hydra, real launchers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEXT23D = str(Path(sys.executable).parent / "text23d")


def cli(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([TEXT23D, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def hydra_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def smoke(model, root):
    return ["debug=smoke", f"prior.pretrained_model_name_or_path={model}", f"output_root={root}",
            "trainer.enable_progress_bar=false"]


def test_help_lists_groups_and_examples(tmp_path):
    code, out = cli("--help", cwd=tmp_path)
    assert code == 0
    for word in ("system: dreamfusion, prolificdreamer, sds, vsd", "geometry: grid, nerf", "prior:", "resume=", "export="):
        assert word in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    code, out = cli("prompt=a red cube", "system=sds", "debug=smoke", "trainer.max_steps=9", "--cfg", "job",
                    cwd=tmp_path)
    assert code == 0 and "max_steps: 9" in out and "DreamFusion" in out


def test_shell_completion_completes_groups(tmp_path):
    env = {**os.environ, "COMP_LINE": "text23d syst", "COMP_POINT": "12"}
    p = subprocess.run([TEXT23D, "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "system=" in p.stdout


@pytest.mark.parametrize("args,expect", [
    (["debug=smoke"], 'prompt is empty'),
    (["prompt=x", "system=nope"], "Available options in 'system'"),
    (["prompt=x", "trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["prompt=x", "trainer.max_stepz=5"], "max_stepz"),
    (["prompt=x", "resume=/nonexistent/run"], "does not exist"),
    (["export=/nonexistent/run"], "does not exist"),
])
def test_bad_input_gives_a_clear_error_not_a_traceback(tmp_path, args, expect):
    code, out = cli(*args, f"output_root={tmp_path}", cwd=tmp_path)
    assert code != 0
    assert expect in out
    assert "Traceback" not in out


def test_unreadable_model_folder_and_corrupt_checkpoint(tmp_path):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "model_index.json").write_text("{ not json")
    code, out = cli("prompt=x", *smoke(bad_model, tmp_path), cwd=tmp_path)
    assert code != 0 and str(bad_model) in out and "Traceback" not in out
    ckpt = tmp_path / "run" / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(os.urandom(100))
    code, out = cli(f"resume={ckpt}", cwd=tmp_path)
    assert code != 0 and "cannot read checkpoint" in out and "Traceback" not in out


def test_hostile_prompt_runs_into_a_safe_folder_inside_outputs(tiny_latent_model, tmp_path):
    prompt = ("a 🍔 hamburger/../../etc " * 100)[:2000]
    root = tmp_path / "outputs"
    code, out = cli(f"prompt={hydra_quote(prompt)}", *smoke(tiny_latent_model, root), "trainer.max_steps=1",
                    "export.video_views=2", cwd=tmp_path)
    assert code == 0, out
    [run_dir] = list((root / "dreamfusion").iterdir())
    assert run_dir.resolve().parent == (root / "dreamfusion").resolve()
    assert len(run_dir.name) < 80 and run_dir.name.isascii()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prompt"] == prompt
    assert not (tmp_path / "etc").exists()


def _sweep(tiny_latent_model, tmp_path, *launcher):
    code, out = cli("-m", "prompt=a red cube", *smoke(tiny_latent_model, tmp_path), "trainer.max_steps=2",
                    "export.video_views=2", "guidance.guidance_scale=7.5,100", *launcher, cwd=tmp_path, timeout=600)
    assert code == 0, out
    [sweep] = list((tmp_path / "multirun").iterdir())
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    return sweep, summary


def test_multirun_runs_one_job_per_value_and_summarises(tiny_latent_model, tmp_path):
    sweep, summary = _sweep(tiny_latent_model, tmp_path)
    jobs = summary  # sweep_summary.json is a list of jobs
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
    swept = {o for j in jobs for o in j["overrides"] if o.startswith("guidance.guidance_scale=")}
    assert swept == {"guidance.guidance_scale=7.5", "guidance.guidance_scale=100"}
    assert len({j["folder"] for j in jobs}) == 2
    table = (sweep / "sweep_summary.md").read_text()
    assert "guidance.guidance_scale" in table and "7.5" in table and "100" in table
    assert (sweep / "sweep_grid.png").stat().st_size > 0


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]])
def test_parallel_and_cluster_launchers(tiny_latent_model, tmp_path, launcher):
    sweep, summary = _sweep(tiny_latent_model, tmp_path, *launcher)
    jobs = summary
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
