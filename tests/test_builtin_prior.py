"""The built-in prior: shipped, loadable like any user folder, and good enough that text-to-3D on
it generates what was asked (checked for shape and colour against the true primitive)."""
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from helpers import compose_cfg
from text23d.config import builtin_prior_path
from text23d.builtin.data import vocabulary
from text23d.builtin.evaluate import colour_error, score_asset, score_mesh
from text23d.prior.loading import load_prior
from text23d.run import load_system, run

BUILTIN = Path(builtin_prior_path())
# Mean |RGB| difference (0-1) between the rendered exported mesh and the volume renders over the
# evaluation orbit. Over the 12 evaluation prompts x 3 seeds it measured 0.023-0.103 (mean 0.052).
# What remains is what an opaque mesh with one colour per vertex cannot show: rims where the rays
# graze the albedo field's outer shell (a purple sphere: 0.062, 0.022 with 3 more outline pixels left
# out) and bodies the volume renders as partly transparent (a gray cone whose inside has opacity 0.81
# shows 19 % background white: 0.10). Vertex colours taken as the albedo at the vertex measured up to
# 0.161 on the same assets.
MESH_COLOUR_TOLERANCE = 0.12


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


@pytest.mark.parametrize("shape,colour", [("cone", "blue")])
def test_dreamfusion_generates_the_asked_shape_and_colour(tmp_path, shape, colour):
    out = tmp_path / "run"
    summary = run(compose_cfg([f"prompt=a {colour} {shape}", "prior=builtin", f"output_dir={out}",
                               "trainer.enable_progress_bar=false", "export.video_views=8",
                               "validation.every_n_steps=0"]))
    system, _, _ = load_system(out)
    r = score_asset(system, shape, colour)
    assert r["predicted_shape"] == shape, r["iou_by_shape"]
    assert r["predicted_colour"] == colour, r["mean_albedo"]
    assert r["iou"] > 0.6 and summary["steps"] > 0
    # The file a user takes away: the exported GLB shows the same shape and colour, and its
    # colours are those of the renders (MESH_COLOUR_TOLERANCE: see the note above it).
    m = score_mesh(summary["artifacts"]["mesh_glb"], shape, colour, system.camera_sampler)
    assert (m["predicted_shape"], m["predicted_colour"]) == (shape, colour), m["iou_by_shape"]
    assert colour_error(r["views"], m["views"]) < MESH_COLOUR_TOLERANCE


@pytest.mark.slow
def test_whole_evaluation_meets_the_targets_on_the_exported_meshes(tmp_path):
    """`make eval-prior`'s evaluation: 12 prompts × 3 seeds with DreamFusion's prior=builtin defaults
    (about an hour on 2 cores), judged on the exported GLB files. Targets: shape and colour both
    right for ≥ 95 % of the 36 meshes; every mesh's colours within MESH_COLOUR_TOLERANCE of its renders."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_prior.py"
    subprocess.run([sys.executable, str(script), "--seeds", "0", "1", "2", "--out", str(tmp_path)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = json.loads((tmp_path / "eval.json").read_text())["runs"][0]["results"]
    assert len(rows) == 36
    both = [r["mesh_shape_correct"] and r["mesh_colour_correct"] for r in rows]
    assert sum(both) >= 0.95 * len(rows), [(r["prompt"], r["seed"], r["mesh_predicted_shape"],
                                           r["mesh_predicted_colour"]) for r, ok in zip(rows, both) if not ok]
    assert max(r["mesh_colour_error"] for r in rows) < MESH_COLOUR_TOLERANCE
