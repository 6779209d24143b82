"""The built-in prior's data renderer and its training script, with the real renderer (no mocks)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from text23d.cameras.sampler import Cameras, look_at, spherical_to_position
from text23d.errors import ConfigError
from text23d.builtin.data import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    caption,
    held_out_pairs,
    make_dataset,
    render_primitives,
    render_silhouettes,
    vocabulary,
)

ROOT = Path(__file__).resolve().parents[1]


def cameras(elevation, azimuth, distance=1.75, fovy_deg=50.0, light=None) -> Cameras:
    """Cameras at the given angles (degrees); the light sits at the camera unless given (B, 3)."""
    elevation = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1)
    azimuth = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1)
    n = len(elevation)
    dist = torch.full((n,), float(distance))
    position = spherical_to_position(elevation, azimuth, dist)
    light = position.clone() if light is None else torch.as_tensor(light, dtype=torch.float32).reshape(n, 3)
    fovy = torch.full((n,), math.radians(fovy_deg))
    return Cameras(look_at(position), fovy, elevation, azimuth, dist, light)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


def nearest_colour(rgb: torch.Tensor) -> str:
    """The named colour that best explains a mean object colour, allowing any shade in [0.35, 1]."""
    def error(named):
        c = torch.tensor(named)
        shade = ((rgb @ c) / (c @ c)).clamp(0.35, 1.0)
        return (rgb - shade * c).norm().item()
    return min(COLOURS, key=lambda name: error(COLOURS[name]))


# --- names, held-out pairs, vocabulary ------------------------------------------------------------


def test_held_out_rule():
    pairs = held_out_pairs()
    assert pairs == held_out_pairs() == list(HELD_OUT)  # deterministic
    assert len(pairs) == 6
    shapes, colours = zip(*pairs)
    assert len(set(shapes)) == 6 and len(set(colours)) == 6  # each at most once
    assert set(shapes) <= set(SHAPES) and set(colours) <= set(COLOURS)
    assert len(SHAPES) * len(COLOURS) == 48 and len(COLOURS) >= 8


def test_vocabulary_and_captions():
    words = vocabulary()
    assert len(words) == len(set(words)) and all(w.isalpha() and w.islower() for w in words)
    assert caption("cone", "red") == "a red cone"
    assert caption("torus", "black", "overhead") == "a black torus, overhead view"
    for s in SHAPES:
        for c in COLOURS:
            for view in (None, "front", "front right", "right", "back left", "overhead"):
                assert set(caption(s, c, view).replace(",", " ").split()) <= set(words)
    with pytest.raises(ConfigError, match="'dodecahedron'"):
        caption("dodecahedron", "red")


# --- the renderer ---------------------------------------------------------------------------------


def test_sphere_and_cube_silhouettes_differ_from_the_side():
    cams = cameras([0.0, 0.0], [90.0, 90.0])
    masks = render_silhouettes(["sphere", "cube"], cams, scale=0.55, rotation_deg=0.0)
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.bool
    assert masks[0].sum() > 50 and masks[1].sum() > 50
    assert iou(masks[0], masks[1]) < 0.9


def test_cone_and_pyramid_are_narrower_at_the_top():
    cams = cameras([0.0, 0.0], [0.0, 0.0])
    masks = render_silhouettes(["cone", "pyramid"], cams, scale=0.55, rotation_deg=0.0)
    for shape, mask in zip(("cone", "pyramid"), masks):
        rows = mask.sum(dim=1).nonzero().squeeze(1)  # image rows the object covers, top first
        top, bottom = rows[: len(rows) // 4], rows[-len(rows) // 4:]
        width_top = mask[top].sum(dim=1).float().mean()
        width_bottom = mask[bottom].sum(dim=1).float().mean()
        assert width_top < 0.6 * width_bottom, (shape, width_top, width_bottom)


def test_torus_has_a_hole_from_above():
    cams = cameras([89.0, 89.0], [0.0, 0.0])
    masks = render_silhouettes(["torus", "sphere"], cams, scale=0.55, rotation_deg=0.0, resolution=33)
    torus, sphere = masks
    assert not torus[16, 16] and sphere[16, 16]  # the image centre looks down the ring's axis
    assert torus[16, 16 + 8] and torus[16, 16 - 8] and torus[16 + 8, 16] and torus[16 - 8, 16]


def test_rotation_is_about_the_vertical_axis():
    cams = cameras([0.0, 0.0], [0.0, 0.0], distance=4.0, fovy_deg=20.0)  # far: little perspective
    straight, turned = render_silhouettes(["cube", "cube"], cams, scale=0.5, rotation_deg=[0.0, 45.0])
    width = lambda m: m.any(dim=0).sum().item()  # noqa: E731
    height = lambda m: m.any(dim=1).sum().item()  # noqa: E731
    assert width(turned) > 1.2 * width(straight)  # a corner faces the camera: √2 wider
    assert height(turned) < 1.25 * height(straight)  # but not much taller (perspective only)


@pytest.mark.parametrize("name", list(COLOURS))
def test_object_colour_and_white_background(name):
    cams = cameras([15.0], [0.0])  # light at the camera: the sphere's centre faces it squarely
    rgb = torch.tensor([COLOURS[name]])
    image = render_primitives(["sphere"], rgb, cams, scale=0.5, rotation_deg=0.0)[0]  # (32, 32, 3)
    mask = render_silhouettes(["sphere"], cams, scale=0.5, rotation_deg=0.0)[0]
    assert image.shape == (32, 32, 3) and 0 <= image.min() and image.max() <= 1
    far = ~torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool()
    assert far.sum() > 200 and torch.all(image[far] == 1.0)  # white background
    assert torch.allclose(image[16, 16], rgb[0], atol=0.03)  # n·l ≈ 1: the colour itself
    assert nearest_colour(image[mask].mean(dim=0)) == name


def test_light_position_controls_the_shading():
    # Camera at azimuth 0 looks down −x; world +y is image right (INTERFACES.md convention).
    light = torch.tensor([[1.0, 2.0, 0.0]])
    image = render_primitives(["sphere"], torch.tensor([COLOURS["gray"]]), cameras([0.0], [0.0], light=light),
                              scale=0.5, rotation_deg=0.0)[0].mean(dim=-1)
    mask = render_silhouettes(["sphere"], cameras([0.0], [0.0]), scale=0.5, rotation_deg=0.0)[0]
    left, right = image[:, :16][mask[:, :16]].mean(), image[:, 16:][mask[:, 16:]].mean()
    assert right > left + 0.1


def test_shape_ids_by_name_or_index_and_clear_errors():
    cams = cameras([10.0, 10.0], [30.0, 30.0])
    rgb = torch.tensor([COLOURS["red"], COLOURS["blue"]])
    by_name = render_primitives(["cone", "torus"], rgb, cams, 0.5, 0.0, resolution=16)
    by_index = render_primitives(torch.tensor([SHAPES.index("cone"), SHAPES.index("torus")]), rgb, cams,
                                 0.5, 0.0, resolution=16)
    assert torch.equal(by_name, by_index)
    with pytest.raises(ConfigError, match="'donut'"):
        render_primitives(["cone", "donut"], rgb, cams, 0.5, 0.0)


# --- the data set -------------------------------------------------------------------------------


def expected_view(elevation: float, azimuth: float) -> str:
    """The view-suffix rule (8 sectors of 45°, "right" at +90°), written out independently of the code."""
    if elevation > 60:
        return "overhead"
    names = ["front", "front right", "right", "back right", "back", "back left", "left", "front left"]
    return names[min(range(8), key=lambda k: abs((azimuth - 45 * k + 180) % 360 - 180))]  # nearest centre


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(96, seed=7, batch_size=48)


def test_dataset_captions_match_the_renders(dataset):
    images, captions, meta = dataset
    assert images.shape == (96, 32, 32, 3) and images.dtype.name == "uint8" and len(captions) == 96
    held = set(HELD_OUT)
    for i, text in enumerate(captions):
        shape, colour, view, suffix = meta["shape"][i], meta["colour"][i], meta["view"][i], meta["suffix"][i]
        assert (shape, colour) not in held
        assert text == caption(shape, colour, view if suffix else None)
        assert view == expected_view(meta["elevation"][i].item(), meta["azimuth"][i].item())
        # The rendered object has the caption's colour (eroded mask: no anti-aliased edge pixels).
        img = torch.from_numpy(images[i]).float() / 255
        obj = (img < 0.97).any(dim=-1)
        inner = -torch.nn.functional.max_pool2d(-obj[None, None].float(), 3, 1, 1)[0, 0] > 0
        assert inner.sum() >= 4, i
        assert nearest_colour(img[inner].mean(dim=0)) == colour, (i, text)
    assert 0.7 < sum(meta["suffix"]) / 96 < 0.97  # most captions carry the view (data.SUFFIX_PROBABILITY)
    assert {"front", "front right", "right", "back", "left"} <= set(meta["view"])
    # Default training-camera ranges and the object draws.
    assert meta["elevation"].min() >= -10 and meta["elevation"].max() <= 45
    assert meta["scale"].min() >= 0.45 and meta["scale"].max() <= 0.6
    assert meta["rotation"].abs().max() == 0  # objects face the front exactly (data.ROTATION_RANGE)


def test_dataset_is_deterministic_and_leaves_global_rng_alone(dataset):
    state = torch.get_rng_state()
    images, captions, _ = make_dataset(96, seed=7, batch_size=48)
    assert torch.equal(torch.get_rng_state(), state)
    assert (images == dataset[0]).all() and captions == dataset[1]
    other, other_captions, _ = make_dataset(96, seed=8, batch_size=48)
    assert other_captions != captions


def test_dataset_honours_a_custom_held_out_set():
    _, _, meta = make_dataset(64, seed=0, held_out=[(s, c) for s in SHAPES for c in COLOURS if c != "red"])
    assert set(meta["colour"]) == {"red"}
    with pytest.raises(ConfigError, match="'mauve'"):
        make_dataset(4, seed=0, held_out=[("cube", "mauve")])


# --- the training script ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_prior_quick_writes_a_loadable_model(tmp_path):
    from text23d.prior.loading import load_prior

    out = tmp_path / "prior"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_prior.py"), "--quick", "--out", str(out),
                    "--device", "cpu"], check=True, env=env, cwd=tmp_path, timeout=300)
    prior = load_prior(str(out))
    assert not prior.latent and prior.resolution == 32 and prior.channels == 3
    emb = prior.encode_text(["a red cone, side view", ""])
    assert emb.shape == (2, 16, 64)
    eps = prior.predict_noise(torch.zeros(2, 3, 32, 32), torch.tensor([500, 500]), emb)
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "(filled in by scripts/eval_prior.py)" in card
    assert (out / "samples.png").is_file() and not (tmp_path / "prior.partial").exists()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 25 * 2**20
