"""scripts/real_shapes.py and scripts/gpu_check.py: the real path at Stable Diffusion 2.1-base's size
(slow), and the GPU check's CPU dry run on tiny models (every section, through the real CLI)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--steps", "2", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"real_shapes", "hashgrid", "rasterizer", "deepfloyd_if"} <= set(report)
    assert not [k for k, v in report.items() if isinstance(v, dict) and "error" in v], report
    real = report["real_shapes"]
    assert {r["run"] for r in real["runs"]} == {"sds", "vsd", "fine"}
    for r in real["runs"]:
        assert r["rc"] == 0, r
        assert r["steps"] and all(s["time_s"] > 0 and s["peak_mem_gb"] > 0 for s in r["steps"])
        assert r["estimate"] and r["estimate_gb"] > 0 and r["achieved_tflops"] > 0
    assert len([s for s in next(r for r in real["runs"] if r["run"] == "fine")["steps"] if s["stage"] == 1]) == 2
    flops = real["flops"]["per_step_gflop"]
    assert flops["vsd"] > flops["sds"] > 0  # VSD adds the LoRA's passes
    assert report["hashgrid"]["tinycudann"] == "not installed" and report["hashgrid"]["torch_fwd_bwd_s"] > 0
    assert report["rasterizer"]["nvdiffrast"] == "not installed"
    assert all(r["rc"] == 0 for r in report["deepfloyd_if"].values() if isinstance(r, dict))


@pytest.mark.slow
def test_sd21base_real_size_runs_and_the_estimate_is_within_a_quarter(tmp_path):
    """About 15 minutes on 2 cores: SD 2.1-base's real U-Net, VAE and text encoder (random weights)."""
    out = tmp_path / "real.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_shapes.py"), "--steps", "2", "--device", "cpu",
                        "--models", str(tmp_path / "models"), "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    for r in report["runs"]:
        assert r["rc"] == 0 and abs(r["estimate_error"]) <= 0.25, r
    flops, unet_params = report["flops"], 865_910_724  # SD 2.1-base's U-Net (its config, counted by diffusers)
    # Every weight is used at least once and at most once per latent pixel (64²), per sample, cond + uncond.
    assert 2 * 2 * unet_params < flops["unet_cfg_pass_gflop"] * 1e9 < 2 * 2 * unet_params * 64 * 64
    one = flops["unet_cfg_pass_gflop"] / 2  # one sample's forward
    assert 1.5 * one < flops["lora_unet_train_gflop"] < 2.5 * one  # forward + backward through activations only
