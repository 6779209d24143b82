"""Stable Diffusion 2.1-base at its real size, random weights, through the ordinary CLI. JSON out.

    python scripts/real_shapes.py                       # all three systems, 3 steps each (~20 min on 2 CPU cores)
    python scripts/real_shapes.py --only sds --steps 1
    python scripts/real_shapes.py --tiny --device cpu   # the same path on a tiny model (seconds; a test runs it)

It writes a diffusers folder with SD 2.1-base's real architecture (the 866 M U-Net, the 84 M VAE and
the 340 M OpenCLIP-H text encoder, their configs key by key, random weights, fp16 on disk) and a
v-prediction twin at 768 px (SD 2.1's LoRA base in ProlificDreamer), then runs, each in its own
`text23d` process, through `from_pretrained` like any user's model:
  sds      3 DreamFusion steps (64² renders, VAE-encoded at 512²),
  vsd      3 ProlificDreamer stage-1 steps (the LoRA and camera embedding on the v-prediction U-Net),
  fine     3 Magic3D fine steps (DMTet rasterised at 512²) after one coarse step.
Per step it reports time and peak memory (text23d's perf/ metrics), the memory estimate the run
printed next to the measured peak, and the U-Net and VAE FLOPs of one step, counted with
torch.utils.flop_counter on the same model. Speed and memory depend on shapes, not on what the
weights know, so this measures the real path without fetching weights.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = "a pineapple red blue green cube sphere hamburger front side back overhead view".split()
PROMPT = "a pineapple"

# SD 2.1-base's component configs, as its model folder has them (unet/, vae/, text_encoder/ config.json).
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True, upcast_attention=False)
SD21_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
SD21_TEXT = dict(
    hidden_act="gelu", hidden_size=1024, intermediate_size=4096, max_position_embeddings=77, num_attention_heads=16,
    num_hidden_layers=23, projection_dim=512, vocab_size=49408, layer_norm_eps=1e-05, attention_dropout=0.0)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_sd21(folder: Path, *, v_prediction: bool = False, dtype: str = "float16") -> Path:
    """SD 2.1-base's architecture with random weights (v_prediction: SD 2.1's 768-px twin: the same
    networks, 96² latents, upcast attention, a v-prediction schedule). Reused when already written."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from text23d.testing import save_model_folder

    half = getattr(torch, dtype)
    unet_cfg = dict(SD21_UNET, **({"sample_size": 96, "upcast_attention": True} if v_prediction else {}))
    # from_config, as from_pretrained does: SD's scheduler_config.json has keys PNDM ignores (clip_sample).
    sched = PNDMScheduler.from_config(dict(SD21_SCHEDULER, skip_prk_steps=True,
                                           prediction_type="v_prediction" if v_prediction else "epsilon"))

    def text_encoder(tok):
        return CLIPTextModel(CLIPTextConfig(**SD21_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id)).to(half)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_cfg).to(half)
        vae = AutoencoderKL(**SD21_VAE).to(half)
    tmp = folder.with_name(folder.name + ".partial")  # a killed build never looks complete
    save_model_folder(tmp, WORDS, text_encoder, unet, sched, vae=vae, model_max_length=77)
    index = json.loads((tmp / "model_index.json").read_text())  # SD ships PNDM; we train on its schedule
    index.update(scheduler=["diffusers", "PNDMScheduler"], requires_safety_checker=False)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(folder)
    return folder


def build_tiny(folder: Path, *, v_prediction: bool = False, dtype: str = "float32") -> Path:
    from text23d.testing import build_tiny_model

    if not (folder / "model_index.json").is_file():
        build_tiny_model(folder, "latent", prediction_type="v_prediction" if v_prediction else "epsilon")
    return folder


# name: overrides after the prior's folder; the LoRA base is the v-prediction twin.
RUNS = {
    "sds": ["system=dreamfusion"],
    "vsd": ["system=vsd", "system.stages=[nerf]", "guidance.lora_pretrained_model_name_or_path={lora}"],
    "fine": ["system=magic3d", "system.stage.coarse.steps=1", "system.stage.fine.steps={steps}", "trainer.max_steps=null"],
}
QUIET = ["trainer.log_every_n_steps=1", "validation.every_n_steps=0", "checkpoint.every_n_train_steps=0", "export.video=false",
         "export.video_resolution=32", "export.resolution=32", "export.texture=false", "export.format=[obj]",
         "trainer.enable_progress_bar=false"]
# --tiny: debug=smoke's sizes; Magic3D's hash grid and tet grid small too.
TINY = {"sds": ["debug=smoke"], "vsd": ["debug=smoke"],
        "fine": ["debug=smoke", "geometry.n_levels=4", "geometry.log2_table=12", "system.stage.fine.geometry.resolution=12"]}


def run_one(name: str, model: Path, lora: Path, steps: int, device: str, dtype: str, out: Path, tiny: bool,
            extra: list[str] = (), replace: bool = False) -> dict:
    """One system through the real CLI; its perf/ metrics and the estimate it printed. `extra`
    overrides come last (replace: instead of RUNS[name]'s)."""
    overrides = [] if replace else [o.format(lora=lora, steps=steps) for o in RUNS[name]]
    if replace or name != "fine":
        overrides.append(f"trainer.max_steps={steps}")
    if tiny:
        overrides = TINY.get(name, ["debug=smoke"]) + overrides
    overrides += list(extra)
    run_dir = out / name
    cmd = [*text23d_command(), f"prompt={PROMPT}", f"prior.pretrained_model_name_or_path={model}",
           f"prior.dtype={dtype}", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
           f"output_dir={run_dir}", *QUIET, *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    text = p.stdout + p.stderr
    result = {"run": name, "rc": p.returncode, "wall_s": round(wall, 1), "command": "text23d " + " ".join(cmd[len(text23d_command()):])}
    if p.returncode:
        result["error"] = text.strip().splitlines()[-5:]
        return result
    result["steps"] = read_perf(run_dir)
    result["estimate"] = read_estimates(text)
    result["peak_mem_gb"] = max(s["peak_mem_gb"] for s in result["steps"])
    for k, e in enumerate(result["estimate"]):  # each stage's estimate against its own steps' peak
        peaks = [s["peak_mem_gb"] for s in result["steps"] if s["stage"] in (k, None)]
        e["measured_gb"] = max(peaks) if peaks else None
        e["error"] = round(e["total_gb"] / e["measured_gb"] - 1, 3) if peaks else None
    errors = [e["error"] for e in result["estimate"] if e["error"] is not None]
    if errors:
        result["estimate_gb"] = max(e["total_gb"] for e in result["estimate"])
        result["estimate_error"] = max(errors, key=abs)  # the worst stage
    return result


def text23d_command() -> list[str]:
    """The installed `text23d` console script beside this interpreter (what a user runs)."""
    script = Path(sys.executable).with_name("text23d")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from text23d.cli import main; sys.argv[0] = 'text23d'; main()"]


def read_perf(run_dir: Path) -> list[dict]:
    """Per-step time and peak memory, as the run logged them (perf/step_s, perf/peak_mem_gb)."""
    rows = []
    for path in sorted((run_dir / "logs" / "csv").rglob("metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("perf/step_s"):
                    rows.append({"step": int(row["step"]) + 1, "stage": int(float(row["train/stage"])) if row.get("train/stage") else None,
                                 "time_s": round(float(row["perf/step_s"]), 3),
                                 "peak_mem_gb": round(float(row["perf/peak_mem_gb"]), 3)})
    return rows


ESTIMATE = re.compile(r"memory estimate: stage (\S+): about ([\d.]+) GiB at peak \(in use now ([\d.]+); a step adds "
                      r"renders ([\d.]+), prior activations ([\d.]+), gradients and optimizer state ([\d.]+)\)")


def read_estimates(text: str) -> list[dict]:
    keys = ("total_gb", "in_use_gb", "renders_gb", "prior_activations_gb", "optimizer_gb")
    return [{"stage": m.group(1), **dict(zip(keys, map(float, m.groups()[1:])))} for m in ESTIMATE.finditer(text)]


def count_flops(model: Path, lora: Path, device: str, dtype: str) -> dict:
    """U-Net and VAE FLOPs of one training step of each run, counted on the real modules.

    SDS: one U-Net pass on the cond + uncond batch (no grad) and the VAE encoder's forward and
    backward at 512². VSD adds the LoRA U-Net's pass on the same batch (no grad) and its training
    step (forward + backward on the conditional half). Magic3D fine is SDS at 512² renders."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from text23d.prior.loading import load_prior

    prior = load_prior(str(model), dtype=dtype, device=device)
    base = load_prior(str(lora), dtype=dtype, device=device)
    size = prior.resolution // (2 ** (len(prior.vae.config.block_out_channels) - 1))  # the latent side
    width = prior.unet.config.get("encoder_hid_dim") or prior.unet.config.cross_attention_dim
    emb = torch.zeros(2, 77, width, device=device)
    x = torch.zeros(2, 4, size, size, device=device)
    t = torch.full((2,), 500, device=device)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad():
        unet_cfg = flops(lambda: prior.predict_noise(x, t, emb))
        lora_cfg = flops(lambda: base.predict_noise(x, t, emb))
    rgb = torch.rand(1, 3, prior.resolution, prior.resolution, device=device, requires_grad=True)
    vae = flops(lambda: prior.images_to_model_space(rgb).sum().backward())
    # The LoRA's training pass: forward, and backward through every layer's activations (its own
    # weights are a few MB; the frozen ones get no gradient), as a gradient w.r.t. the input costs.
    xg = x[:1].clone().requires_grad_(True)
    lora_train = flops(lambda: base.predict_noise(xg, t[:1], emb[:1]).sum().backward())
    g = 1e9
    return {"unet_cfg_pass_gflop": float(f"{unet_cfg / g:.4g}"), "vae_encode_fwd_bwd_gflop": float(f"{vae / g:.4g}"),
            "lora_unet_train_gflop": float(f"{lora_train / g:.4g}"),
            "per_step_gflop": {"sds": float(f"{(unet_cfg + vae) / g:.4g}"),
                               "vsd": float(f"{(unet_cfg + vae + lora_cfg / 2 + lora_train) / g:.4g}"),
                               "fine": float(f"{(unet_cfg + vae) / g:.4g}")},
            "note": "vsd's LoRA term uses the conditional half only (lora_guidance_scale 1.0)"}


def matmul_peak(device: str) -> dict:
    """The device's achievable dense TFLOP/s: a large bf16 (CUDA) or fp32 (CPU) matrix product."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    return {"dtype": str(dtype).removeprefix("torch."), "n": n,
            "tflops": float(f"{10 * 2 * n**3 / (time.perf_counter() - t) / 1e12:.4g}")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--dtype", default=None, help="prior.dtype for the runs (default: auto)")
    ap.add_argument("--tiny", action="store_true", help="a tiny SD-shaped model instead of the real size")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--models", default=str(ROOT / "outputs" / "real_shapes" / "models"),
                    help="where the random-weight folders are written (reused across runs)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or "auto"
    models = Path(args.models) / ("tiny" if args.tiny else "sd21base")
    build = build_tiny if args.tiny else build_sd21
    t = time.perf_counter()
    model, lora = build(models / "prior"), build(models / "lora-v", v_prediction=True)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": device,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
              "model": "tiny" if args.tiny else "sd21base (real architecture, random weights)",
              "build_s": round(time.perf_counter() - t, 1), "dtype": dtype, "runs": []}
    out = Path(args.models).parent / time.strftime("runs-%Y%m%d-%H%M%S")
    for name in args.only or list(RUNS):
        report["runs"].append(run_one(name, model, lora, args.steps, device, dtype, out, args.tiny))
        print(json.dumps(report["runs"][-1]), file=sys.stderr)
    if not args.no_flops:
        report["flops"] = count_flops(model, lora, device, "float32" if device == "cpu" else "float16")
        report["device_peak"] = matmul_peak(device)
        for r in report["runs"]:
            timed = [s["time_s"] for s in r.get("steps", []) if s["stage"] == max(x["stage"] for x in r["steps"])]
            if timed:  # the last stage's steps (Magic3D: the fine ones)
                median = sorted(timed)[len(timed) // 2]
                r["achieved_tflops"] = float(f"{report['flops']['per_step_gflop'][r['run']] / 1e3 / median:.4g}")
                r["fraction_of_peak"] = float(f"{r['achieved_tflops'] / report['device_peak']['tflops']:.4g}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if any(r["rc"] for r in report["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
