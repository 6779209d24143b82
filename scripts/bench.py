"""Speed and memory of one optimisation step, for fixed configurations. JSON out.

    python scripts/bench.py                      # every configuration this machine can run
    python scripts/bench.py --only sds-builtin-32 --steps 20 --out bench.json

Each configuration runs in its own process, so peak memory is that configuration's alone. The
`*-builtin-*` ones time the shipped built-in prior with the settings `prior=builtin` gives users
(32² renders, 4 views a step, dense grid, 48 samples per ray), after the albedo-only warm-up
(lambertian shading, so normals are computed, as in most of a run). On CUDA, `*-sd21-64` use
Stable Diffusion 2.1-base's exact UNet / VAE / text-encoder shapes with random weights, so real
SDS/VSD speed is measured without fetching weights: speed depends on shapes, not on what the
weights know.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_kernels, bench_texture, real_shapes

from bench_texture import TEXTURE_CONFIGS  # noqa: E402

# name: (prior, overrides, needs CUDA); prior "builtin" is the shipped model, "sd21" random weights.
OCCUPANCY = "renderer.occupancy={resolution:32,threshold:0.01,decay:0.95,update_every:16,warmup_steps:256}"
CONFIGS = {
    "sds-builtin-32": ("builtin", [], False),
    "vsd-builtin-32": ("builtin", ["system=vsd"], False),
    "sds-builtin-64": ("builtin", ["system.width=64", "system.height=64"], False),
    "vsd-builtin-64": ("builtin", ["system=vsd", "system.width=64", "system.height=64"], False),
    "sds-builtin-nerf-32": ("builtin", ["geometry=nerf"], False),
    # Magic3D's parts on CPU: the hash grid with and without empty-space skipping, the rasteriser at
    # 64² and 128² (SDS on a 32³-cube DMTet), and Magic3D's fine-stage step (after one coarse step).
    "sds-builtin-hashgrid-32": ("builtin", ["geometry=hashgrid"], False),
    "sds-builtin-hashgrid-occ-32": ("builtin", ["geometry=hashgrid", OCCUPANCY], False),
    "raster-builtin-64": ("builtin", ["geometry=dmtet", "renderer=rasterize", "geometry.resolution=32",
                                      "system.width=64", "system.height=64"], False),
    "raster-builtin-128": ("builtin", ["geometry=dmtet", "renderer=rasterize", "geometry.resolution=32",
                                       "system.width=128", "system.height=128"], False),
    "magic3d-fine-builtin": ("builtin", ["system=magic3d", "system.stage.coarse.steps=1",
                                         "system.stage.fine.steps=100"], False),
    # ProlificDreamer's stage 2 (DMTet, SDS) and stage 3 (frozen mesh, VSD), each after one step of the
    # stages before it (inside the warm-up).
    "pd-geometry-builtin": ("builtin", ["system=vsd", "system.stage.nerf.steps=1", "system.stage.geometry.steps=100",
                                        "system.stage.texture.steps=1"], False),
    "pd-texture-builtin": ("builtin", ["system=vsd", "system.stage.nerf.steps=1", "system.stage.geometry.steps=1",
                                       "system.stage.texture.steps=100"], False),
    "magic3d-coarse-sd21-64": ("sd21", ["prior.dtype=float16", "system=magic3d", "system.stages=[coarse]"], True),
    "magic3d-fine-sd21-512": ("sd21", ["prior.dtype=float16", "system=magic3d", "system.stage.coarse.steps=1",
                                       "system.stage.fine.steps=100"], True),
    "sds-sd21-64": ("sd21", ["geometry=grid", "prior.dtype=float16"], True),
    "vsd-sd21-64": ("sd21", ["geometry=grid", "prior.dtype=float16", "system=vsd",
                             "guidance.lora_pretrained_model_name_or_path=null"], True),  # not the hub's SD 2.1
}
# Textured export by stage (scripts/bench_texture.py: its TEXTURE_CONFIGS name the meshes).
CONFIGS.update({name: ("texture", [], False) for name in TEXTURE_CONFIGS})
# The kernels under a step (scripts/bench_kernels.py): on the CPU in float32; on CUDA also in half
# precision, with torch.compile off and on.
CONFIGS["hash-encoding"] = ("kernel", ["hash", "float32", False], False)
CONFIGS["unet-builtin"] = ("kernel", ["unet", "float32", False], False)
for _dtype in ("float16", "bfloat16"):
    for _compiled in (False, True):
        _tail = f"-{_dtype}" + ("-compiled" if _compiled else "")
        CONFIGS["hash-encoding-cuda" + _tail] = ("kernel", ["hash", _dtype, _compiled], True)
        CONFIGS["unet-builtin-cuda" + _tail] = ("kernel", ["unet", _dtype, _compiled], True)


def build_sd21(folder: Path) -> Path:
    """Stable Diffusion 2.1-base's architecture with random weights: one builder, real_shapes.py's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_shapes import build_sd21 as build

    return build(folder)


def bench_texture(name: str) -> dict:
    """Unwrap and bake by stage, and the baked texture's colour error (scripts/bench_texture.py)."""
    from bench_texture import bench_texture as run

    return run(name)


def bench_kernel(name: str) -> dict:
    import torch

    from bench_kernels import bench_hash_encoding, bench_unet

    which, dtype, compiled = CONFIGS[name][1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = bench_hash_encoding if which == "hash" else bench_unet
    return {"config": name, "device": device, **run(device, getattr(torch, dtype), compiled)}


def reference_s(device: str) -> float:
    """The same process's speed a moment before a row: one float32 matrix product (1024² on the
    CPU, 8192² on CUDA). Rows report their time in units of it as well, which moves far less than
    seconds when the machine is shared."""
    import torch

    from bench_kernels import matmul_seconds

    return matmul_seconds(device, torch.float32)[0]


def bench_one(name: str, steps: int, warmup: int) -> dict:
    import lightning as L
    import torch

    if CONFIGS[name][0] == "texture":
        return bench_texture(name)
    if CONFIGS[name][0] == "kernel":
        return bench_kernel(name)

    from text23d.config import compose
    from text23d.run import build_system

    kind, extra, _ = CONFIGS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        prior = ["prior=builtin"] if kind == "builtin" else [
            f"prior.pretrained_model_name_or_path={build_sd21(Path(tmp) / 'model')}"]
        cfg = compose(["prompt=a red cube", *prior, f"output_dir={tmp}/run",
                       "system.shading.ambient_only_steps=0", *extra])
        times: list[float] = []

        class Timer(L.Callback):
            def on_train_batch_start(self, *a):
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def on_train_batch_end(self, *a):
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t)

        L.seed_everything(0, verbose=False)
        reference = reference_s(device)
        system = build_system(cfg)
        trainer = L.Trainer(max_steps=warmup + steps, accelerator=device, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, callbacks=[Timer()],
                            enable_model_summary=False, max_epochs=-1)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(system)
    timed = sorted(times[warmup:])
    median = timed[len(timed) // 2]
    result = {"config": name, "device": device, "render": f"{cfg.system.width}x{cfg.system.height}",
              "views_per_step": cfg.system.batch_size, "geometry": cfg.geometry._target_.rsplit(".", 1)[1],
              "prior": kind, "steps_timed": len(timed), "median_step_s": round(median, 4),
              "it_per_s": round(1 / median, 2), "reference_s": round(reference, 5),
              "step_in_references": round(median / reference, 1),
              "peak_cpu_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("BENCH " + json.dumps(bench_one(args.one, args.steps, args.warmup)))
        return
    import torch

    names = args.only or [n for n, c in CONFIGS.items() if torch.cuda.is_available() or not c[2]]
    results = []
    for name in names:
        p = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                            "--warmup", str(args.warmup)], capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.startswith("BENCH ")]
        results.append(json.loads(lines[-1][6:]) if lines and p.returncode == 0
                       else {"config": name, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]})
        print(json.dumps(results[-1]), file=sys.stderr)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
