"""Deliberate breaks: each weak spot issue 19 names, broken the way it names, must fail its test.

Each case copies the project (no .venv, outputs, mutants) to a scratch folder, makes ONE textual
change to the code there, and runs the named tests against that copy (PYTHONPATH points at it, so
the `text23d` command the tests start runs the broken code too). A case is "caught" when the tests
fail. The unbroken code passes the same tests in `make test`. Writes JSON and a markdown table.

    python scripts/breaks.py                    # every case (about 10 min on 2 cores)
    python scripts/breaks.py --only 4 5         # the cases whose item is 4 or 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Break:
    item: str   # the item number
    what: str   # the broken variant, in words
    file: str   # relative to the project root
    old: str    # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]


CASES = [
    Break("1", "mesh colour tolerance back to 0.12", "text23d/builtin/evaluate.py",
          "return 0.5 * min(float(np.abs(a - b).mean()) for a, b in itertools.combinations(rgb, 2))", "return 0.12",
          ("tests/test_builtin_prior.py::test_the_colour_bar_separates_true_colours_on_a_true_primitive",)),
    Break("2", "score distillation pushes the wrong way (b − ε̂ instead of ε̂ − b): the run must not beat the blob",
          "text23d/guidance/base.py", "raw = weight * (eps_hat - self.baseline(x_t, t, noise, text, cams))",
          "raw = weight * (self.baseline(x_t, t, noise, text, cams) - eps_hat)",
          ("tests/test_builtin_prior.py::test_dreamfusion_beats_the_blob_and_exports_what_it_renders",)),
    Break("3", "hash grid's analytic normals with x and z swapped", "text23d/geometry/hashgrid.py",
          "return torch.sigmoid(self.feature_net(h)), -nn.functional.normalize(grad, dim=-1, eps=1e-12)",
          "return torch.sigmoid(self.feature_net(h)), -nn.functional.normalize(grad[:, [2, 1, 0]], dim=-1, eps=1e-12)",
          ("tests/test_hashgrid.py::test_finite_difference_normals_match_analytic_ones_on_a_field_without_the_blob",)),
    Break("4", "dense grid's trilinear gradient with x and z swapped", "text23d/geometry/grid.py",
          "grad = torch.stack([gx, gy, gz], -1)", "grad = torch.stack([gz, gy, gx], -1)",
          ("tests/test_geometry.py::test_grid_analytic_normals_match_autograd_of_grid_sample_per_component",)),
    Break("5", "VAE scaling_factor missing from the encode", "text23d/prior/prior.py",
          "return (z - shift) * self.vae.config.scaling_factor", "return z - shift",
          ("tests/test_prior.py::test_latent_encode_and_decode_follow_the_vae_config",)),
    Break("5", "VAE shift_factor added instead of subtracted", "text23d/prior/prior.py",
          "return (z - shift) * self.vae.config.scaling_factor", "return (z + shift) * self.vae.config.scaling_factor",
          ("tests/test_prior.py::test_latent_encode_and_decode_follow_the_vae_config",)),
    Break("6", "export queries the field on the CPU whatever its device", "text23d/export/mesh.py",
          "def _field_device(fn: Callable) -> torch.device:\n", "def _field_device(fn: Callable) -> torch.device:\n    return torch.device(\"cpu\")\n",
          ("tests/test_export.py::test_device_is_taken_from_the_field_module",)),
    Break("6", "render memory estimate without the backward's gradients (x1.6 dropped)", "text23d/memory.py",
          "BACKWARD_PEAK = 1.6", "BACKWARD_PEAK = 1.0",
          ("tests/test_faults.py::test_the_render_estimate_matches_the_measured_peak_of_a_step",)),
    Break("6", "texture PNG written BGR: the file's colours are not the renders'", "text23d/export/texture.py",
          "texture = Image.fromarray(np.round(image * 255).astype(np.uint8))",
          "texture = Image.fromarray(np.round(image[..., ::-1] * 255).astype(np.uint8))",
          ("tests/test_vsd_run.py::test_vsd_on_the_builtin_prior_from_the_command_line_and_resume",)),
    Break("6", "exported mesh 15 % smaller than what the run renders", "text23d/export/artifacts.py",
          "paths = save_textured(mesh, str(folder), stem, export_formats(ex))",
          "paths = save_textured(mesh.apply_scale(0.85), str(folder), stem, export_formats(ex))",
          ("tests/test_magic3d.py::test_magic3d_on_the_builtin_prior_through_the_command",
           "tests/test_prolificdreamer.py::test_prolificdreamer_on_the_builtin_prior_through_the_command")),
]


def copy_project(dest: Path) -> None:
    skip = shutil.ignore_patterns(".venv", ".git", "outputs", "mutants", ".tools", ".whl", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=skip, symlinks=True)
    tools = ROOT / ".tools"
    if tools.exists():
        (dest / ".tools").symlink_to(tools)  # the npm validators, read only


def run_case(case: Break, scratch: Path) -> dict:
    copy = scratch / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy_project(copy)
    path = copy / case.file
    text = path.read_text()
    if text.count(case.old) != 1:
        raise SystemExit(f"{case.file}: {case.old!r} occurs {text.count(case.old)} times, not once. "
                         "Fix: update the case in scripts/breaks.py to the code as it is now.")
    path.write_text(text.replace(case.old, case.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "-W", "ignore", *case.tests], cwd=copy, env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    imported = subprocess.run([sys.executable, "-c", "import text23d; print(text23d.__file__)"], env=env,
                              cwd=scratch, capture_output=True, text=True).stdout.strip()
    assert imported.startswith(str(copy)), f"the tests imported {imported}, not the broken copy"
    return {"item": case.item, "what": case.what, "file": case.file, "tests": list(case.tests),
            "caught": p.returncode == 1 and bool(lines), "rc": p.returncode, "summary": summary,
            "failed": lines, "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="items to run (1-6)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "breaks.json"))
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c.item in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="text23d-breaks-") as scratch:
        for case in cases:
            r = run_case(case, Path(scratch))
            results.append(r)
            print(f"item {r['item']}: {r['what']}: {'caught' if r['caught'] else 'NOT CAUGHT'} "
                  f"({r['summary']}, {r['seconds']} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| item | broken variant | test | result |\n|---|---|---|---|")
    for r in results:
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in r["tests"])
        print(f"| {r['item']} | {r['what']} | {tests} | {'fails: ' + r['summary'] if r['caught'] else 'PASSES'} |")
    sys.exit(0 if all(r["caught"] for r in results) else 1)


if __name__ == "__main__":
    main()
