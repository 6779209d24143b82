"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023, arXiv:2305.16213).

    ∇θ L_VSD = E_{t,ε,c}[ w(t) · (ε̂_pretrained(x_t; y, t) − ε̂_φ(x_t; y, t, c)) · ∂x/∂θ ]  (eq. 9)

x = g(θ, c) is the render in the prior's model space, x_t = sqrt(ᾱ_t)·x + sqrt(1−ᾱ_t)·ε.
SDS (eq. 3 of DreamFusion) subtracts the sampled noise ε; VSD subtracts ε̂_φ, the score of the
distribution of the current renders, estimated by a camera-conditioned LoRA copy of the prior
(lora.py) that the system trains alternately on the detached renders (`learn`, eq. 10). With
one particle and a LoRA that fits it perfectly, VSD reduces to SDS; because ε̂_φ is smooth where ε is
not, VSD works at a normal CFG (7.5) instead of SDS's 100.

The timesteps, w(t), CFG and the surrogate loss are base.py's; VSD adds its baseline (the LoRA's
ε̂_φ) and `learn`, which the system calls after each 3D step, `lora_steps` times:
    out = vsd(prior, rgb, text, cams, step=step, max_steps=steps); out.loss.backward()    # θ
    vsd.learn(out.x0, text, cams).backward(); lora_optimizer.step()                        # φ
"""

from __future__ import annotations

import torch
from torch import Tensor

from text23d.errors import ConfigError
from text23d.guidance.base import ScoreDistillation, Text
from text23d.guidance.lora import CameraLoRAUNet


def _c2w(cams) -> Tensor:
    """The LoRA's camera condition: each view's c2w flattened (B, 16)."""
    return cams.c2w.reshape(len(cams), 16).float()


class VSDGuidance(ScoreDistillation):
    name = "vsd"
    # Each view's pose conditions the LoRA, which the system must train on the renders (parts.py).
    needs = frozenset({"rgb", "text", "camera_pose", "lora_training"})
    provides = frozenset({"lora"})
    learns_from_renders = True

    def __init__(
        self,
        guidance_scale: float = 7.5,
        lora_guidance_scale: float = 1.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        anneal_max_step_percent: float | None = 0.5,
        anneal_at_fraction: float = 0.2,
        weighting: str = "sds",
        grad_clip: float | None = None,
        lora_rank: int = 4,
        lora_lr: float = 1e-4,
        lora_steps: int = 1,
        camera_drop_prob: float = 0.1,
        lora_pretrained_model_name_or_path: str | None = None,
        view_guidance_scale: float | None = None,
    ):
        super().__init__(guidance_scale, min_step_percent, max_step_percent, weighting, grad_clip,
                         anneal_max_step_percent, anneal_at_fraction, view_guidance_scale)
        self.lora_guidance_scale = float(lora_guidance_scale)
        self.lora_rank, self.lora_lr, self.lora_steps = lora_rank, float(lora_lr), lora_steps
        self.camera_drop_prob = float(camera_drop_prob)
        self.lora_pretrained_model_name_or_path = lora_pretrained_model_name_or_path
        self.lora: CameraLoRAUNet | None = None

    # --- the LoRA score model -----------------------------------------------------------------

    def setup(self, prior) -> CameraLoRAUNet:
        """Build `self.lora`: a LoRA copy of the prior's U-Net, or of the U-Net of
        `lora_pretrained_model_name_or_path` (same space, text width and schedule as the prior)."""
        base = prior
        if self.lora_pretrained_model_name_or_path is not None:
            from text23d.errors import PriorLoadError
            from text23d.prior.loading import FOLDER_HINT, load_prior

            try:
                base = load_prior(
                    self.lora_pretrained_model_name_or_path,
                    dtype=str(prior.dtype).removeprefix("torch."),
                    device=prior.device,
                )
            except PriorLoadError as err:  # name the key that chose this model, not the prior's
                hint = "guidance.lora_pretrained_model_name_or_path=/path/to/model"
                raise PriorLoadError(
                    f"the LoRA base (guidance.lora_pretrained_model_name_or_path): "
                    f"{str(err).replace(FOLDER_HINT, hint).rstrip('.')}. Or "
                    "guidance.lora_pretrained_model_name_or_path=null: a LoRA on a copy of the prior."
                ) from err
            _check_compatible(prior, base)
        self.lora = CameraLoRAUNet(
            base.unet, base.alphas_cumprod, base.prediction_type, rank=self.lora_rank
        )
        return self.lora  # `base` (another model's VAE etc.) is dropped here: only its UNet copy is kept

    def lora_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the LoRA + camera-MLP weights at `lora_lr` (ProlificDreamer's choice)."""
        return torch.optim.AdamW(self._require_lora().trainable_parameters(), lr=self.lora_lr)

    def learn(self, x0: Tensor, text: Text, cams) -> Tensor:
        """Diffusion loss (eq. 10) of the LoRA model on detached model-space renders x0 (B, C, h, w):
        what the system minimises `lora_steps` times after each 3D step."""
        return self._require_lora().diffusion_loss(
            x0.detach(), text.cond, _c2w(cams).to(x0.device), camera_drop_prob=self.camera_drop_prob
        )

    def _require_lora(self) -> CameraLoRAUNet:
        if self.lora is None:
            raise RuntimeError(
                "VSDGuidance.setup(prior) must be called before VSD is used (it builds the LoRA model)"
            )
        return self.lora

    def baseline(self, x_t: Tensor, t: Tensor, noise: Tensor, text: Text, cams) -> Tensor:
        """ε̂_φ with classifier-free guidance over the *camera*: the LoRA is trained with the camera
        dropped (zeros), never the text, so its "unconditional" branch is the camera-free one.
        At lora_guidance_scale 1 that branch cancels and is not computed."""
        lora, text_cond = self._require_lora(), text.cond
        c2w = _c2w(cams).to(x_t.device)
        if self.lora_guidance_scale == 1.0:
            return lora.predict_noise(x_t, t, text_cond, c2w)
        eps = lora.predict_noise(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([text_cond, text_cond]),
            torch.cat([c2w, torch.zeros_like(c2w)]),
        )
        eps_camera, eps_no_camera = eps.chunk(2)
        return eps_no_camera + self.lora_guidance_scale * (eps_camera - eps_no_camera)


def _check_compatible(prior, base) -> None:
    """The LoRA base scores the prior's x_t: same space, channels, text width and noise schedule."""
    def space(p):
        return f"{'latent' if p.latent else 'pixel'} space, {p.channels} channels"

    fix = (
        "Fix: use a LoRA base of the same family as the prior (e.g. SD 2.1 for SD 2.1-base), or "
        "lora_pretrained_model_name_or_path=null to copy the prior's own UNet."
    )
    if base.latent != prior.latent or base.channels != prior.channels:
        raise ConfigError(
            f"LoRA base '{base.name}' works in {space(base)}, but the prior '{prior.name}' works in "
            f"{space(prior)}: the LoRA model must denoise the prior's x_t. {fix}"
        )
    if base.latent and base.vae.config.scaling_factor != prior.vae.config.scaling_factor:
        raise ConfigError(
            f"LoRA base '{base.name}' has VAE scaling_factor={base.vae.config.scaling_factor}, the prior "
            f"'{prior.name}' {prior.vae.config.scaling_factor}: their latent spaces differ. {fix}"
        )
    width = (base.unet.config.cross_attention_dim, prior.unet.config.cross_attention_dim)
    if width[0] != width[1]:
        raise ConfigError(
            f"LoRA base '{base.name}' expects text embeddings of width {width[0]}, the prior "
            f"'{prior.name}' produces {width[1]}: they need the same text encoder. {fix}"
        )
    if base.num_train_timesteps != prior.num_train_timesteps or not torch.allclose(
        base.alphas_cumprod.cpu(), prior.alphas_cumprod.cpu(), rtol=1e-4, atol=1e-6
    ):
        raise ConfigError(
            f"LoRA base '{base.name}' was trained with another noise schedule than the prior "
            f"'{prior.name}' (T={base.num_train_timesteps} vs {prior.num_train_timesteps}, or different "
            f"betas in scheduler_config.json): it would see x_t at the wrong noise level. {fix}"
        )
