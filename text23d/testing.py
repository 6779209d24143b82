"""Build tiny random diffusion models in the diffusers folder layout.

They exist so that tests (and a user without network) exercise the *real* loading path: the
folder looks exactly like a Stable Diffusion / pixel-space / DeepFloyd IF checkpoint, only with a
few hundred thousand random weights. Outputs are meaningless; shapes, dtypes and code paths are the real ones.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

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


# --- DeepFloyd IF stage I in miniature ----------------------------------------------------------
# DeepFloyd/IF-I-XL-v1.0's unet/config.json with only sizes shrunk: block_out_channels
# (512, 1024, 1536, 2048) → (32, 32, 32, 32), layers_per_block 3 → 1, sample_size 64 → 16, the T5
# width encoder_hid_dim 4096 → 32 (and cross_attention_dim, its projection, → 32), head size
# 64 → 8, pooling heads 64 → 2.
# The block types, embeddings and output layout (6 channels: ε and the learned variance) are IF's.
IF_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=6,
    block_out_channels=(32, 32, 32, 32),  # 0.7 M parameters, 2.9 MB
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    act_fn="gelu",
    attention_head_dim=8,  # SimpleCrossAttn blocks read it as the size of a head (IF: 64)
    cross_attention_dim=32,
    cross_attention_norm="group_norm",
    encoder_hid_dim=32,  # T5's width; projected to cross_attention_dim ("text_proj")
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",  # attention-pooled T5 embeddings added to the timestep embedding
    addition_embed_type_num_heads=2,
    class_embed_type=None,
    resnet_time_scale_shift="scale_shift",
    upcast_attention=False,
    use_linear_projection=False,
    norm_num_groups=32,
)
# IF's model_index.json. The loader reads unet, scheduler, text_encoder and tokenizer and must skip
# the rest (written here as entries only: their folders hold a CLIP safety model, not needed).
IF_MODEL_INDEX = {
    "_class_name": "IFPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["deepfloyd_if", "IFSafetyChecker"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "watermarker": ["deepfloyd_if", "IFWatermarker"],
}


def build_tiny_if_model(folder, seed: int = 0) -> Path:
    """Write a tiny random DeepFloyd IF stage I folder (3×16×16 pixels, T5 text encoder) and return it.

    The same files as DeepFloyd/IF-I-XL-v1.0: model_index.json, unet/ (IF's block types, learned
    variance), scheduler/ (IF's DDPM: cosine betas, learned-range variance, thresholding),
    text_encoder/ (a T5EncoderModel with t5-v1_1's gated-GELU layers) and tokenizer/ (spiece.model
    only, no tokenizer.json, so transformers converts it with sentencepiece as for the real one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_t5_tokenizer(folder / "tokenizer", TINY_WORDS)
    with torch.random.fork_rng(devices=[]):  # as build_tiny_model: the caller's RNG is untouched
        torch.manual_seed(seed)
        _t5_encoder(len(tokenizer)).save_pretrained(folder / "text_encoder")
        UNet2DConditionModel(**IF_UNET_CONFIG).eval().save_pretrained(folder / "unet")
    # IF's stage I scheduler, as diffusers' scripts/convert_if.py writes it.
    DDPMScheduler(
        variance_type="learned_range",
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
    ).save_pretrained(folder / "scheduler")
    index = {**IF_MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def write_t5_tokenizer(folder, words: list[str]) -> T5Tokenizer:
    """Train a tiny sentencepiece unigram model (T5's kind) on `words` and write the three files
    IF's tokenizer/ holds: spiece.model, tokenizer_config.json, special_tokens_map.json.

    Every word is seen as a whole, and every letter and punctuation mark on its own, so each word
    encodes to one piece "▁word" and any other text to letters, not to the unknown token.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in words]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]  # each word in many contexts
    lines.append(" ".join("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-:;()"))
    model = io.BytesIO()
    # T5's layout: pad 0, eos 1, unk 2, no bos. hard_vocab_limit off: a corpus this small cannot
    # fill a fixed vocabulary size. The corpus is passed as an iterator, not a file: the model
    # records its input file's name, and a temporary name would make every build differ.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, model_type="unigram",
        vocab_size=len(words) + 64, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(100)]  # T5's sentinel tokens, after the pieces
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    # model_max_length as t5-v1_1-xxl's save writes it: "no limit" (Prior.encode_text then uses 77).
    config = {**special, "extra_ids": 100, "model_max_length": 1000000000000000019884624838656,
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return T5Tokenizer.from_pretrained(str(folder))


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    # google/t5-v1_1-xxl (IF's encoder) shrunk: d_model 4096 → 32, 24 layers → 2, 64 heads → 4.
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def loop_hash_encoding(params, u, levels, n_features):
    """The per-level implementation the batched one replaced: one level at a time, 8 corners each,
    tcnn's row formula, autograd for the gradients."""
    from text23d.geometry.hashenc import PRIMES

    table = params.view(-1, n_features)
    corners = torch.tensor([[(c >> k) & 1 for k in range(3)] for c in range(8)], device=u.device)
    primes = torch.tensor(PRIMES, device=u.device)
    out = []
    for scale, res, size, offset, hashed in levels:
        pos = u.clamp(0, 1) * scale + 0.5
        base = pos.detach().floor()
        frac = pos - base
        grid = base.long()[:, None, :] + corners  # (N, 8, 3)
        if hashed:
            h = (grid[..., 0] * primes[0]) ^ (grid[..., 1] * primes[1]) ^ (grid[..., 2] * primes[2])
            rows = offset + h % size
        else:
            rows = offset + (grid[..., 0] + grid[..., 1] * res + grid[..., 2] * res * res) % size
        w = torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # (N, 8)
        out.append((w[..., None] * table[rows]).sum(1))
    return torch.cat(out, -1)
