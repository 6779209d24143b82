"""Evaluate text-to-3D on the built-in prior: shape, colour and silhouette IoU per prompt.

    python scripts/eval_prior.py                                   # held-out + seen pairs, SDS at CFG 7.5
    python scripts/eval_prior.py --cfg 7.5 30 --out outputs/eval   # two CFG values
    python scripts/eval_prior.py --system vsd --prompts "a red cube" "a blue torus"
    python scripts/eval_prior.py --update-card                     # also write the model card's table
    python scripts/eval_prior.py --system vsd -- system.num_particles=4   # + particle diversity
    python scripts/eval_prior.py --seeds 0 1 2 3                   # SDS's diversity across seeds
    python scripts/eval_prior.py --combine a/eval.json b/eval.json # one table from separate runs
    python scripts/eval_prior.py --rescore a/eval.json --out b     # judge the exported meshes again
    python scripts/eval_prior.py --system vsd --init-from a/vsd-cfg7.5/{slug}/ckpts/geometry.ckpt \
        -- system.stage.texture.lora=reset                          # only stage 3 again, LoRA reset

Every asset is a real `text23d` run (`prior=builtin`, the system's own settings) in its own
folder under --out; JSON results and one PNG strip per asset (generated views over the ground
truth) are written beside them. Extra Hydra overrides can follow `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# What the judgement of the exported file adds to a row, as mesh_<field>.
MESH_FIELDS = ("iou", "predicted_shape", "shape_correct", "predicted_colour", "colour_correct", "symmetry",
               "symmetry_threshold", "silhouette_symmetry", "faces", "mean_albedo")


def evaluate(pairs, system: str, cfg_scale: float, out: Path, overrides: list[str], held: set,
             seeds: list[int], init_from: str | None = None) -> tuple[list[dict], list[dict]]:
    """One row per asset (every particle of every seed, and for a system of several stages every
    stage, from the checkpoint kept at its end); one diversity row per prompt when a prompt has
    several assets (of the last stage). `init_from`: a path with {slug} (the prompt's folder name)
    each run starts from; the stages it supplies are not judged again."""
    import lightning as L

    from text23d.builtin.evaluate import caption_of, diversity, score_asset
    from text23d.config import compose, slugify
    from text23d.run import build_system, export_only, run

    results, spread = [], []
    for shape, colour in pairs:
        prompt = caption_of(shape, colour)
        group = []
        for seed in seeds:
            run_dir = out / f"{system}-cfg{cfg_scale:g}" / slugify(prompt)
            run_dir = run_dir / f"seed{seed}" if len(seeds) > 1 else run_dir
            cfg = compose([f"prompt={prompt}", f"system={system}", "prior=builtin", f"output_dir={run_dir}",
                           f"guidance.guidance_scale={cfg_scale}", f"seed={seed}", "trainer.enable_progress_bar=false",
                           "export.video_views=8", "validation.every_n_steps=0",
                           *([f"init_from={init_from.format(slug=slugify(prompt))}"] if init_from else []),
                           *overrides])
            L.seed_everything(cfg.seed, verbose=False)
            blob = score_asset(build_system(cfg), shape, colour)  # the starting point: a density blob
            start = time.time()
            summary = run(cfg)
            wall = time.time() - start
            stages = summary["stages"]
            elapsed = 0.0
            for k, stage in enumerate(stages):
                if "from" in stage:  # made by the init_from run, judged there
                    continue
                elapsed += stage.get("wall_time_s") or 0.0
                last = k == len(stages) - 1
                if not last:  # the mesh of an earlier stage: exported from the checkpoint kept at its end
                    ckpt = run_dir / "ckpts" / f"{stage['name']}.ckpt"
                    meshes = export_only(compose([f"export.ckpt={ckpt}", "export.video_views=8",
                                                  f"export.texture_size={cfg.export.texture_size}"]))["artifacts"]
                    meshes = [p["mesh_glb"] for p in meshes.get("particles", [meshes])]  # as the last stage
                else:
                    ckpt, meshes = run_dir, None
                rows = score_run(ckpt, shape, colour, run_dir, tag="" if last else f"_{stage['name']}", meshes=meshes)
                for r in rows:
                    r.update({"prompt": prompt, "held_out": (shape, colour) in held, "seed": seed,
                              "stage": stage["name"], "wall_time_s": round(wall if last else elapsed, 1),
                              "blob_iou": blob["iou"], "blob_predicted_shape": blob["predicted_shape"],
                              "run_dir": str(run_dir)})
                    if last:
                        group.append(r.pop("views"))
                    else:
                        r.pop("views")
                    results.append(r)
                    print(json.dumps({key: r[key] for key in (
                        "prompt", "seed", "stage", "particle", "iou", "predicted_shape", "predicted_colour", "mesh_iou",
                        "mesh_predicted_shape", "mesh_predicted_colour", "mesh_colour_error", "symmetry",
                        "mesh_symmetry", "blob_iou", "wall_time_s")}), flush=True)
        if len(group) > 1:
            spread.append({"prompt": prompt, **diversity(group)})
            print(json.dumps(spread[-1]), flush=True)
    return results, spread


def score_run(ckpt, shape: str, colour: str, run_dir: Path, tag: str, meshes: list | None = None) -> list[dict]:
    """Every particle of a checkpoint, judged on its renders and on the GLB exported from it (the
    run's own, or `meshes`: those of a re-export)."""
    from text23d.builtin.evaluate import colour_error, score_asset, score_mesh, strip
    from text23d.export.video import save_image
    from text23d.run import load_system

    system, step, _ = load_system(ckpt)
    stage = system.stage_tag()
    meshes = meshes or sorted((run_dir / "save" / f"{stage}it{step:06d}-export").glob("*.glb"))
    rows = []
    for i in range(len(system.particles)):
        r = score_asset(system, shape, colour, particle=i)
        glb = str(meshes[i])
        # The file a user takes away: the exported GLB, judged the same way, and how far its
        # colours are from the renders' over the same orbit.
        m = score_mesh(glb, shape, colour, system.camera_sampler)
        r.update({f"mesh_{k}": m[k] for k in MESH_FIELDS})
        r["mesh_colour_error"] = colour_error(r["views"], m["views"])
        r["views_file"] = str(run_dir / f"eval_views{tag}_p{i}.npz")  # the renders, for --rescore
        np.savez_compressed(r["views_file"], rgb=np.stack([v["rgb"] for v in r["views"]]),
                            opacity=np.stack([v["opacity"] for v in r["views"]]))
        r["mesh_colour_error_vertex_albedo"] = vertex_albedo_error(system, i, glb, r["views"])
        name = f"eval_strip{tag}.png" if len(system.particles) == 1 else f"eval_strip{tag}_p{i}.png"
        save_image(strip(r["views"], shape, colour, r["best_scale"], r["best_rotation"], system.camera_sampler,
                         m["views"]), run_dir / name)
        r.update({"particle": i, "strip": str(run_dir / name), "mesh": glb})
        rows.append(r)
    return rows


def vertex_albedo_error(system, particle: int, glb: str, views: list[dict]) -> float:
    """The colour error the mesh would have with the albedo at its vertices as colours (how
    exports were coloured before surface_colors): the baseline the fix is measured against."""
    import torch
    import trimesh

    from text23d.builtin.evaluate import colour_error, load_exported_mesh, mesh_views
    from text23d.export.mesh import to_rgb8

    mesh = load_exported_mesh(glb)
    with torch.no_grad():
        albedo = system.particles[particle].geometry.albedo(torch.tensor(np.array(mesh.vertices), dtype=torch.float32))
    rgba = np.full((len(mesh.vertices), 4), 255, np.uint8)
    rgba[:, :3] = to_rgb8(albedo.numpy())
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)  # also replaces a texture
    return colour_error(views, mesh_views(mesh, system.camera_sampler.orbit(len(views)), views[0]["rgb"].shape[0]))


def rescore(report: dict) -> dict:
    """Judge every exported mesh of an earlier evaluation again with today's judge (a better judge
    needs no new runs). The render-vs-mesh colour error is recomputed where the renders were kept
    (eval_views*.npz beside the run); the verdicts on renders are kept as they were."""
    from text23d.builtin.evaluate import colour_error, score_mesh, summarise
    from text23d.cameras.sampler import RandomCameraSampler

    sampler = RandomCameraSampler()  # the evaluation orbit is the same for every system
    for run_ in report["runs"]:
        for r in run_["results"]:
            run_dir, i = Path(r["run_dir"]), r.get("particle", 0)
            r.setdefault("stage", "main")
            glb = Path(r["mesh"]) if r.get("mesh") else sorted((run_dir / "save").glob("*-export/*.glb"))[i]
            m = score_mesh(glb, r["shape"], r["colour"], sampler)
            r.update({f"mesh_{k}": m[k] for k in MESH_FIELDS})
            r["mesh"] = str(glb)
            kept = Path(r.get("views_file") or run_dir / f"eval_views_p{i}.npz")
            if kept.exists():
                v = np.load(kept)
                r["mesh_colour_error"] = colour_error([{"rgb": a, "opacity": b} for a, b in zip(v["rgb"], v["opacity"])],
                                                      m["views"])
            print(json.dumps({k: r.get(k) for k in ("prompt", "seed", "stage", "mesh_predicted_shape",
                                                     "mesh_predicted_colour", "mesh_symmetry", "mesh_colour_error")}),
                  flush=True)
        rows = run_["results"]
        run_["summary"] = {"seen": summarise([r for r in rows if not r["held_out"]]),
                           "held_out": summarise([r for r in rows if r["held_out"]])}
    return report


def card_table(report: dict) -> str:
    lines = ["| system | CFG | pairs × seeds | renders: shape / colour | **mesh file: shape / colour / both** | "
             "mean IoU (renders / mesh) | mesh vs render colour error | blob IoU | s / asset |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run_ in report["runs"]:
        for split in ("seen", "held_out"):
            s = run_["summary"][split]
            if s:
                mesh = (f"**{s['mesh_shape_accuracy']:.0%} / {s['mesh_colour_accuracy']:.0%} / {s['mesh_both_accuracy']:.0%}**"
                        if "mesh_shape_accuracy" in s else "—")
                lines.append(f"| {run_['system']} | {run_['cfg']:g} | {split} ({s['n']}) | {s['shape_accuracy']:.0%} / "
                             f"{s['colour_accuracy']:.0%} | {mesh} | {s['mean_iou']:.3f} / {s.get('mean_mesh_iou', float('nan')):.3f} | "
                             f"{s.get('mean_mesh_colour_error', float('nan')):.3f} | {s['mean_blob_iou']:.3f} | "
                             f"{s['mean_wall_time_s']:.0f} |")
    diverse = [r for r in report["runs"] if r.get("diversity")]
    if diverse:
        lines += ["", "| system | CFG | assets per prompt | pairwise silhouette IoU | pairwise RGB L1 |", "|---|---|---|---|---|"]
        for run_ in diverse:
            d = run_["diversity"]
            lines.append(f"| {run_['system']} | {run_['cfg']:g} | {d[0]['n']} ({run_['assets']}) | "
                         f"{np.mean([x['pairwise_iou'] for x in d]):.3f} | {np.mean([x['pairwise_rgb_l1'] for x in d]):.3f} |")
    return "\n".join(lines)


def per_asset_table(results: list[dict]) -> str:
    """One row per prompt × seed: what the renders and the exported mesh show."""
    def verdict(ok_shape, shape, ok_colour, colour):
        return f"{shape if ok_shape else shape.upper() + '!'} / {colour if ok_colour else colour.upper() + '!'}"

    corners = (f"mesh corners (cornered above {results[0]['mesh_symmetry_threshold']:.3f})"
               if "mesh_symmetry_threshold" in results[0] else "mesh corners")
    lines = ["| prompt | seed | renders: shape / colour | IoU | mesh file: shape / colour | mesh IoU | "
             f"{corners} | colour error | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        held = " (held out)" if r["held_out"] else ""
        lines.append(f"| {r['prompt']}{held} | {r['seed']} | "
                     f"{verdict(r['shape_correct'], r['predicted_shape'], r['colour_correct'], r['predicted_colour'])} | "
                     f"{r['iou']:.3f} | "
                     f"{verdict(r['mesh_shape_correct'], r['mesh_predicted_shape'], r['mesh_colour_correct'], r['mesh_predicted_colour'])} | "
                     f"{r['mesh_iou']:.3f} | {r['mesh_symmetry']:.4f} | {r['mesh_colour_error']:.3f} | "
                     f"{r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def update_card(card: Path, report: dict) -> None:
    text = card.read_text()
    head = text.split("## Evaluation")[0]
    # Every run of each configuration (runs made side by side and combined split the prompts).
    configs = list(dict.fromkeys((run_["system"], run_["cfg"]) for run_ in report["runs"]))
    tables = ""
    for system, cfg in configs:
        rows = [r for run_ in report["runs"] if (run_["system"], run_["cfg"]) == (system, cfg) for r in run_["results"]]
        tables += f"\n\nPer asset ({system}, CFG {cfg:g}):\n\n" + per_asset_table(rows)
    command = report["command"][0] if len(report["command"]) == 1 else shlex.join(report["command"])
    card.write_text(head + "## Evaluation\n\nWritten by `python " + command + "` "
                    f"on {report['machine']}. Wrong verdicts are in capitals with a '!'.\n\n" + card_table(report)
                    + tables + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default="dreamfusion")
    ap.add_argument("--cfg", type=float, nargs="+", default=[7.5], help="guidance scales to compare")
    ap.add_argument("--prompts", nargs="*", help='e.g. "a red cube" (default: held-out + seen pairs)')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="several seeds: diversity across runs")
    ap.add_argument("--label", help="name of this configuration in tables (default: the system)")
    ap.add_argument("--out", default="outputs/eval")
    ap.add_argument("--init-from", metavar="PATH", help="each run starts from PATH, where {slug} is the prompt's "
                    "folder name, e.g. outputs/ev/vsd-cfg7.5/{slug}/ckpts/geometry.ckpt")
    ap.add_argument("--combine", nargs="+", metavar="EVAL_JSON", help="only merge earlier eval.json files into one table")
    ap.add_argument("--rescore", nargs="+", metavar="EVAL_JSON", help="judge the meshes of earlier evaluations again")
    ap.add_argument("--update-card", action="store_true", help="write the table into the model card")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --, e.g. -- trainer.max_steps=300")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import platform

    from text23d.config import builtin_prior_path
    from text23d.builtin.evaluate import default_pairs, summarise

    out = Path(args.out)
    report = {"command": ["scripts/eval_prior.py", *sys.argv[1:]], "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} CPUs", "runs": []}
    if args.combine or args.rescore:
        sources = [json.loads(Path(path).read_text()) for path in args.combine or args.rescore]
        # What made them: a plain command as argv, a combined or rescored one as the text it already is.
        report["command"] = [" ; python ".join(src["command"][0] if len(src["command"]) == 1 else shlex.join(src["command"])
                                               for src in sources)]
        for src in sources:
            report["runs"] += src["runs"]
        if args.rescore:
            report["command"] = [report["command"][0] + " ; python " + shlex.join(["scripts/eval_prior.py", *sys.argv[1:]])]
            rescore(report)
        if args.label:
            for run_ in report["runs"]:
                run_["system"] = args.label
    else:
        held_out, seen = default_pairs()
        pairs = held_out + seen
        if args.prompts:
            from text23d.builtin.data import COLOURS, SHAPES

            pairs = [(w[-1], w[-2]) if len(w) >= 2 else ('', '') for w in (p.split() for p in args.prompts)]
            bad = [p for p, (shape, colour) in zip(args.prompts, pairs) if shape not in SHAPES or colour not in COLOURS]
            if bad:
                sys.exit(f"--prompts {bad}: each must be 'a {{colour}} {{shape}}' with a colour from {list(COLOURS)} "
                         f"and a shape from {list(SHAPES)}, e.g. --prompts \"a blue cube\"")
        for scale in args.cfg:
            results, spread = evaluate(pairs, args.system, scale, out, args.overrides, set(held_out), args.seeds,
                                       args.init_from)
            names = list(dict.fromkeys(r["stage"] for r in results))
            for name in names:  # one entry per stage; the last one carries the diversity
                rows = [r for r in results if r["stage"] == name]
                label = (args.label or args.system) + (f" ({name})" if len(names) > 1 else "")
                report["runs"].append({"system": label, "cfg": scale, "overrides": args.overrides,
                                       "seeds": args.seeds, "assets": "particles" if len(args.seeds) == 1 else "seeds",
                                       "results": rows, "diversity": spread if name == names[-1] else [],
                                       "summary": {"seen": summarise([r for r in rows if not r["held_out"]]),
                                                   "held_out": summarise([r for r in rows if r["held_out"]])}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(card_table(report))
    for run_ in report["runs"]:
        print(f"\n{run_['system']}, CFG {run_['cfg']:g}:\n" + per_asset_table(run_["results"]))
    if args.update_card:
        update_card(Path(builtin_prior_path()) / "README.md", report)


if __name__ == "__main__":
    main()
