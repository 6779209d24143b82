"""The built-in prior: shipped, loadable like any user folder, and good enough that text-to-3D on
it generates what was asked (checked for shape and colour against the true primitive)."""
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from helpers import compose_cfg
from text23d.config import builtin_prior_path
from text23d.builtin.data import vocabulary
from text23d.builtin.evaluate import colour_error, colour_tolerance, primitive_mesh, score_asset, score_mesh
from text23d.prior.loading import load_prior
from text23d.run import build_system, load_system, run

BUILTIN = Path(builtin_prior_path())
# Every bar here comes from the true primitives and the colour table, never from the assets judged:
# - colours: an exported mesh's colours must be within colour_tolerance() of its renders (half the
#   distance between the two nearest named colours, orange and yellow: 0.075), so the file cannot
#   show a neighbouring colour where the renders show the asked one;
# - shapes: on the silhouette judge, a run must fit the asked shape better than any other (the
#   initial blob fits a sphere best: 0.97 against 0.81 for a cube), and get at least a quarter of
#   the way from the blob's fit to a true primitive's (IoU 1.0), on the renders and on the file.
MESH_COLOUR_TOLERANCE = colour_tolerance()


def beyond_the_blob(blob_iou: float) -> float:
    return blob_iou + 0.25 * (1.0 - blob_iou)


def test_it_ships_in_the_diffusers_layout_within_25_mb():
    for part in ("model_index.json", "unet/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "scheduler/scheduler_config.json", "README.md", "samples.png"):
        assert (BUILTIN / part).is_file(), part
    size = sum(f.stat().st_size for f in BUILTIN.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


def test_it_loads_like_a_user_folder_and_knows_its_words():
    prior = load_prior(str(BUILTIN))
    assert (prior.latent, prior.resolution, prior.channels) == (False, 32, 3)
    tok = CLIPTokenizer.from_pretrained(BUILTIN / "tokenizer")
    for word in vocabulary():  # a word-level vocabulary: every caption word is one token
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert compose_cfg(["prior=builtin", "prompt=x"]).prior.pretrained_model_name_or_path == str(BUILTIN)


def test_the_colour_bar_separates_true_colours_on_a_true_primitive(tmp_path):
    """The judge's colour error on a true cube: its mesh in the asked colour is far within the
    tolerance of the true renders, the same mesh in the nearest other colour far outside it."""
    import numpy as np

    from text23d.builtin.data import COLOURS, render_silhouettes
    from text23d.builtin.evaluate import mesh_views
    from text23d.cameras.sampler import RandomCameraSampler

    cams = RandomCameraSampler().orbit(4)
    mesh = primitive_mesh("cube", 0.52)
    masks = render_silhouettes(["cube"] * 4, cams, 0.52, 0.0, 64).numpy()[..., None]  # the true renders' silhouettes
    for asked, other in (("orange", "yellow"), ("blue", "purple")):
        renders = [{"rgb": np.where(k, COLOURS[asked], 1.0), "opacity": np.repeat(k, 3, -1).astype(float)} for k in masks]
        errors = {}
        for c in (asked, other):
            mesh.visual.vertex_colors = np.tile(np.array([*(np.array(COLOURS[c]) * 255).round(), 255], np.uint8), (len(mesh.vertices), 1))
            errors[c] = colour_error(renders, mesh_views(mesh, cams, 64))
        assert errors[asked] < 0.2 * MESH_COLOUR_TOLERANCE < MESH_COLOUR_TOLERANCE < errors[other], errors
    # The bar sits halfway between the nearest two named colours: a mesh a little nearer to orange than
    # to yellow passes, one a little nearer to yellow fails (a bar of 0.12 would pass both).
    renders = [{"rgb": np.where(k, COLOURS["orange"], 1.0), "opacity": np.repeat(k, 3, -1).astype(float)} for k in masks]
    for t, passes in ((0.45, True), (0.55, False)):
        blend = (1 - t) * np.array(COLOURS["orange"]) + t * np.array(COLOURS["yellow"])
        mesh.visual.vertex_colors = np.tile(np.array([*(blend * 255).round(), 255], np.uint8), (len(mesh.vertices), 1))
        error = colour_error(renders, mesh_views(mesh, cams, 64))
        assert (error < MESH_COLOUR_TOLERANCE) == passes, (t, error, MESH_COLOUR_TOLERANCE)


@pytest.mark.parametrize("shape,colour", [("cone", "blue"), ("cube", "red")])
def test_dreamfusion_beats_the_blob_and_exports_what_it_renders(tmp_path, shape, colour):
    """A short DreamFusion run per shape kind: round (a cone) and cornered (a cube)."""
    out = tmp_path / "run"
    args = [f"prompt=a {colour} {shape}", "prior=builtin", f"output_dir={out}", "trainer.enable_progress_bar=false",
            "export.video_views=8", "validation.every_n_steps=0"]
    blob = score_asset(build_system(compose_cfg(args)), shape, colour)  # the starting point
    summary = run(compose_cfg(args))
    system, _, _ = load_system(out)
    r = score_asset(system, shape, colour)
    m = score_mesh(summary["artifacts"]["mesh_glb"], shape, colour, system.camera_sampler)
    bar = beyond_the_blob(blob["iou"])
    assert max(blob["iou_by_shape"], key=blob["iou_by_shape"].get) == "sphere"
    for result in (r, m):  # the renders, then the exported file
        assert result["iou"] > bar, (blob["iou"], result["iou"], bar)
        assert max(result["iou_by_shape"], key=result["iou_by_shape"].get) == shape, result["iou_by_shape"]
        assert result["predicted_colour"] == colour, result["mean_albedo"]
    # The file's corners (or their absence) are read from its sections; on the renders the weaker
    # silhouette-area measure decides, and a cube's is not asserted (the slow evaluation reports it).
    assert m["predicted_shape"] == shape, (m["symmetry"], m["symmetry_threshold"])
    if shape == "cone":
        assert r["predicted_shape"] == shape, (r["symmetry"], r["symmetry_threshold"])
    assert colour_error(r["views"], m["views"]) < MESH_COLOUR_TOLERANCE


SEEDS_NEVER_TUNED_ON = (3, 4, 5)  # the prior, its settings and the judges were tuned on seeds 0-2


def accuracy(rows: list[dict], ok) -> float:
    return sum(bool(ok(r)) for r in rows) / len(rows)


@pytest.fixture(scope="module")
def fresh_evaluation(tmp_path_factory):
    """`make eval-prior`'s evaluation on fresh seeds: the 12 prompts (6 held-out captions the prior
    never saw, 6 seen) × 3 seeds with DreamFusion's prior=builtin defaults (about an hour on 2
    cores), each asset judged on its exported GLB file and on its renders."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("eval")
    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_prior.py"
    subprocess.run([sys.executable, str(script), "--seeds", *map(str, SEEDS_NEVER_TUNED_ON), "--out", str(out)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = json.loads((out / "eval.json").read_text())["runs"][0]["results"]
    assert len(rows) == 36 and sum(r["held_out"] for r in rows) == 18
    return rows


def mesh_both(r: dict) -> bool:
    return r["mesh_shape_correct"] and r["mesh_colour_correct"]


@pytest.mark.slow
def test_fresh_seeds_read_right_where_the_judges_are_met(fresh_evaluation):
    """What the evaluation on seeds 3-5 meets: on the renders, colour right and the asked shape the
    best silhouette fit for ≥ 95 %, round shapes read as their class for ≥ 95 %; on the files, the
    colour right for ≥ 95 % and the round shapes' class for ≥ 95 %, held-out captions on their own too."""
    rows = fresh_evaluation
    best_fit = lambda r: max(r["iou_by_shape"], key=r["iou_by_shape"].get) == r["shape"]  # noqa: E731
    for subset in (rows, [r for r in rows if r["held_out"]]):
        round_rows = [r for r in subset if r["shape"] not in ("cube", "pyramid")]
        assert accuracy(subset, lambda r: r["colour_correct"]) >= 0.95
        assert accuracy(subset, best_fit) >= 0.95, [(r["prompt"], r["seed"]) for r in subset if not best_fit(r)]
        assert accuracy(round_rows, lambda r: r["shape_correct"]) >= 0.95
        assert accuracy(subset, lambda r: r["mesh_colour_correct"]) >= 0.95
        assert accuracy(round_rows, mesh_both) >= 0.95


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 24 (the built-in world done right): on seeds 3-5 the 6 pyramid "
                   "files read as cones (their sections round off above half their height: 0.013-0.035 against "
                   "0.036) and the gray cone's and blue pyramid's colours are 0.075-0.104 from their renders")
def test_fresh_seeds_meet_the_targets_on_the_exported_files(fresh_evaluation):
    """The targets: on the files, shape and colour both right for ≥ 95 % of the 36 and, on their own,
    of the 18 held-out ones; every file's colours within MESH_COLOUR_TOLERANCE of its renders. Strict:
    once the assets meet them this passes, and the mark must go."""
    rows = fresh_evaluation
    wrong = [(r["prompt"], r["seed"], r["mesh_predicted_shape"], r["mesh_predicted_colour"]) for r in rows if not mesh_both(r)]
    assert accuracy(rows, mesh_both) >= 0.95, wrong
    assert accuracy([r for r in rows if r["held_out"]], mesh_both) >= 0.95, wrong
    assert max(r["mesh_colour_error"] for r in rows) < MESH_COLOUR_TOLERANCE
