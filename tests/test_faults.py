"""Runs that survive, through the real `text23d` command in real processes: signals, kill -9 at
any moment, a full disk (a real file-size limit, not a mock), non-finite steps and out-of-memory
(injected with faults.*, the same exception types the real faults raise)."""
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TEXT23D = str(Path(sys.executable).parent / "text23d")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# Two stages (a hash-grid NeRF, then a DMTet mesh), 8 steps, a checkpoint every step.
MAGIC3D = ["system=magic3d", "geometry.n_levels=4", "geometry.log2_table=12", "geometry.base_resolution=8",
           "system.stage.fine.geometry.resolution=12", "renderer.num_samples=16", "renderer.occupancy.resolution=8",
           "system.shading.ambient_only_steps=1", "export.texture_size=64", "export.video_views=4"]


def args(model, out, *extra, root=None):
    return ["prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={model}", f"output_dir={out}",
            f"output_root={root or Path(out).parent / 'outputs'}",
            "trainer.enable_progress_bar=false", "validation.every_n_steps=0", *extra]


def text23d(*argv, limit_bytes=None, timeout=300):
    def file_size_limit():  # a real limit on every file the run writes: EFBIG, as a full disk gives ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    p = subprocess.run([TEXT23D, *argv], env=ENV, capture_output=True, text=True, timeout=timeout,
                       preexec_fn=file_size_limit if limit_bytes is not None else None)
    return p.returncode, p.stdout + p.stderr


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([TEXT23D, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_training(proc, out: Path, timeout=120) -> None:
    """Until the run has trained (its first checkpoint exists)."""
    end = time.time() + timeout
    while not (out / "ckpts" / "last.ckpt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, "the run never wrote a checkpoint"
        time.sleep(0.2)


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                      pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow),
                                      pytest.param(signal.SIGUSR2, 140, marks=pytest.mark.slow)])
def test_a_signal_saves_at_the_step_boundary_prints_the_resume_command_and_exports_nothing(
        tiny_pixel_model, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(*args(tiny_pixel_model, out, "trainer.max_steps=100000", "checkpoint.every_n_train_steps=1"))
    wait_for_training(proc, out)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, log
    assert f"interrupted by {signal.Signals(sig).name} at step" in log and f"Resume with: text23d resume={out}" in log
    assert "Traceback" not in log
    saved = state(out / "ckpts" / "last.ckpt")
    assert saved["global_step"] >= 1 and not (out / "summary.json").exists()
    assert not list((out / "save").glob("*-export")) if (out / "save").exists() else True  # nothing exported
    if sig == signal.SIGTERM:  # and it goes on from there
        step = saved["global_step"]
        rc, log = text23d(f"resume={out}", f"trainer.max_steps={step + 2}")
        assert rc == 0, log
        assert state(out / "ckpts" / "last.ckpt")["global_step"] == step + 2


def _kill_and_resume(model, out: Path, argv: list[str], rng: random.Random, kills: int, span: float) -> list[float]:
    """Start the run, kill -9 it at random moments (resuming each time), then let it finish."""
    def command():  # killed before its first checkpoint: nothing to resume, start over (as the error says)
        if (out / "ckpts" / "last.ckpt").exists():
            return [f"resume={out}"]
        shutil.rmtree(out, ignore_errors=True)
        return argv

    moments = []
    for k in range(kills):
        proc = start(*command())
        moment = rng.uniform(0.3, 1.0) * span
        moments.append(round(moment, 2))
        time.sleep(moment)
        proc.kill()  # SIGKILL: no handler runs, a write may be half done
        proc.communicate()
    rc, log = text23d(*command())
    assert rc == 0, log
    return moments


@pytest.mark.parametrize("seed,kills", [(0, 2), pytest.param(1, 1, marks=pytest.mark.slow),
                                        pytest.param(2, 3, marks=pytest.mark.slow),
                                        pytest.param(3, 3, marks=pytest.mark.slow),
                                        pytest.param(4, 4, marks=pytest.mark.slow),
                                        pytest.param(5, 5, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tiny_pixel_model, tmp_path, seed, kills):
    common = [*MAGIC3D, "deterministic=true", "trainer.max_steps=8", "checkpoint.every_n_train_steps=1"]
    reference = tmp_path / "straight"
    t0 = time.time()
    rc, log = text23d(*args(tiny_pixel_model, reference, *common))
    span = time.time() - t0
    assert rc == 0, log
    out = tmp_path / "killed"
    moments = _kill_and_resume(tiny_pixel_model, out, args(tiny_pixel_model, out, *common), random.Random(seed),
                               kills, span)
    a, b = state(reference / "ckpts" / "last.ckpt"), state(out / "ckpts" / "last.ckpt")
    assert b["global_step"] == 8 and b["text23d"]["stage"] == "fine"
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"killed at {moments} s: {different}"
    assert not leftovers(out), f"killed at {moments} s"


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_is_needed(tiny_pixel_model, tmp_path):
    out = tmp_path / "run"
    small = ["geometry=grid", "geometry.resolution=16", "export.format=obj", "export.texture=false",
             "export.video_views=4", "export.video_resolution=16"]
    rc, log = text23d(*args(tiny_pixel_model, out, "trainer.max_steps=2", *small))
    assert rc == 0, log
    ckpt = out / "ckpts" / "last.ckpt"
    before, size = sha(ckpt), ckpt.stat().st_size
    # Resumed with room for logs but not for a checkpoint: every write of it fails (EFBIG).
    rc, log = text23d(f"resume={out}", "trainer.max_steps=4", limit_bytes=size // 2)
    assert rc == 5, log
    need = re.search(rf"cannot write {re.escape(str(ckpt))}: File too large \(it needs about ([\d.]+) KiB", log)
    assert need and abs(float(need.group(1)) * 1024 / size - 1) < 0.05, log  # this checkpoint's size
    assert "Traceback" not in log and "the previous file is intact" in log
    assert sha(ckpt) == before and not leftovers(out)
    # The same for an export (mesh, video): the earlier exports stay as they were.
    exported = {p: sha(p) for p in (out / "save").rglob("*") if p.is_file()}
    rc, log = text23d(f"export={out}", *small[2:], "export.resolution=32", limit_bytes=64)
    assert rc == 5 and "cannot write" in log and "Traceback" not in log, log
    assert {p: sha(p) for p in exported} == exported and not leftovers(out)


@pytest.mark.parametrize("folder", ["through_a_file", "no_room"])
def test_an_output_folder_that_cannot_be_written_fails_before_any_model_loads(tiny_pixel_model, tmp_path, folder):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run" if folder == "through_a_file" else tmp_path / "run"
    t0 = time.time()
    rc, log = text23d(*args(tiny_pixel_model, out, root=tmp_path / "outputs"),
                      limit_bytes=0 if folder == "no_room" else None)
    # (no room: the first folder it checks, output_root, already fails)
    name = f"output_dir={out}" if folder == "through_a_file" else f"output_root={tmp_path / 'outputs'}"
    reason = "Not a directory" if folder == "through_a_file" else "File too large"
    assert rc == 2 and f"{name} cannot be written ({reason})" in log and "Traceback" not in log, log
    assert "text23d: dreamfusion on" not in log  # the model was never loaded
    assert time.time() - t0 < 60


def test_a_nan_step_is_skipped_and_counted(tiny_pixel_model, tmp_path):
    out = tmp_path / "run"
    rc, log = text23d(*args(tiny_pixel_model, out, "trainer.max_steps=4", "faults.nan_at_steps=[1]", "export.format=obj"))
    assert rc == 0, log
    assert "step 1 of stage main: non-finite loss or gradient, step skipped (1 in a row, 1 in all)" in log
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["metrics"]["train/nonfinite_skipped"] == 1.0
    saved = state(out / "ckpts" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_too_many_nan_steps_stop_with_the_last_finite_state_saved(tiny_pixel_model, tmp_path):
    reference, out = tmp_path / "two_steps", tmp_path / "nan"
    common = ["deterministic=true", "checkpoint.every_n_train_steps=1"]
    rc, log = text23d(*args(tiny_pixel_model, reference, *common, "trainer.max_steps=2"))
    assert rc == 0, log
    rc, log = text23d(*args(tiny_pixel_model, out, *common, "trainer.max_steps=6", "faults.nan_at_steps=[2,2,2]",
                            "guard.max_nonfinite_steps=3"))
    assert rc == 3, log
    assert "3 steps in a row had a NaN/Inf loss or gradient" in log and "half precision" in log
    assert "Traceback" not in log and not (out / "summary.json").exists()
    a, b = state(reference / "ckpts" / "last.ckpt"), state(out / "ckpts" / "last.ckpt")
    assert b["global_step"] == 2  # the last finite state: what two clean steps left, to the bit
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_out_of_memory_saves_reports_and_resumes(tiny_pixel_model, tmp_path):
    out = tmp_path / "run"
    rc, log = text23d(*args(tiny_pixel_model, out, "trainer.max_steps=4", "faults.oom_at_step=2",
                            "checkpoint.every_n_train_steps=0"))
    assert rc == 4, log
    assert "out of memory in stage main (asked for 20.00 GiB" in log and "Lower, in this order: the render size" in log
    assert "Traceback" not in log
    assert state(out / "ckpts" / "last.ckpt")["global_step"] == 2
    rc, log = text23d(f"resume={out}", "faults.oom_at_step=null")
    assert rc == 0, log
    assert state(out / "ckpts" / "last.ckpt")["global_step"] == 4


def test_the_guidance_flags_a_non_finite_gradient(pixel_prior):
    from helpers import text_pair
    from text23d.guidance.base import Text
    from text23d.guidance.sds import SDSGuidance

    rgb = torch.full((1, 16, 16, 3), 0.5)
    cond, uncond = text_pair(pixel_prior, 1)
    assert not SDSGuidance()(pixel_prior, rgb, Text(cond, uncond)).nonfinite
    rgb[0, 3, 3, 0] = float("nan")
    assert SDSGuidance()(pixel_prior, rgb, Text(cond, uncond)).nonfinite  # the system then skips the step


@pytest.mark.slow
def test_a_timed_out_submitit_job_is_requeued_and_resumes_in_its_own_folder_at_the_same_step(tiny_pixel_model, tmp_path):
    # submitit_local: 60 s a try, SIGUSR2 30 s before the end; 600 steps need two or three tries (with
    # every sample evaluated: the occupancy grid, on by default, makes them fit in one try).
    rc, log = text23d("-m", "prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={tiny_pixel_model}",
                      "trainer.max_steps=600", "checkpoint.every_n_train_steps=0", "validation.every_n_steps=0",
                      "trainer.enable_progress_bar=false", "geometry=grid", "geometry.resolution=16", "renderer.occupancy=null",
                      "export.video_views=4", "export.texture=false", "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=1", f"output_root={tmp_path}", timeout=600)
    assert rc == 0, log
    [job] = [p for p in (tmp_path / "multirun").glob("*/0-*")]
    logs = "".join(p.read_text() for p in job.parent.glob(".submitit/*/*_log.*"))
    saved = [int(s) for s in re.findall(r"SIGUSR2 at step (\d+): checkpoint saved", logs)]
    assert saved and "was requeued: resuming" in logs, logs
    import json

    summary = json.loads((job / "summary.json").read_text())
    assert summary["steps"] == 600 and summary["resumed_from"] == str(job / "ckpts" / "last.ckpt")
    # Each try went on from the step the one before saved (its CSV log starts there).
    assert sorted(int(p.name.split("-")[1]) for p in (job / "logs" / "csv").glob("resumed-*")) == saved


def test_a_stage_that_cannot_fit_is_warned_about_or_refused_before_it_starts(tiny_pixel_model, tmp_path, caplog):
    import psutil
    from omegaconf import OmegaConf

    from helpers import compose_cfg
    from text23d import memory
    from text23d.errors import ConfigError
    from text23d.prior.loading import load_prior
    from text23d.run import build_system

    def system(batch):
        cfg = compose_cfg(["prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={tiny_pixel_model}",
                           f"output_dir={tmp_path}", "system.width=64", "system.height=64", f"system.batch_size={batch}"])
        s = build_system(cfg)
        s.prior = load_prior(**OmegaConf.to_container(cfg.prior, resolve=True))
        return s

    total = psutil.virtual_memory().total
    per_view = memory.probe_renders(system(1).stages[0], torch.device("cpu"), 64, 64)  # what one 64² view keeps
    with caplog.at_level("WARNING", logger="text23d"):
        memory.check(system(int(2 * total / per_view)), torch.device("cpu"))  # twice the machine: a warning
    assert "needs about" in caplog.text and "it may run out of memory" in caplog.text
    with pytest.raises(ConfigError, match=r"stage main: \d+ view\(s\) of 64x64 needs about .* GiB .* Fix: a render size"):
        memory.check(system(int(20 * total / per_view)), torch.device("cpu"))  # 20×: refused


# One training step's renders in a fresh process: the estimate first, then the peak resident memory
# that a forward + backward of those renders adds (VmHWM: the kernel's own high-water mark, reset just before).
MEASURE_RENDERS = """
import ctypes, gc, json, sys
import torch
from text23d import memory, perf
from text23d.config import compose
from text23d.run import build_system
side, batch, samples, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = compose(["prompt=a red cube", "prior=builtin", f"output_dir={out}", f"system.width={side}", f"system.height={side}",
               f"system.batch_size={batch}", f"renderer.num_samples={samples}", "renderer.occupancy=null"])
stage = build_system(cfg).stages[0]
particle = stage.particles[0]
estimate = memory.probe_renders(stage, torch.device("cpu"), side, side)
def step(s, n):
    out = stage.renderer(particle.geometry, particle.background, stage.camera_sampler.sample(n), s, s,
                         shading="lambertian", jitter=False)
    out["comp_rgb"].sum().backward()
step(16, 1)  # everything loaded and allocated once, at a size too small to count
# Freed heap pages that stay resident are reused without raising the resident set (CI measured
# 0.33 GB where this machine measured 0.7 GB): hand them back, then restart the high-water mark here.
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
perf.reset_peak(torch.device("cpu"))
before = perf.peak_bytes(torch.device("cpu"))
torch.manual_seed(1)  # fixed views: how many rays meet the bounding sphere depends on where they look
step(side, batch)
print(json.dumps({"estimate": estimate, "measured": perf.peak_bytes(torch.device("cpu")) - before}))
"""


def test_the_render_estimate_matches_the_measured_peak_of_a_step(tmp_path):
    """The printed estimate's render term against what a step's renders really take: 80², 3 views,
    96 samples a ray (a size the backward factor was not measured at), about 0.7 GB."""
    import json
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", MEASURE_RENDERS, "80", "3", "96", str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # At most a fifth below (an estimate under the peak lets a run die of out-of-memory); more room
    # above: the resident-set peak of the same step varies by ±10 % from run to run. The estimate
    # read 1.05x the peak here; without the backward's gradients (x1.6) it reads 0.66-0.68x.
    assert r["measured"] > 100 * 2**20 and 0.8 < r["estimate"] / r["measured"] < 1.35, r
