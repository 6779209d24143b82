"""SDS against an independent reference: the U-Net called directly with classifier-free guidance."""

import pytest
import torch

from helpers import text_pair as _text

from text23d.errors import ConfigError
from text23d.guidance.sds import SDSGuidance




def _reference_grad(prior, x, cond, uncond, t, noise, scale, weighting="sds"):
    """w(t)·(ε̂ − ε), written out from the paper, with separate cond / uncond U-Net calls."""
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=uncond).sample
    weight = 1 - alpha if weighting == "sds" else 1.0
    return weight * (eps_u + scale * (eps_c - eps_u) - noise)


@pytest.mark.parametrize("weighting", ["sds", "uniform"])
def test_sds_gradient_parity(latent_prior, weighting):
    torch.manual_seed(0)
    batch = 2
    cond, uncond = _text(latent_prior, batch)
    x = torch.randn(batch, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([100, 700]), torch.randn(batch, 4, 8, 8)
    sds = SDSGuidance(guidance_scale=7.5, weighting=weighting)
    out = sds.from_model_space(latent_prior, x, cond, uncond, t=t, noise=noise)
    out["loss_sds"].backward()

    grad = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 7.5, weighting)
    # The loss is divided by the batch size: each view receives its own SDS gradient / B.
    assert torch.allclose(x.grad, grad / batch, rtol=1e-4, atol=1e-5 * grad.abs().max())
    assert torch.allclose(out["loss_sds"], 0.5 * (grad**2).sum() / batch, rtol=1e-4)
    assert torch.allclose(out["grad_norm"], grad.norm(), rtol=1e-4)
    assert torch.equal(out["t"], t)


def test_grad_clip_bounds(latent_prior):
    torch.manual_seed(1)
    cond, uncond = _text(latent_prior, 1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([600]), torch.randn(1, 4, 8, 8)
    sds = SDSGuidance(guidance_scale=100.0, grad_clip=0.05)
    sds.from_model_space(latent_prior, x, cond, uncond, t=t, noise=noise)["loss_sds"].backward()
    grad = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 100.0)
    assert grad.abs().max() > 0.05  # the clip is active in this case
    assert x.grad.abs().max() <= 0.05 + 1e-6
    assert torch.allclose(x.grad, grad.clamp(-0.05, 0.05), atol=1e-5 * grad.abs().max())


def test_latent_gradient_reaches_rgb_through_vae(latent_prior):
    torch.manual_seed(2)
    cond, uncond = _text(latent_prior, 1)
    rgb = torch.rand(1, 24, 24, 3, requires_grad=True)  # renderer layout (B, H, W, 3), resized to 16
    out = SDSGuidance()(latent_prior, rgb, cond, uncond)
    out["loss_sds"].backward()
    assert rgb.grad.shape == rgb.shape and torch.isfinite(rgb.grad).all()
    assert rgb.grad.abs().sum() > 0
    assert 20 <= out["t"].item() <= 980


def test_pixel_gradient_is_exact_at_native_resolution(pixel_prior):
    torch.manual_seed(3)
    batch = 2
    cond, uncond = _text(pixel_prior, batch)
    rgb = torch.rand(batch, 16, 16, 3, requires_grad=True)
    t, noise = torch.tensor([250, 900]), torch.randn(batch, 3, 16, 16)
    SDSGuidance(guidance_scale=20.0)(pixel_prior, rgb, cond, uncond, t=t, noise=noise)["loss_sds"].backward()
    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    grad = _reference_grad(pixel_prior, x, cond, uncond, t, noise, 20.0)
    # x = 2·rgb − 1, so d loss / d rgb = 2 · grad / B, back in (B, H, W, 3) layout.
    expected = (2 * grad / batch).permute(0, 2, 3, 1)
    assert torch.allclose(rgb.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_timestep_sampling_range_and_annealing(pixel_prior):
    sds = SDSGuidance(min_step_percent=0.3, max_step_percent=0.4)
    torch.manual_seed(4)
    t = sds.sample_timesteps(pixel_prior, 2000)
    assert t.min() == 300 and t.max() == 400  # inclusive on both ends
    torch.manual_seed(4)
    assert torch.equal(sds.sample_timesteps(pixel_prior, 2000), t)  # global RNG: reproducible
    sds.set_max_step_percent(0.35)
    assert sds.sample_timesteps(pixel_prior, 500).max() <= 350
    assert SDSGuidance(max_step_percent=1.0).sample_timesteps(pixel_prior, 5000).max() <= 999
    with pytest.raises(ConfigError, match="max_step_percent=0.2"):
        sds.set_max_step_percent(0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_step_percent": 0.0}, "min_step_percent=0.0"),
        ({"min_step_percent": 0.5, "max_step_percent": 0.5}, "need 0 < min < max <= 1"),
        ({"max_step_percent": 1.5}, "max_step_percent=1.5"),
        ({"weighting": "sjc"}, "weighting='sjc'"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"grad_clip": 0.0}, "grad_clip=0.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SDSGuidance(**kwargs)
