"""View-dependent prompts and the on-disk embedding cache."""

import pytest
import torch
from safetensors import safe_open

from helpers import text_close

from text23d.errors import ConfigError
from text23d.prior.loading import load_prior
from text23d.prompts.processor import PromptProcessor

from tests.helpers import check_settings


@pytest.mark.parametrize(
    "elevation, azimuth, direction",
    [
        (0, 0, "front"), (0, 44, "front"), (0, -45, "front"), (0, 46, "side"), (0, -90, "side"),
        (0, 134, "side"), (0, 136, "back"), (0, -170, "back"), (0, 180, "back"), (0, 190, "back"),
        (0, 350, "front"), (30, 225, "back"), (59, 0, "front"), (70, 0, "overhead"), (70, 180, "overhead"),
    ],
)
def test_direction_by_angle(elevation, azimuth, direction):
    assert PromptProcessor("a cube").directions(elevation, azimuth) == [direction]


def test_prompts_for_batch_and_thresholds():
    pp = PromptProcessor("  a hamburger ", front_threshold=30, back_threshold=60, overhead_threshold=50)
    prompts = pp.prompts_for(torch.tensor([0.0, 0.0, 0.0, 55.0]), torch.tensor([29.0, 31.0, 121.0, 0.0]))
    assert prompts == [f"a hamburger, {d} view" for d in ("front", "side", "back", "overhead")]
    plain = PromptProcessor("a hamburger", view_dependent=False)
    assert plain.prompts_for([0, 80], [180, 0]) == ["a hamburger", "a hamburger"]


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(prompt):
    from text23d.schema.core import check_node
    from text23d.schema.run import RunConfig

    with pytest.raises(ConfigError, match='prompt is empty.*prompt="a hamburger"'):
        check_node({"prompt": prompt}, RunConfig, "")


def test_invalid_thresholds():
    with pytest.raises(ConfigError, match="front_threshold=100"):
        check_settings(PromptProcessor, front_threshold=100, back_threshold=100)
    with pytest.raises(ConfigError, match="overhead_threshold=95"):
        check_settings(PromptProcessor, overhead_threshold=95)


def test_embeddings_follow_directions(tiny_pixel_model, tmp_path):
    prior = load_prior(str(tiny_pixel_model))
    pp = PromptProcessor("a red cube", negative_prompt="blue", cache_dir=str(tmp_path))
    pp.prepare(prior)
    cond, uncond = pp(torch.tensor([0.0, 0.0, 80.0]), torch.tensor([0.0, 180.0, 0.0]))
    assert cond.shape == uncond.shape == (3, 16, 32)
    expected = prior.encode_text([f"a red cube, {d} view" for d in ("front", "back", "overhead")])
    assert text_close(cond, expected)  # 5 prompts encoded together vs 3
    assert text_close(uncond, prior.encode_text(["blue"]).expand(3, -1, -1))
    # The prompt without view words, for view guidance (guidance.view_guidance_scale).
    assert text_close(pp.plain(3), prior.encode_text(["a red cube"]).expand(3, -1, -1))
    assert not text_close(pp.plain(1), expected[:1])


def test_cache_hit_skips_text_encoder(tiny_latent_model, tmp_path):
    first = load_prior(str(tiny_latent_model))
    computed = PromptProcessor("a green sphere", cache_dir=str(tmp_path))
    computed.prepare(first)
    assert first.text_encoder_loaded
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 6  # four views, the prompt without a view, the empty negative prompt
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["prior"] == first.cache_key

    fresh = load_prior(str(tiny_latent_model))
    cached = PromptProcessor("a green sphere", cache_dir=str(tmp_path))
    cached.prepare(fresh)
    assert not fresh.text_encoder_loaded  # every embedding came from disk
    azimuth = torch.tensor([0.0, 90.0, 180.0])
    for a, b in zip(computed(torch.zeros(3), azimuth), cached(torch.zeros(3), azimuth)):
        assert torch.equal(a, b)
    assert text_close(cached(0, 90)[0][0], fresh.encode_text(["a green sphere, side view"])[0])


def test_cache_is_per_model_and_uses_env_default(tiny_latent_model, tiny_pixel_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXT23D_CACHE", str(tmp_path))
    folder = tmp_path / "text_embeddings"
    latent, pixel = load_prior(str(tiny_latent_model)), load_prior(str(tiny_pixel_model))
    assert latent.cache_key != pixel.cache_key
    PromptProcessor("a blue cube", view_dependent=False).prepare(latent)
    assert len(list(folder.glob("*.safetensors"))) == 2  # the prompt and ""
    PromptProcessor("a blue cube", view_dependent=False).prepare(pixel)
    assert pixel.text_encoder_loaded  # another model's embeddings are not reused
    assert len(list(folder.glob("*.safetensors"))) == 4


def test_corrupt_cache_file_is_recomputed(tiny_pixel_model, tmp_path):
    prior = load_prior(str(tiny_pixel_model))
    PromptProcessor("a cube", view_dependent=False, cache_dir=str(tmp_path)).prepare(prior)
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    fresh = load_prior(str(tiny_pixel_model))
    pp = PromptProcessor("a cube", view_dependent=False, cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="unreadable"):
        pp.prepare(fresh)
    assert text_close(pp(0, 0)[0][0], fresh.encode_text(["a cube"])[0])


@pytest.mark.parametrize("azimuth, direction", [
    (0, "front"), (22, "front"), (23, "front right"), (67, "front right"), (90, "right"), (112, "right"),
    (135, "back right"), (170, "back"), (-170, "back"), (-135, "back left"), (-90, "left"), (-30, "front left"),
    (350, "front"), (400, "front right"),
])
def test_eight_view_sectors(azimuth, direction):
    pp = PromptProcessor("a cube", view_sectors=8)
    assert pp.directions(0, azimuth) == [direction]
    assert pp.directions(80, azimuth) == ["overhead"]
    assert pp.prompts_for(0, azimuth) == [f"a cube, {direction} view"]


def test_view_sectors_must_be_4_or_8():
    with pytest.raises(ConfigError, match="view_sectors=6"):
        check_settings(PromptProcessor, view_sectors=6)
