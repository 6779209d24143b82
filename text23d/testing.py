"""Build tiny random diffusion models in the diffusers folder layout.

They exist so that tests (and a user without network) exercise the *real* loading path: the
folder looks exactly like a Stable Diffusion / pixel-space checkpoint, only with a few hundred
thousand random weights. Outputs are meaningless; shapes, dtypes and code paths are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from text23d.errors import ConfigError
from text23d.builtin.tokenizer import write_word_tokenizer

# Small vocabulary covering the prompts used in tests and view-dependent suffixes.
TINY_WORDS = "a red blue green cube sphere hamburger pineapple front side back overhead view".split()
KINDS = ("latent", "pixel")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def build_tiny_model(
    folder,
    kind: str = "latent",
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
) -> Path:
    """Write a tiny random model into `folder` and return its path.

    kind="latent": SD-shaped (UNet on 4×8×8 latents, VAE factor 2 ⇒ 16×16 images).
    kind="pixel": UNet on 3×16×16 images, no VAE.
    learned_variance=True makes the UNet predict 2C channels (ε and variance), as DeepFloyd IF does.
    """
    if kind not in KINDS:
        raise ConfigError(f"tiny model kind={kind!r} is not supported: use one of {KINDS}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type={prediction_type!r} is not supported: use one of {PREDICTION_TYPES}."
        )
    latent = kind == "latent"
    channels = 4 if latent else 3
    out_channels = 2 * channels if learned_variance else channels
    # fork_rng: building a model must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return save_model_folder(
            folder, TINY_WORDS, lambda tok: _text_encoder(tok),
            unet=_unet(channels, out_channels, sample_size=8 if latent else 16),
            scheduler=_scheduler(prediction_type, learned_variance), vae=_vae() if latent else None)


def save_model_folder(folder, words: list[str], make_text_encoder, unet, scheduler, vae=None,
                      model_max_length: int = 16) -> Path:
    """Write a model in the diffusers folder layout that `load_prior` (and diffusers) read:
    model_index.json, tokenizer/ (one token per word), text_encoder/, unet/, scheduler/, [vae/].
    `make_text_encoder(tokenizer)` builds the encoder once the vocabulary size is known."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(folder / "tokenizer", words, model_max_length=model_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    make_text_encoder(tokenizer).save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    index = {
        "_class_name": "StableDiffusionPipeline" if vae is not None else "Text23dPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        # Real SD folders carry these; keeping them exercises the loader's skipping of null entries.
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    if vae is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _text_encoder(tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools at the end-of-text token
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _unet(in_channels: int, out_channels: int, sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers reads this as the number of heads (a historical naming quirk)
        norm_num_groups=32,
    ).eval()


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),  # two levels ⇒ downsampling factor 2
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def _scheduler(prediction_type: str, learned_variance: bool) -> DDPMScheduler:
    # Stable Diffusion's training schedule: 1000 steps, "scaled_linear" betas 0.00085 → 0.012.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=False,
    )
