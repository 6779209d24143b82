"""Prior loading: tiny real diffusers/transformers folders, no mocks, no network."""

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from helpers import text_close
from text23d.builtin.tokenizer import write_word_tokenizer
from text23d.errors import ConfigError, PriorLoadError
from text23d.prior.loading import load_prior
from text23d.testing import TINY_WORDS, build_tiny_if_model, build_tiny_model


# --- tokenizer -------------------------------------------------------------------------------


def test_word_tokenizer_round_trip(tmp_path):
    # Overlapping words ("sphere"/"here"/"he", "banana"/"nana") stress the merge construction.
    words = TINY_WORDS + ["here", "he", "ere", "banana", "nana", "ban", "aaaa", "aa"]
    write_word_tokenizer(tmp_path, words, model_max_length=12)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 12
    ids = {}
    for word in words:
        pieces = tok(word, add_special_tokens=False).input_ids
        assert len(pieces) == 1, (word, tok.convert_ids_to_tokens(pieces))
        assert tok.convert_ids_to_tokens(pieces) == [word + "</w>"]
        ids[word] = pieces[0]
    assert len(set(ids.values())) == len(words)
    # Case-insensitive, with start/end tokens, and an unknown word falls back to characters.
    full = tok("A Red CUBE, xyz").input_ids
    assert tok.convert_ids_to_tokens(full) == [
        "<|startoftext|>", "a</w>", "red</w>", "cube</w>", ",</w>", "x", "y", "z</w>", "<|endoftext|>"
    ]


def test_word_tokenizer_rejects_digits(tmp_path):
    with pytest.raises(ConfigError, match="'r2d2'"):
        write_word_tokenizer(tmp_path, ["r2d2"])


def test_tiny_model_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", "pixel", seed=3)
    b = build_tiny_model(tmp_path / "b", "pixel", seed=3)
    c = build_tiny_model(tmp_path / "c", "pixel", seed=4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(str(p / weights)) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# --- loading ---------------------------------------------------------------------------------


def test_load_latent(tiny_latent_model):
    prior = load_prior(str(tiny_latent_model))
    assert prior.latent and prior.vae is not None
    assert (prior.resolution, prior.channels) == (16, 4)  # sample_size 8 × VAE factor 2
    assert prior.name == str(tiny_latent_model.resolve()) and prior.model_dir == tiny_latent_model.resolve()
    assert prior.alphas_cumprod.shape == (1000,) and prior.alphas_cumprod.dtype == torch.float32
    assert prior.num_train_timesteps == 1000 and prior.prediction_type == "epsilon"
    assert not prior.text_encoder_loaded  # lazy
    rgb = torch.rand(2, 3, 24, 24, requires_grad=True)
    x = prior.images_to_model_space(rgb)  # resized to 16, encoded to 8×8 latents
    assert x.shape == (2, 4, 8, 8)
    x.sum().backward()
    assert rgb.grad.abs().sum() > 0
    assert prior.decode(x).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_latent_encode_and_decode_follow_the_vae_config(tmp_path, tiny_latent_model, shift):
    """Encode = (posterior mean − shift) × scaling factor, decode its inverse, each against the VAE
    called directly: a missing scaling factor (or shift) would change every latent by 5× (or 0.25)."""
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_latent_model, folder)
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(scaling_factor=0.18215, shift_factor=shift)
    config_file.write_text(json.dumps(config))
    prior = load_prior(str(folder))
    assert prior.vae.config.scaling_factor == 0.18215 and prior.vae.config.shift_factor == shift
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = prior.vae.encode(rgb * 2 - 1).latent_dist.mean
        x = prior.images_to_model_space(rgb)
    want = (mean - (shift or 0.0)) * 0.18215
    assert torch.allclose(x, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    # Decode undoes the scaling: the round trip gives what the VAE itself decodes from the mean.
    with torch.no_grad():
        own = ((prior.vae.decode(mean).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(prior.decode(x), own, atol=1e-5)
    assert not torch.allclose(prior.decode(mean), own, atol=1e-2)  # the unscaled latent decodes to something else


def test_load_pixel(tiny_pixel_model):
    prior = load_prior(str(tiny_pixel_model))
    assert not prior.latent and prior.vae is None
    assert (prior.resolution, prior.channels) == (16, 3)
    rgb = torch.rand(1, 3, 16, 16)
    assert torch.equal(prior.images_to_model_space(rgb), rgb * 2 - 1)  # native size: no resize
    hot = rgb.clone()
    hot[0, 0, 5, 5] = float("inf")  # not even an identity resample: that would turn inf into NaN
    assert torch.equal(prior.images_to_model_space(hot), hot * 2 - 1)
    assert torch.allclose(prior.decode(rgb * 2 - 1), rgb, atol=1e-6)
    assert load_prior(str(tiny_pixel_model), resolution=32).resolution == 32
    with pytest.raises(ConfigError, match="resolution=0"):
        load_prior(str(tiny_pixel_model), resolution=0)


def test_weights_frozen_and_unchanged(tiny_latent_model):
    prior = load_prior(str(tiny_latent_model))
    prior.encode_text(["a red cube"])
    for folder, module in [("unet", prior.unet), ("vae", prior.vae)]:
        on_disk = load_file(str(tiny_latent_model / folder / "diffusion_pytorch_model.safetensors"))
        state = module.state_dict()
        assert set(on_disk) == set(state)
        assert all(torch.equal(state[k], on_disk[k]) for k in on_disk), folder
    on_disk = load_file(str(tiny_latent_model / "text_encoder" / "model.safetensors"))
    state = prior._text_encoder.state_dict()
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk if k in state)
    for module in (prior.unet, prior.vae, prior._text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_encode_text_lazy_and_release(tiny_latent_model):
    prior = load_prior(str(tiny_latent_model))
    emb = prior.encode_text(["a red cube", ""])
    assert emb.shape == (2, 16, 32) and emb.dtype == torch.float32
    assert prior.text_encoder_loaded
    assert not torch.allclose(emb[0], emb[1])
    prior.release_text_encoder()
    assert not prior.text_encoder_loaded
    assert text_close(prior.encode_text(["a red cube"])[0], emb[0])  # reloads on demand (batch 1 vs 2)


def test_v_prediction_converted_to_epsilon(tmp_path):
    prior = load_prior(str(build_tiny_model(tmp_path, "pixel", prediction_type="v_prediction")))
    assert prior.prediction_type == "v_prediction"
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 800])
    emb = prior.encode_text(["a cube", "a sphere"])
    v = prior.unet(x_t, t, encoder_hidden_states=emb).sample
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * v + (1 - alpha).sqrt() * x_t
    assert torch.allclose(prior.predict_noise(x_t, t, emb), expected, atol=1e-6)


def test_learned_variance_channels_dropped(tmp_path):
    prior = load_prior(str(build_tiny_model(tmp_path, "pixel", learned_variance=True)))
    assert prior.unet.config.out_channels == 6 and prior.channels == 3
    x_t, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    emb = prior.encode_text(["a cube"])
    full = prior.unet(x_t, t, encoder_hidden_states=emb).sample
    assert torch.equal(prior.predict_noise(x_t, t, emb), full[:, :3])


def hub_cache(tmp_path, monkeypatch, model, repo_id="text23d/tiny-pixel") -> Path:
    """`model` copied into the layout huggingface_hub writes: models--owner--name/{refs/main,
    snapshots/<commit>/...}, with HF_HUB_CACHE pointing at it. Returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots" / commit


def test_hub_id_loads_from_local_cache(tmp_path, monkeypatch, tiny_pixel_model):
    snapshot = hub_cache(tmp_path, monkeypatch, tiny_pixel_model)
    prior = load_prior("text23d/tiny-pixel")
    assert prior.name == "text23d/tiny-pixel" and prior.model_dir == snapshot.resolve()
    assert prior.cache_key.startswith("text23d/tiny-pixel@")


def test_half_finished_download_offline_is_incomplete_not_corrupt(tmp_path, monkeypatch, tiny_latent_model):
    # A download stopped after model_index.json, the scheduler, the unet's config and the tokenizer's
    # config: huggingface_hub links only finished files into the snapshot, so this is what it holds.
    snapshot = hub_cache(tmp_path, monkeypatch, tiny_latent_model, "text23d/tiny-sd")
    for gone in ("text_encoder", "vae"):
        shutil.rmtree(snapshot / gone)
    for gone in ("unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        (snapshot / gone).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorLoadError, match="download in the Hugging Face cache is incomplete") as err:
        load_prior("text23d/tiny-sd")
    message = str(err.value)
    assert "corrupt" not in message and str(snapshot) in message
    assert ("lacks unet/diffusion_pytorch_model.safetensors, vae/, text_encoder/, tokenizer/vocabulary "
            "(tokenizer.json, vocab.json + merges.txt or *.model))") in message
    assert "scheduler/" not in message  # present: not listed
    assert "unset HF_HUB_OFFLINE" in message and "hf download text23d/tiny-sd" in message
    assert "huggingface-cli download text23d/tiny-sd" in message


def test_half_finished_download_unreachable_endpoint(tmp_path, monkeypatch):
    # DeepFloyd IF's T5 comes in shards: a download that stopped between them lists the missing shard.
    # Its safety_checker/watermarker entries have no folders here, as text23d never downloads them.
    from transformers import T5EncoderModel

    model = build_tiny_if_model(tmp_path / "if")
    encoder = T5EncoderModel.from_pretrained(model / "text_encoder")
    shutil.rmtree(model / "text_encoder")
    encoder.save_pretrained(model / "text_encoder", max_shard_size="40KB")
    shards = sorted((model / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (model / "text_encoder" / "model.safetensors.index.json").is_file()
    snapshot = hub_cache(tmp_path, monkeypatch, model, "text23d/tiny-if")
    (snapshot / "text_encoder" / shards[-1].name).unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PriorLoadError, match="incomplete .*unreachable") as err:
        load_prior("text23d/tiny-if")
    message = str(err.value)
    assert f"text_encoder/{shards[-1].name}" in message and "corrupt" not in message
    assert "unet/" not in message and "safety_checker" not in message
    assert "http://127.0.0.1:9" in message and "hf download text23d/tiny-if" in message
    # The same snapshot with the shard back is complete: it loads without touching the network.
    shutil.copy(shards[-1], snapshot / "text_encoder" / shards[-1].name)
    assert load_prior("text23d/tiny-if").encode_text(["a red cube"]).shape == (1, 77, 32)


# --- failures: fast, and each message names the value and a fix -------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(PriorLoadError, match="does not exist") as err:
        load_prior(str(missing))
    assert str(missing) in str(err.value) and "Fix" in str(err.value)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(PriorLoadError, match="is not a diffusers model folder") as err:
        load_prior(str(tmp_path))
    assert "model_index.json" in str(err.value) and "prior.pretrained_model_name_or_path" in str(err.value)


def test_corrupt_component(tmp_path, tiny_latent_model):
    folder = shutil.copytree(tiny_latent_model, tmp_path / "model")
    (folder / "unet" / "config.json").write_text("{ this is not json")
    with pytest.raises(PriorLoadError, match="component 'unet'") as err:
        load_prior(str(folder))
    assert str(folder) in str(err.value) and "re-download" in str(err.value)


def test_corrupt_weights(tmp_path, tiny_pixel_model):
    folder = shutil.copytree(tiny_pixel_model, tmp_path / "model")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(PriorLoadError, match="component 'unet'"):
        load_prior(str(folder))


def test_empty_tokenizer(tmp_path, tiny_pixel_model):
    folder = shutil.copytree(tiny_pixel_model, tmp_path / "model")
    (folder / "tokenizer" / "vocab.json").unlink()
    (folder / "tokenizer" / "merges.txt").unlink()
    prior = load_prior(str(folder))  # lazy: the tokenizer is read on the first prompt
    with pytest.raises(PriorLoadError, match="tokenizer .* loaded empty") as err:
        prior.encode_text(["a red cube"])
    assert str(folder) in str(err.value) and "Fix" in str(err.value)


def test_missing_tokenizer_folder_fails_at_load(tmp_path, tiny_pixel_model):
    folder = shutil.copytree(tiny_pixel_model, tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(PriorLoadError, match="tokenizer"):
        load_prior(str(folder))


def test_latent_pixel_mismatch(tiny_latent_model, tiny_pixel_model):
    with pytest.raises(PriorLoadError, match="latent=True"):
        load_prior(str(tiny_pixel_model), latent=True)
    with pytest.raises(PriorLoadError, match="in_channels=4"):
        load_prior(str(tiny_latent_model), latent=False)
    with pytest.raises(ConfigError, match="multiple of the VAE factor 2"):
        load_prior(str(tiny_latent_model), resolution=15)


def test_unet_vae_channel_mismatch(tmp_path, tiny_latent_model, tiny_pixel_model):
    # A pixel UNet (3 channels) next to a 4-channel VAE: both load, but they cannot work together.
    folder = shutil.copytree(tiny_latent_model, tmp_path / "model")
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_pixel_model / "unet", folder / "unet")
    with pytest.raises(PriorLoadError, match="in_channels=3 does not match the VAE's latent_channels=4"):
        load_prior(str(folder))


def test_bad_dtype(tiny_pixel_model):
    with pytest.raises(ConfigError, match="'float64' is not supported: use auto or one of .*float32"):
        load_prior(str(tiny_pixel_model), dtype="float64")
    with pytest.raises(ConfigError, match="float16.*cpu.*Fix: prior.dtype=float32"):
        load_prior(str(tiny_pixel_model), dtype="float16")


def test_auto_dtype_rule():
    from text23d.prior.loading import auto_dtype

    assert auto_dtype("cpu")[0] == "float32"
    assert auto_dtype("cpu", fast_fp16=True, bf16_supported=True, trainer_precision="bf16-mixed")[0] == "float32"
    assert auto_dtype("mps", fast_fp16=True)[0] == "float32"
    ampere = dict(fast_fp16=True, bf16_supported=True)
    assert auto_dtype("cuda", **ampere) == ("float16", "this GPU has fast float16")  # threestudio's choice
    assert auto_dtype("cuda", **ampere, trainer_precision="16-mixed")[0] == "float16"
    assert auto_dtype("cuda", **ampere, trainer_precision="bf16-mixed") == ("bfloat16", "trainer.precision=bf16-mixed")
    assert auto_dtype("cuda", **ampere, trainer_precision="bf16-true")[0] == "bfloat16"
    volta = dict(fast_fp16=True, bf16_supported=False)
    assert auto_dtype("cuda", **volta, trainer_precision="bf16-mixed")[0] == "float16"  # no bfloat16 there
    assert auto_dtype("cuda", fast_fp16=False, bf16_supported=True)[0] == "bfloat16"
    assert auto_dtype("cuda", fast_fp16=False, bf16_supported=False)[0] == "float32"  # Pascal and older


def test_auto_dtype_on_cpu_loads_float32_and_says_so(tiny_pixel_model, caplog):
    with caplog.at_level(logging.INFO, logger="text23d"):
        prior = load_prior(str(tiny_pixel_model), dtype="auto", trainer_precision="bf16-mixed")
    assert prior.dtype == torch.float32 and prior.unet.dtype == torch.float32
    name = str(tiny_pixel_model.resolve())
    assert f"prior {name}: float32 weights (prior.dtype=auto on cpu: float16/bfloat16 are for CUDA only)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="text23d"):
        load_prior(str(tiny_pixel_model), dtype="bfloat16")  # explicit: allowed on CPU, and logged as chosen
    assert f"prior {name}: bfloat16 weights (prior.dtype=bfloat16)" in caplog.text


def test_real_priors_default_to_auto_dtype():
    from helpers import compose_cfg

    for prior in ("sd21base", "sd15", "deepfloyd_if"):
        assert compose_cfg([f"prior={prior}"]).prior.dtype == "auto", prior
    assert compose_cfg(["prior=builtin"]).prior.dtype == "float32"  # ours: trained and tuned in float32


def test_missing_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PriorLoadError, match="HF_HUB_OFFLINE=1") as err:
        load_prior("text23d-test/does-not-exist")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "'text23d-test/does-not-exist'" in message
    assert "huggingface-cli download text23d-test/does-not-exist" in message
    assert "prior.pretrained_model_name_or_path=" in message
    assert "to try text23d without any download, prior=builtin" in message


def test_missing_hub_id_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(PriorLoadError, match="unreachable") as err:
        load_prior("text23d-test/does-not-exist")
    assert time.monotonic() - start < 60
    assert "http://127.0.0.1:9" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert "prior=builtin" in str(err.value)


# --- the operations guidance uses ------------------------------------------------------------


def _edited_copy(model, tmp_path, file, **changes):
    """A copy of a tiny model folder with some keys of one JSON config file changed."""
    import json

    folder = shutil.copytree(model, tmp_path / "edited")
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def test_repr_names_the_model(tiny_latent_model, tiny_pixel_model):
    for model, kind, channels in ((tiny_latent_model, "latent", 4), (tiny_pixel_model, "pixel", 3)):
        prior = load_prior(str(model))
        assert repr(prior) == f"Prior({prior.name!r}, {kind}, 16px, {channels}ch, torch.float32, cpu)"


def test_sample_prediction_converted_to_epsilon(tmp_path):
    """An x0-predicting model: the ε returned, with the model's x0, rebuilds x_t by the scheduler's own
    forward process (DDPMScheduler.add_noise: x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε)."""
    prior = load_prior(str(build_tiny_model(tmp_path, "pixel", prediction_type="sample")))
    assert prior.prediction_type == "sample"
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 800])
    emb = prior.encode_text(["a cube", "a sphere"])
    with torch.no_grad():
        x0 = prior.unet(x_t, t, encoder_hidden_states=emb).sample
        eps = prior.predict_noise(x_t, t, emb)
    assert eps.dtype == torch.float32
    assert torch.allclose(prior.scheduler.add_noise(x0, eps, t), x_t, atol=1e-5)
    assert not torch.allclose(eps, x0, atol=1e-2)


def test_predict_noise_broadcasts_one_timestep(pixel_prior):
    torch.manual_seed(1)
    x_t = torch.randn(2, 3, 16, 16)
    emb = pixel_prior.encode_text(["a red cube", "a blue sphere"])
    with torch.no_grad():
        one = pixel_prior.predict_noise(x_t, 300, emb)
        both = pixel_prior.predict_noise(x_t, torch.tensor([300, 300]), emb)
    assert torch.equal(one, both)


def test_bfloat16_prior_takes_and_returns_float32(tiny_pixel_model, pixel_prior):
    """Renders and x_t arrive in float32: the prior casts them to its dtype, and ε̂ comes back in float32."""
    half = load_prior(str(tiny_pixel_model), dtype="bfloat16")
    rgb = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    x = half.images_to_model_space(rgb)
    assert x.dtype == torch.bfloat16 and torch.equal(x, (rgb * 2 - 1).bfloat16())
    emb = pixel_prior.encode_text(["a red cube"])
    x_t, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([400])
    with torch.no_grad():
        eps, ref = half.predict_noise(x_t, t, emb), pixel_prior.predict_noise(x_t, t, emb)
    assert eps.dtype == torch.float32
    assert (eps - ref).abs().max() <= 0.05 * ref.abs().max()  # bfloat16 keeps 8 bits of mantissa


def test_images_are_resized_bilinearly(pixel_prior):
    """Renders of another size are resized to the model's 16 px by bilinear interpolation (half-pixel
    centres, no antialiasing): 32 -> 16 is the mean of each 2×2 block; 8 -> 16 is torch's bilinear."""
    gen = torch.Generator().manual_seed(4)
    big, small = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    down = pixel_prior.images_to_model_space(big)
    assert torch.allclose(down, F.avg_pool2d(big, 2) * 2 - 1, atol=1e-6)
    up = pixel_prior.images_to_model_space(small)
    want = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(up, want, atol=1e-6)
    nearest = F.interpolate(small, size=(16, 16), mode="nearest") * 2 - 1
    assert not torch.allclose(up, nearest, atol=1e-2)


@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (2, 3, 16), (1, 4, 16, 16)])
def test_images_in_another_layout_are_rejected(pixel_prior, shape):
    with pytest.raises(ValueError, match=r"expected rgb of shape \(B, 3, H, W\)"):
        pixel_prior.images_to_model_space(torch.rand(shape))


def test_prior_moves_everything_to_its_device(tiny_latent_model):
    """to(device) moves the U-Net, the VAE, ᾱ and a text encoder loaded later (PyTorch's "meta" device:
    shapes without data, so no GPU is needed to see a tensor left on the CPU)."""
    prior = load_prior(str(tiny_latent_model))
    assert prior.to("meta") is prior and prior.device == torch.device("meta") and "meta" in repr(prior)
    assert {p.device.type for m in (prior.unet, prior.vae) for p in m.parameters()} == {"meta"}
    assert prior.alphas_cumprod.device.type == "meta"
    emb = prior.encode_text(["a red cube", ""])  # the encoder is loaded now, on the CPU, then moved
    assert emb.device.type == "meta" and emb.shape == (2, 16, 32)
    x = prior.images_to_model_space(torch.zeros(2, 3, 16, 16, device="meta"))
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)
    assert prior.predict_noise(x, [10, 20], emb).device.type == "meta"
    assert prior.decode(torch.zeros(2, 4, 8, 8)).device.type == "meta"  # a CPU latent is moved first


def test_encode_text_takes_one_prompt_as_a_string(pixel_prior):
    one = pixel_prior.encode_text("a red cube")
    assert one.shape == (1, 16, 32) and torch.equal(one, pixel_prior.encode_text(["a red cube"]))


def _direct(prior, prompts, mask: bool, length: int):
    """The text encoder called directly on the padded tokens, with or without their padding mask."""
    batch = prior._tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    kwargs = {"attention_mask": batch.attention_mask} if mask else {}
    with torch.no_grad():
        return prior._text_encoder(batch.input_ids, **kwargs)[0]


def test_clip_is_encoded_without_a_padding_mask_unless_its_config_asks(tiny_pixel_model, tmp_path):
    """SD's CLIP was trained without a padding mask; a config with use_attention_mask=true gets one."""
    prompts = ["a red cube", "a blue sphere"]
    plain = load_prior(str(tiny_pixel_model))
    emb = plain.encode_text(prompts)
    assert torch.equal(emb, _direct(plain, prompts, mask=False, length=16))
    assert not torch.allclose(emb, _direct(plain, prompts, mask=True, length=16), atol=1e-4)
    masked = load_prior(str(_edited_copy(tiny_pixel_model, tmp_path, "text_encoder/config.json", use_attention_mask=True)))
    assert torch.equal(masked.encode_text(prompts), _direct(masked, prompts, mask=True, length=16))


def test_t5_is_encoded_with_its_padding_mask_to_77_tokens(tmp_path):
    """DeepFloyd IF's T5: trained with a padding mask; its tokenizer has no length limit, so 77 tokens."""
    prior = load_prior(str(build_tiny_if_model(tmp_path / "if")))
    prompts = ["a red cube", "a blue sphere"]
    emb = prior.encode_text(prompts)
    assert emb.shape == (2, 77, 32)
    assert torch.equal(emb, _direct(prior, prompts, mask=True, length=77))
    assert not torch.allclose(emb, _direct(prior, prompts, mask=False, length=77), atol=1e-4)


def test_no_token_limit_falls_back_to_the_encoders_positions(tiny_pixel_model, tmp_path):
    """A tokenizer saved without a limit ("1e30") pads to the encoder's max_position_embeddings (16 here)."""
    folder = _edited_copy(tiny_pixel_model, tmp_path, "tokenizer/tokenizer_config.json",
                          model_max_length=1000000000000000019884624838656)
    prior = load_prior(str(folder))
    emb = prior.encode_text(["a red cube", "a blue sphere"])
    assert prior._tokenizer.model_max_length > 100_000 and emb.shape == (2, 16, 32)
    assert text_close(emb, load_prior(str(tiny_pixel_model)).encode_text(["a red cube", "a blue sphere"]))


def test_long_prompts_are_truncated_with_one_short_warning(pixel_prior, caplog):
    """16 tokens (start + 14 words + end) fit silently; longer prompts are cut to 16 tokens, and one
    warning counts them and shows the first, cut to 77 characters + "..." when longer than 80."""
    import logging

    fits = " ".join(["red"] * 14)
    caplog.set_level(logging.WARNING)
    assert pixel_prior.encode_text([fits]).shape == (1, 16, 32)
    assert not caplog.records  # a prompt that fits: nothing said
    long80 = " ".join(["red"] * 20)  + "d"  # 20 words (the last "redd"), exactly 80 characters
    assert len(long80) == 80
    long81 = long80 + "s"
    other = " ".join(["blue"] * 20)  # a second long prompt: not the one shown
    for shown_first, expected in ((long80, repr(long80)), (long81, repr(long81[:77] + "..."))):
        caplog.clear()
        emb = pixel_prior.encode_text([shown_first, "a red cube", other])
        assert emb.shape == (3, 16, 32)
        [record] = caplog.records  # one line for the batch, in the run's log format (no source line)
        message = record.getMessage()
        assert message.startswith("2 prompt(s) longer than the text encoder's 16 tokens were truncated to their first 16")
        assert f"e.g. {expected} ({len(shown_first)} characters)" in message
    # The cut prompt is encoded as its first 16 tokens: the same as the 14 words of it that fit.
    assert text_close(pixel_prior.encode_text([long80])[0], pixel_prior.encode_text([fits])[0])


def _prior_with_text(prior, tokenizer, encoder):
    """A Prior with `prior`'s U-Net and schedule and the given text side (tokenizer, encoder)."""
    from text23d.prior.prior import Prior

    return Prior(name="text", model_dir=prior.model_dir, unet=prior.unet, vae=None, scheduler=prior.scheduler,
                 resolution=prior.resolution, dtype=prior.dtype, device=prior.device, cache_key="text",
                 text_loader=lambda: (tokenizer, encoder))


@pytest.mark.parametrize("family", ["mt5", "umt5"])
def test_t5_family_encoders_get_the_padding_mask(pixel_prior, tiny_pixel_model, family):
    """mT5 and UMT5 are T5s (trained with a padding mask), whatever the tokenizer: the mask is passed."""
    from transformers import MT5Config, MT5EncoderModel, UMT5Config, UMT5EncoderModel

    config, model = {"mt5": (MT5Config, MT5EncoderModel), "umt5": (UMT5Config, UMT5EncoderModel)}[family]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pixel_model / "tokenizer")
    torch.manual_seed(0)
    encoder = model(config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()
    assert encoder.config.model_type == family
    prior = _prior_with_text(pixel_prior, tokenizer, encoder)
    prompts = ["a red cube", "a blue sphere"]
    emb = prior.encode_text(prompts)
    assert torch.equal(emb, _direct(prior, prompts, mask=True, length=16))
    assert not torch.allclose(emb, _direct(prior, prompts, mask=False, length=16), atol=1e-4)


def test_a_token_limit_above_100000_is_no_limit(pixel_prior, tiny_pixel_model):
    """Any tokenizer limit above 100,000 tokens is a "no limit" sentinel, not only transformers' 1e30."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pixel_model / "tokenizer", model_max_length=100_001)
    assert tokenizer.model_max_length == 100_001
    pixel_prior.encode_text("")  # loads the text side
    prior = _prior_with_text(pixel_prior, tokenizer, pixel_prior._text_encoder)
    prompts = ["a red cube", "a blue sphere"]
    assert torch.equal(prior.encode_text(prompts), _direct(prior, prompts, mask=False, length=16))


def test_a_vae_config_without_shift_factor_means_no_shift(latent_prior):
    """AsymmetricAutoencoderKL (a drop-in SD 1.5 VAE) has no shift_factor in its config: encode is
    mean × scaling factor and decode its inverse, against the VAE called directly."""
    from diffusers import AsymmetricAutoencoderKL

    from text23d.prior.prior import Prior

    torch.manual_seed(0)
    vae = AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, down_block_out_channels=(32, 64), layers_per_down_block=1,
        up_block_types=("UpDecoderBlock2D",) * 2, up_block_out_channels=(32, 64), layers_per_up_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.5,
    ).eval()
    assert not hasattr(vae.config, "shift_factor")
    prior = Prior(name="asym", model_dir=latent_prior.model_dir, unet=latent_prior.unet, vae=vae,
                  scheduler=latent_prior.scheduler, resolution=16, dtype=torch.float32, device="cpu",
                  cache_key="asym", text_loader=None)
    rgb = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mean = vae.encode(rgb * 2 - 1).latent_dist.mean
        own = ((vae.decode(mean).sample + 1) / 2).clamp(0, 1)
        x = prior.images_to_model_space(rgb)
    assert torch.allclose(x, mean * 0.5, rtol=1e-5, atol=1e-6 * mean.abs().max().item())
    assert torch.allclose(prior.decode(x), own, atol=1e-5)


def test_bfloat16_latent_prior_decodes_float32_latents(tiny_latent_model, latent_prior):
    """decode casts float32 latents to a bfloat16 VAE's dtype and returns float32 rgb, within bfloat16's
    8-bit mantissa of the float32 model's decode."""
    half = load_prior(str(tiny_latent_model), dtype="bfloat16")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    rgb, ref = half.decode(x), latent_prior.decode(x)
    assert rgb.dtype == torch.float32 and rgb.shape == ref.shape == (1, 3, 16, 16)
    assert (rgb - ref).abs().max() <= 0.05
