"""One command for a GPU: the real path's speed, memory and parity, as one JSON (`make gpu-check`).

    python scripts/gpu_check.py --out gpu_check.json          # on a CUDA machine: about 6 minutes
    python scripts/gpu_check.py --device cpu --tiny           # the same path on tiny models (a test runs it)

What it measures, each section in the JSON:
  real_shapes   SD 2.1-base's real architecture (random weights, scripts/real_shapes.py): DreamFusion
                SDS, ProlificDreamer VSD and Magic3D-fine steps through the CLI, with the prior in
                float16 (trainer 16-mixed) and bfloat16 (bf16-mixed): time per step, peak memory, the
                printed estimate, and achieved TFLOP/s (U-Net + VAE FLOPs counted per step, over the
                median step time) against the device's peak (a large bf16 matrix product timed here);
  hashgrid      the torch hash encoding against tinycudann's, when it imports: forward + backward
                time on 2^18 points, and the largest difference of outputs and gradients;
  rasterizer    the torch rasteriser against nvdiffrast's, when it imports: a 512² frame of a sphere,
                time and the largest difference of colour and silhouette;
  deepfloyd_if  the IF-shaped model (IF-I's real config keys, scaled down) through SDS and VSD runs.
Each section says "not installed" or records its error rather than stopping the others.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import real_shapes  # noqa: E402  (scripts/ is not a package)

PRECISION = {"float16": "16-mixed", "bfloat16": "bf16-mixed", "float32": "32-true"}


def section(fn, *args):
    """Run one section; its failure is recorded, not raised."""
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as err:  # one broken accelerator must not hide the others' numbers
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc().splitlines()[-6:]}
    out["section_s"] = round(time.perf_counter() - t, 1)
    return out


def real_shapes_section(device: str, tiny: bool, steps: int, dtypes: list[str], models: Path, out: Path) -> dict:
    build = real_shapes.build_tiny if tiny else real_shapes.build_sd21
    sub = models / ("tiny" if tiny else "sd21base")
    model, lora = build(sub / "prior"), build(sub / "lora-v", v_prediction=True)
    flops = real_shapes.count_flops(model, lora, device, "float32" if device == "cpu" else "float16")
    peak = real_shapes.matmul_peak(device)
    runs = []
    for dtype in dtypes:
        for name in real_shapes.RUNS:
            r = real_shapes.run_one(name, model, lora, steps, device, dtype, out / dtype, tiny,
                                    extra=[f"trainer.precision={PRECISION[dtype]}"])
            timed = [s["time_s"] for s in r.get("steps", [])[1:]] or [s["time_s"] for s in r.get("steps", [])]
            if timed:
                median = statistics.median(timed)
                r["median_step_s"] = median
                r["achieved_tflops"] = float(f"{flops['per_step_gflop'][name] / 1e3 / median:.4g}")
                r["fraction_of_peak"] = float(f"{r['achieved_tflops'] / peak['tflops']:.4g}")
            r["dtype"] = dtype
            runs.append(r)
    return {"flops": flops, "device_peak": peak, "runs": runs}


def hashgrid_section(device: str) -> dict:
    import torch

    from text23d import accel
    from text23d.geometry.hashgrid import HashEncoding, TcnnHashEncoding

    def timed(enc, u):
        for _ in range(2):
            enc(u).float().sum().backward()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(5):
            enc(u).float().sum().backward()
        sync()
        return round((time.perf_counter() - t) / 5, 5)

    torch.manual_seed(0)
    # threestudio's layout on CUDA; a small table on CPU (the dry run checks the path, not the speed).
    layout = dict(n_levels=16, n_features=2, log2_table=19 if device == "cuda" else 12, base_resolution=16,
                  per_level_scale=1.447269)
    points = 2**18 if device == "cuda" else 2**10
    u = torch.rand(points, 3, device=device)
    ours = HashEncoding(**layout).to(device)
    with torch.no_grad():
        ours.params.uniform_(-1, 1)  # unit scale: at tcnn's init every output is below 1e-4
    result = {"points": points, "log2_table": layout["log2_table"], "torch_fwd_bwd_s": timed(ours, u)}
    tcnn = accel.load("tinycudann")
    if tcnn is None:
        return {**result, "tinycudann": "not installed"}
    theirs = TcnnHashEncoding(tcnn, **layout).to(device)
    theirs.load_state_dict(ours.state_dict())
    result["tinycudann_fwd_bwd_s"] = timed(theirs, u)
    ours.zero_grad(), theirs.zero_grad()
    a, b = ours(u).float(), theirs(u).float()
    a.sum().backward(), b.sum().backward()
    result["max_abs_diff"] = float((a - b).abs().max())
    result["max_abs_grad_diff"] = float((ours.params.grad - theirs.params.grad.float()).abs().max())
    return result


def rasterizer_section(device: str) -> dict:
    import torch

    from text23d import accel
    from text23d.cameras.sampler import RandomCameraSampler
    from text23d.geometry.dmtet import DMTet
    from text23d.renderers.background import Background
    from text23d.renderers.mesh import MeshRenderer

    size = 512 if device == "cuda" else 64
    from text23d.geometry.grid import DenseGrid

    geometry = DMTet(resolution=32 if device == "cuda" else 16, color=DenseGrid(resolution=32)).to(device)
    background = Background(mode="solid").to(device)
    cams = RandomCameraSampler().orbit(2).to(device)

    def frame(implementation):
        renderer = MeshRenderer(implementation=implementation).to(device)
        out = renderer(geometry, background, cams, size, size, shading="albedo")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(3):
            renderer(geometry, background, cams, size, size, shading="albedo")["comp_rgb"].sum().backward()
        sync()
        return out, round((time.perf_counter() - t) / 3, 4)

    ours, seconds = frame("torch")
    result = {"size": size, "views": len(cams), "torch_fwd_bwd_s": seconds}
    if accel.load("nvdiffrast") is None:
        return {**result, "nvdiffrast": "not installed"}
    theirs, result["nvdiffrast_fwd_bwd_s"] = frame("nvdiffrast")
    result["max_abs_rgb_diff"] = float((ours["comp_rgb"] - theirs["comp_rgb"]).abs().max())
    result["mean_abs_opacity_diff"] = float((ours["opacity"] - theirs["opacity"]).abs().mean())
    return result


def deepfloyd_section(device: str, out: Path) -> dict:
    from text23d.testing import build_tiny_if_model

    folder = build_tiny_if_model(out / "if-model")
    runs = {}
    for name, extra in (("sds", ["system=dreamfusion"]),  # vsd: a LoRA on this folder, not sd21base's hub SD 2.1
                        ("vsd", ["system=vsd", "system.stages=[nerf]", "guidance.lora_pretrained_model_name_or_path=null"])):
        r = real_shapes.run_one(name, folder, folder, 2, device, "float32", out / "if", True,
                                extra=extra + ["prior.resolution=null"], replace=True)
        runs[name] = {k: r[k] for k in ("rc", "wall_s", "peak_mem_gb", "error") if k in r}
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU dry run)")
    ap.add_argument("--steps", type=int, default=4, help="steps per real-shape run (the first is not timed)")
    ap.add_argument("--models", default=None, help="where random-weight folders go (default: a temp folder)")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no GPU. Fix: run it on a CUDA machine, or --device cpu --tiny")
    # On CPU one dtype: the dry run checks the path, not the speed (bf16-mixed runs in tests/test_mixed_precision.py).
    dtypes = ["float16", "bfloat16"] if args.device == "cuda" else ["float32"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                              "torch": torch.__version__, "device": args.device,
                              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
                  "tiny": args.tiny}
        report["real_shapes"] = section(real_shapes_section, args.device, args.tiny, args.steps, dtypes, models,
                                        Path(tmp) / "runs")
        report["hashgrid"] = section(hashgrid_section, args.device)
        report["rasterizer"] = section(rasterizer_section, args.device)
        report["deepfloyd_if"] = section(deepfloyd_section, args.device, Path(tmp))
    report["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
