"""SDS against an independent reference: the U-Net called directly with classifier-free guidance."""

import pytest
import torch

from helpers import NET_RTOL, assert_grad_close, cfg_amplification, text_pair as _text

from text23d.errors import ConfigError
from text23d.guidance.sds import SDSGuidance




def _reference_grad(prior, x, cond, uncond, t, noise, scale, weighting="sds", with_tol=False):
    """w(t)·(ε̂ − ε), written out from the paper, with separate cond / uncond U-Net calls; with
    with_tol, also the float32 tolerance for comparing it with a batched evaluation (helpers.py)."""
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=uncond).sample
    weight = 1 - alpha if weighting == "sds" else torch.ones_like(alpha)
    grad = weight * (eps_u + scale * (eps_c - eps_u) - noise)
    if not with_tol:
        return grad
    eps_scale = torch.maximum(eps_c.abs().max(), eps_u.abs().max()).item()
    return grad, NET_RTOL * cfg_amplification(scale) * weight.max().item() * eps_scale


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

    grad, tol = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 7.5, weighting, with_tol=True)
    # threestudio's bug: ε_c + s·(ε_c − ε_u), i.e. CFG s + 1. The tolerance must not hide it.
    wrong = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 8.5, weighting)
    # The loss is divided by the batch size: each view receives its own SDS gradient / B.
    assert_grad_close(x.grad * batch, grad, tol, wrong=wrong)
    # |Δ ½Σg²| ≤ Σ|g|·tol + ½N·tol² and |Δ‖g‖| ≤ √N·tol for elementwise errors ≤ tol.
    loss_tol = (grad.abs().sum().item() * tol + 0.5 * grad.numel() * tol**2) / batch
    assert abs(out["loss_sds"].item() - 0.5 * (grad**2).sum().item() / batch) <= loss_tol
    assert abs(out["grad_norm"].item() - grad.norm().item()) <= grad.numel() ** 0.5 * tol
    assert torch.equal(out["t"], t)


def test_view_guidance_scales_the_view_words_on_their_own(pixel_prior):
    """ε̂ = ε_u + s·(ε_y − ε_u) + s_v·(ε_c − ε_y) against three separate U-Net calls; s_v = s is plain CFG."""
    torch.manual_seed(5)
    emb = pixel_prior.encode_text(["a red cube, front view", "", "a red cube"])  # (3, L, D)
    cond, uncond, plain = (e[None].expand(2, -1, -1) for e in emb)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 3, 16, 16)
    sds = SDSGuidance(guidance_scale=7.5, view_guidance_scale=30.0)
    sds.from_model_space(pixel_prior, x, cond, uncond, t=t, noise=noise, text_plain=plain)["loss_sds"].backward()
    alpha = pixel_prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x.detach() + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        e_c, e_u, e_y = (pixel_prior.unet(x_t, t, encoder_hidden_states=e).sample for e in (cond, uncond, plain))
    expected = (1 - alpha) * (e_u + 7.5 * (e_y - e_u) + 30.0 * (e_c - e_y) - noise)
    # Rounding in the three predictions is amplified by |1 − s| + |s − s_v| + |s_v|.
    tol = NET_RTOL * (6.5 + 22.5 + 30.0) * max(e.abs().max().item() for e in (e_c, e_u, e_y))
    wrong = (1 - alpha) * (e_u + 7.5 * (e_c - e_u) - noise)  # the view words at the plain CFG scale
    assert_grad_close(x.grad * 2, expected, tol, wrong=wrong)

    x.grad = None  # s_v = s: exactly the CFG direction of the view caption (ε_y cancels)
    same = SDSGuidance(guidance_scale=7.5, view_guidance_scale=7.5)
    same.from_model_space(pixel_prior, x, cond, uncond, t=t, noise=noise, text_plain=plain)["loss_sds"].backward()
    tol = NET_RTOL * cfg_amplification(7.5) * 2 * max(e.abs().max().item() for e in (e_c, e_u, e_y))
    assert_grad_close(x.grad * 2, (1 - alpha) * (e_u + 7.5 * (e_c - e_u) - noise), tol)
    with pytest.raises(ConfigError, match="view_guidance_scale"):  # a system that passes no plain prompt
        sds.from_model_space(pixel_prior, x, cond, uncond, t=t, noise=noise)


def test_grad_clip_bounds(latent_prior):
    torch.manual_seed(1)
    cond, uncond = _text(latent_prior, 1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([600]), torch.randn(1, 4, 8, 8)
    sds = SDSGuidance(guidance_scale=100.0, grad_clip=0.05)
    sds.from_model_space(latent_prior, x, cond, uncond, t=t, noise=noise)["loss_sds"].backward()
    grad, tol = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 100.0, with_tol=True)
    assert grad.abs().max() > 0.05  # the clip is active in this case
    assert x.grad.abs().max() <= 0.05 + 1e-6
    assert_grad_close(x.grad, grad.clamp(-0.05, 0.05), tol, wrong=grad)  # wrong: no clip


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
    grad, tol = _reference_grad(pixel_prior, x, cond, uncond, t, noise, 20.0, with_tol=True)
    # x = 2·rgb − 1, so d loss / d rgb = 2 · grad / B, back in (B, H, W, 3) layout.
    to_rgb = lambda g: (2 * g / batch).permute(0, 2, 3, 1)  # noqa: E731
    wrong = _reference_grad(pixel_prior, x, cond, uncond, t, noise, 20.0, weighting="uniform")  # no w(t)
    assert_grad_close(rgb.grad, to_rgb(grad), 2 * tol / batch, wrong=to_rgb(wrong))


def test_timestep_sampling_range(pixel_prior):
    sds = SDSGuidance(min_step_percent=0.3, max_step_percent=0.4)
    torch.manual_seed(4)
    t = sds.sample_timesteps(pixel_prior, 2000)
    assert t.min() == 300 and t.max() == 400  # inclusive on both ends
    torch.manual_seed(4)
    assert torch.equal(sds.sample_timesteps(pixel_prior, 2000), t)  # global RNG: reproducible
    assert SDSGuidance(max_step_percent=1.0).sample_timesteps(pixel_prior, 5000).max() <= 999
    annealed = SDSGuidance(anneal_max_step_percent=0.5, anneal_at_fraction=0.4)
    assert annealed.max_step_at(39, 100) == 0.98 and annealed.max_step_at(40, 100) == 0.5
    assert annealed.sample_timesteps(pixel_prior, 2000, annealed.max_step_at(70, 100)).max() == 500


def test_max_t_as_a_ramp_is_threestudios_anneal(pixel_prior):
    """max_step_percent=[5000, 0.98, 0.5, 5001] (ProlificDreamer's geometry stage): 0.98 up to stage
    step 5,000, 0.5 from step 5,001, whatever the stage's length."""
    sds = SDSGuidance(max_step_percent=[5000, 0.98, 0.5, 5001])
    assert [sds.max_step_at(s, 15_000) for s in (None, 0, 5000, 5001, 14_999)] == [0.98, 0.98, 0.98, 0.5, 0.5]
    assert sds.max_step_at(6000, 100_000) == 0.5  # steps, not a fraction of the stage
    assert SDSGuidance(max_step_percent=[0, 0.9, 0.5, 100]).max_step_at(50, None) == pytest.approx(0.7)
    torch.manual_seed(4)
    assert sds.sample_timesteps(pixel_prior, 2000, sds.max_step_at(5001, None)).max() == 500
    with pytest.raises(ConfigError, match=r"max_step_percent=\[5000, 0.98, 0.5, 5001\] is a ramp and "
                                          r"anneal_max_step_percent=0.5 an anneal: use one"):
        SDSGuidance(max_step_percent=[5000, 0.98, 0.5, 5001], anneal_max_step_percent=0.5)
    with pytest.raises(ConfigError, match=r"a number or a ramp \[start_step, start_value, end_value, end_step\]"):
        SDSGuidance(max_step_percent=[5001, 0.98, 0.5, 5000])
    with pytest.raises(ConfigError, match=r"max_step_percent=\[0, 0.98, 1.5, 10\] is invalid"):
        SDSGuidance(max_step_percent=[0, 0.98, 1.5, 10])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_step_percent": 0.0}, "min_step_percent=0.0"),
        ({"min_step_percent": 0.5, "max_step_percent": 0.5}, "need 0 < min < max <= 1"),
        ({"max_step_percent": 1.5}, "max_step_percent=1.5"),
        ({"min_step_percent": 0.3, "max_step_percent": 0.2}, "max_step_percent=0.2"),
        ({"anneal_max_step_percent": 0.01}, "anneal_max_step_percent=0.01"),
        ({"weighting": "sjc"}, "weighting='sjc'"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"grad_clip": 0.0}, "grad_clip=0.0"),
        ({"view_guidance_scale": -1.0}, "view_guidance_scale=-1.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SDSGuidance(**kwargs)
