"""A row of turntable views of a finished run, lit as the built-in prior's data are: the README's figures.

    python scripts/figure.py outputs/dreamfusion/a_red_cube@... docs/demo_red_cube.png
    python scripts/figure.py RUN OUT.png --views 8 --resolution 96 --mesh   # + the exported GLB below

The renders come from the run's last checkpoint (no diffusion model is loaded); with --mesh, a
second row shows the exported mesh file rasterised with its vertex colours, so a figure never
shows only what the renders promise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder or checkpoint")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--mesh", action="store_true", help="add a row with the exported GLB")
    args = ap.parse_args()

    from text23d.builtin.evaluate import load_exported_mesh, mesh_views
    from text23d.export.video import save_image
    from text23d.run import load_system

    system, step, _ = load_system(args.run)
    cams = system.camera_sampler.orbit(args.views)
    with torch.no_grad():
        rows = [np.concatenate([v["rgb"] for v in system.render_views(cams, args.resolution, shading="lambertian")], 1)]
    if args.mesh:
        pattern = f"{system.stage_tag()}it{step:06d}-export/*.glb"  # the run's own, else its latest re-export
        exports = sorted(Path(system.out_dir, "exports").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0)
        glbs = sorted(Path(system.out_dir, "save").glob(pattern)) or \
            [g for e in reversed(exports) for g in sorted(e.glob(pattern))][:1]
        if not glbs:
            sys.exit(f"{args.run}: no exported GLB for step {step}; run `text23d export={args.run}` first")
        rows.append(np.concatenate([v["rgb"] for v in mesh_views(load_exported_mesh(glbs[0]), cams, args.resolution)], 1))
    save_image((np.concatenate(rows, 0).clip(0, 1) * 255).round().astype(np.uint8), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
