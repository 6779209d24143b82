"""A loaded, frozen diffusion prior and the few operations guidance needs (see loading.py)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from text23d.errors import PriorLoadError

log = logging.getLogger("text23d")


class Prior:
    """A frozen diffusion model and the few operations guidance needs.

    Not an nn.Module on purpose: its weights must not show up in a system's parameters or
    checkpoints. The text side (tokenizer + encoder) is loaded on the first `encode_text` call, so a
    run whose prompt embeddings are cached never pays for (or needs the memory of) the text encoder.
    """

    def __init__(
        self, *, name, model_dir, unet, vae, scheduler, resolution, dtype, device, cache_key, text_loader
    ):
        self.name = name  # hub id or absolute folder path
        self.model_dir = Path(model_dir)  # resolved local folder (a cache snapshot for hub ids)
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.latent = vae is not None
        self.resolution = resolution  # pixels per side the model works at
        self.channels = unet.config.in_channels  # model-space channels (4 latent, 3 pixel)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PriorLoadError(
                f"prior '{name}': prediction_type={self.prediction_type!r} in scheduler_config.json is "
                "not supported; allowed: epsilon, v_prediction, sample. Fix: use a standard model."
            )
        self.dtype = dtype
        self.cache_key = cache_key
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # (T,)
        self._text_loader = text_loader
        self._tokenizer = None
        self._text_encoder = None
        self.device = torch.device("cpu")
        self.to(device)

    def __repr__(self) -> str:
        kind = "latent" if self.latent else "pixel"
        size = f"{self.resolution}px, {self.channels}ch"
        return f"Prior({self.name!r}, {kind}, {size}, {self.dtype}, {self.device})"

    @property
    def text_encoder_loaded(self) -> bool:
        return self._text_encoder is not None

    def to(self, device) -> "Prior":
        self.device = torch.device(device)
        for module in (self.unet, self.vae, self._text_encoder):
            if module is not None:
                module.to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        return self

    # --- text ---------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token-level embeddings (N, L, D) float32 for the UNet's cross-attention."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self._text_encoder is None:
            self._tokenizer, encoder = self._text_loader()
            self._text_encoder = encoder.to(self.device)
        tokenizer, encoder = self._tokenizer, self._text_encoder
        max_length = tokenizer.model_max_length
        if max_length > 100_000:  # "no limit" sentinel when the config omits it
            max_length = getattr(encoder.config, "max_position_embeddings", 77)
        batch = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        # verbose=False: measuring a long prompt is not an "indexing error" (transformers would say so)
        long = [p for p in prompts if len(tokenizer(p, verbose=False).input_ids) > max_length]
        if long:  # one line for the batch (a prompt's views differ in their suffix only), kept short
            shown = long[0] if len(long[0]) <= 80 else f"{long[0][:77]}..."
            log.warning("%d prompt(s) longer than the text encoder's %d tokens were truncated to their first %d "
                        "tokens, e.g. %r (%d characters)", len(long), max_length, max_length, shown, len(long[0]))
        kwargs = {}
        # T5 (DeepFloyd IF) is trained with a padding mask; CLIP (SD) is not, unless its config says so.
        if getattr(encoder.config, "model_type", "") in ("t5", "mt5", "umt5") or getattr(
            encoder.config, "use_attention_mask", False
        ):
            kwargs["attention_mask"] = batch.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = encoder(batch.input_ids.to(self.device), **kwargs)[0]  # (N, L, D)
        return hidden.float()

    def release_text_encoder(self) -> None:
        self._tokenizer = None
        self._text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- images -------------------------------------------------------------------------------

    def images_to_model_space(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb (B, 3, H, W) in [0, 1] -> (B, C, h, w) in the model dtype; differentiable w.r.t. rgb."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected rgb of shape (B, 3, H, W), got {tuple(rgb.shape)}")
        size = (self.resolution, self.resolution)
        if tuple(rgb.shape[-2:]) != size:
            # antialias off: its backward is not implemented on every device, and renders are
            # usually upsampled (64 -> 512), where antialiasing does nothing anyway.
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = (rgb * 2 - 1).to(self.dtype)  # (B, 3, R, R) in [-1, 1]
        if self.vae is None:
            return x
        # The posterior mean, not a sample: the encoder's own noise would only add variance to SDS.
        z = self.vae.encode(x).latent_dist.mean  # (B, 4, R/f, R/f)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space (B, C, h, w) -> rgb (B, 3, H, W) float32 in [0, 1], for visualisation."""
        with torch.no_grad():
            x = x.to(self.device, self.dtype)
            if self.vae is not None:
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                x = self.vae.decode(x / self.vae.config.scaling_factor + shift).sample
            return ((x.float() + 1) / 2).clamp(0, 1)

    # --- denoiser -----------------------------------------------------------------------------

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """ε̂(x_t; y, t) as float32 (B, C, h, w), whatever the model was trained to predict.

        x_t (B, C, h, w); t (B,) integer timesteps; text_emb (B, L, D).
        """
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x_t.shape[0])
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=text_emb.to(self.dtype)).sample
        # Learned variance (DeepFloyd IF): out has 2C channels, [ε, variance]; keep ε.
        out = out[:, : self.channels].float()
        if self.prediction_type == "epsilon":
            return out
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # ᾱ_t (B, 1, 1, 1)
        x_t = x_t.float()
        if self.prediction_type == "v_prediction":
            # v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 and x_t = sqrt(ᾱ)x0 + sqrt(1−ᾱ)ε  ⇒  ε = sqrt(ᾱ)v + sqrt(1−ᾱ)x_t
            return alpha.sqrt() * out + (1 - alpha).sqrt() * x_t
        return (x_t - alpha.sqrt() * out) / (1 - alpha).sqrt()  # x0-prediction
