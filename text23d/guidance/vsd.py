"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023, arXiv:2305.16213).

    ∇θ L_VSD = E_{t,ε,c}[ w(t) · (ε̂_pretrained(x_t; y, t) − ε̂_φ(x_t; y, t, c)) · ∂x/∂θ ]  (eq. 9)

x = g(θ, c) is the render in the prior's model space, x_t = sqrt(ᾱ_t)·x + sqrt(1−ᾱ_t)·ε.
SDS (eq. 3 of DreamFusion) subtracts the sampled noise ε; VSD subtracts ε̂_φ, the score of the
distribution of the current renders, estimated by a camera-conditioned LoRA copy of the prior
(lora.py) that the system trains alternately on the detached renders (`lora_loss`, eq. 10). With
one particle and a LoRA that fits it perfectly, VSD reduces to SDS; because ε̂_φ is smooth where ε is
not, VSD works at a normal CFG (7.5) instead of SDS's 100.

The system's loop, per 3D step:
    out = vsd(prior, rgb, cond, uncond, c2w, step, max_steps); out["loss_vsd"].backward()   # θ
    for _ in range(vsd.lora_steps): vsd.lora_loss(out["x0"], cond, c2w).backward(); lora_opt.step()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text23d.errors import ConfigError
from text23d.guidance.cfg import check_view_scale, guided_noise
from text23d.guidance.lora import CameraLoRAUNet
from text23d.guidance.sds import max_step_ramp, ramp_at

WEIGHTINGS = ("sds", "uniform")


class VSDGuidance:
    # Each view's pose conditions the LoRA, which the system must train on the renders (parts.py).
    needs = frozenset({"rgb", "text", "camera_pose", "lora_training"})
    provides = frozenset({"lora"})

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
        # Deliberate duplication of SDSGuidance's checks (sds.py): one algorithm per file.
        if not guidance_scale >= 0:
            raise ConfigError(
                f"guidance_scale={guidance_scale} must be >= 0 (VSD uses a normal CFG, 7.5). "
                "Fix: guidance.guidance_scale=7.5"
            )
        if not lora_guidance_scale >= 0:
            raise ConfigError(
                f"lora_guidance_scale={lora_guidance_scale} must be >= 0 (1.0 = camera-conditioned "
                "LoRA prediction only). Fix: guidance.lora_guidance_scale=1.0"
            )
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting={weighting!r} is not supported: use one of {WEIGHTINGS}.")
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip={grad_clip} must be > 0, or null to disable clipping.")
        if not (isinstance(lora_rank, int) and lora_rank >= 1):
            raise ConfigError(
                f"lora_rank={lora_rank!r} must be a positive integer (4-16 is usual). Fix: lora_rank=4"
            )
        if not lora_lr > 0:
            raise ConfigError(
                f"lora_lr={lora_lr} must be > 0 (AdamW; ProlificDreamer uses 1e-4). Fix: lora_lr=1e-4"
            )
        if not (isinstance(lora_steps, int) and lora_steps >= 1):
            raise ConfigError(
                f"lora_steps={lora_steps!r} must be an integer >= 1 (LoRA steps per 3D step). "
                "Fix: lora_steps=1"
            )
        if not 0 <= camera_drop_prob <= 1:
            raise ConfigError(
                f"camera_drop_prob={camera_drop_prob} must be in [0, 1]. Fix: camera_drop_prob=0.1"
            )
        if not 0 <= anneal_at_fraction <= 1:
            raise ConfigError(
                f"anneal_at_fraction={anneal_at_fraction} must be in [0, 1] (fraction of max_steps after "
                "which max t is lowered; ProlificDreamer: 5k of 25k). Fix: anneal_at_fraction=0.2"
            )
        self.guidance_scale = float(guidance_scale)
        self.view_guidance_scale = check_view_scale(view_guidance_scale)  # the pretrained term's (cfg.py)
        self.lora_guidance_scale = float(lora_guidance_scale)
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.min_step_percent = float(min_step_percent)
        self.max_step_percent, self.max_step_ramp = max_step_ramp(max_step_percent, self.min_step_percent)
        if self.max_step_ramp is not None and anneal_max_step_percent is not None:
            raise ConfigError(f"max_step_percent={list(self.max_step_ramp)} is a ramp and anneal_max_step_percent="
                              f"{anneal_max_step_percent} an anneal: use one. Fix: anneal_max_step_percent=null")
        if anneal_max_step_percent is not None:
            self._check_step_range(anneal_max_step_percent, "anneal_max_step_percent")
            anneal_max_step_percent = float(anneal_max_step_percent)
        self.anneal_max_step_percent = anneal_max_step_percent
        self.anneal_at_fraction = float(anneal_at_fraction)
        self.lora_rank, self.lora_lr, self.lora_steps = lora_rank, float(lora_lr), lora_steps
        self.camera_drop_prob = float(camera_drop_prob)
        self.lora_pretrained_model_name_or_path = lora_pretrained_model_name_or_path
        self.lora: CameraLoRAUNet | None = None

    def _check_step_range(self, value, name: str) -> None:
        if not 0 < self.min_step_percent < value <= 1:
            raise ConfigError(
                f"timestep range min_step_percent={self.min_step_percent}, {name}={value} is invalid: "
                "need 0 < min < max <= 1. Fix: e.g. min_step_percent=0.02, max_step_percent=0.98, "
                "anneal_max_step_percent=0.5"
            )

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

    def lora_loss(self, x0, text_cond, c2w) -> torch.Tensor:
        """Diffusion loss (eq. 10) of the LoRA model on detached model-space renders x0 (B, C, h, w)."""
        return self._require_lora().diffusion_loss(
            x0.detach(), text_cond, c2w, camera_drop_prob=self.camera_drop_prob
        )

    def _require_lora(self) -> CameraLoRAUNet:
        if self.lora is None:
            raise RuntimeError(
                "VSDGuidance.setup(prior) must be called before VSD is used (it builds the LoRA model)"
            )
        return self.lora

    # --- timesteps ----------------------------------------------------------------------------

    def max_step_at(self, step: int | None, max_steps: int | None) -> float:
        """max t as a fraction of T at stage-local `step`: the ramp's value (threestudio's
        [5000, 0.98, 0.5, 5001] in every VSD stage), or max_step_percent, then anneal_max_step_percent
        once step >= anneal_at_fraction · max_steps."""
        if self.max_step_ramp is not None:
            return self.max_step_percent if step is None else ramp_at(self.max_step_ramp, step)
        if self.anneal_max_step_percent is None or step is None or max_steps is None:
            return self.max_step_percent
        if step >= self.anneal_at_fraction * max_steps:
            return self.anneal_max_step_percent
        return self.max_step_percent

    def sample_timesteps(self, prior, batch_size: int, max_step_percent: float | None = None) -> torch.Tensor:
        """t ~ U{min·T, ..., max·T}, one per view, from torch's global CPU RNG (device independent)."""
        steps = prior.num_train_timesteps
        low = int(self.min_step_percent * steps)
        if max_step_percent is None:
            max_step_percent = self.max_step_percent
        high = min(int(max_step_percent * steps), steps - 1)
        return torch.randint(low, high + 1, (batch_size,)).to(prior.device)

    # --- the VSD gradient ---------------------------------------------------------------------

    def __call__(
        self, prior, rgb, text_cond, text_uncond, c2w, step=None, max_steps=None, t=None, noise=None, text_plain=None
    ) -> dict:
        """rgb (B, H, W, 3) in [0, 1], text (B, L, D), c2w (B, 4, 4), text_plain (B, L, D) the prompt
        without view words when view_guidance_scale is set ->
        {"loss_vsd", "grad_norm", "t", "x0": the model-space render, detached, for `lora_loss`}."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"VSD expects rgb in renderer layout (B, H, W, 3), got {tuple(rgb.shape)}")
        x = prior.images_to_model_space(rgb.permute(0, 3, 1, 2))  # (B, C, h, w)
        return self.from_model_space(
            prior, x, text_cond, text_uncond, c2w, step=step, max_steps=max_steps, t=t, noise=noise,
            text_plain=text_plain
        )

    def from_model_space(
        self, prior, x, text_cond, text_uncond, c2w, step=None, max_steps=None, t=None, noise=None, text_plain=None
    ) -> dict:
        """The same loss for an x already in model space (B, C, h, w); gradients flow to x."""
        lora = self._require_lora()
        batch = x.shape[0]
        x = x.float()  # the surrogate loss and its gradient in float32 even for a half-precision prior
        if t is None:
            t = self.sample_timesteps(prior, batch, self.max_step_at(step, max_steps))
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(batch)
        if noise is None:
            noise = torch.randn(x.shape).to(x.device)  # CPU RNG: same draw on every device
        c2w = c2w.to(x.device, torch.float32)
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)  # ᾱ_t (B, 1, 1, 1)

        with torch.no_grad():  # both U-Net Jacobians are skipped, as in SDS
            x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise  # forward diffusion q(x_t | x)
            # Pretrained score: classifier-free guidance in one U-Net call (cfg.py).
            eps_pretrained = guided_noise(prior, x_t, t, text_cond, text_uncond, self.guidance_scale,
                                          self.view_guidance_scale, text_plain)
            eps_lora = self._lora_score(lora, x_t, t, text_cond, c2w)
            # w(t) = 1 − ᾱ_t as in SDS (DreamFusion appendix A.4); "uniform" = 1.
            weight = (1 - alpha) if self.weighting == "sds" else torch.ones_like(alpha)
            raw = weight * (eps_pretrained - eps_lora)  # (B, C, h, w)
            # A NaN/Inf here (fp16 overflow, a broken prior) makes the system skip the step; the
            # gradient is still made finite, so the logged loss stays readable.
            nonfinite = ~torch.isfinite(raw).all()
            grad = torch.nan_to_num(raw)
            if self.grad_clip is not None:
                grad = grad.clamp(-self.grad_clip, self.grad_clip)

        # Surrogate (same as SDS): d/dx 0.5·||x − sg(x − grad)||² / B = grad / B for each view.
        target = (x - grad).detach()
        loss = 0.5 * F.mse_loss(x, target, reduction="sum") / batch
        return {"loss_vsd": loss, "grad_norm": grad.norm().detach(), "nonfinite": nonfinite, "t": t, "x0": x.detach()}

    def _lora_score(self, lora, x_t, t, text_cond, c2w) -> torch.Tensor:
        """ε̂_φ with classifier-free guidance over the *camera*: the LoRA is trained with the camera
        dropped (zeros), never the text, so its "unconditional" branch is the camera-free one.
        At lora_guidance_scale 1 that branch cancels and is not computed."""
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
