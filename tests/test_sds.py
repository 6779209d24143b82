"""SDS against an independent reference: the U-Net called directly with classifier-free guidance."""

import pytest
import torch

from helpers import NET_RTOL, assert_grad_close, cfg_amplification, text_pair as _text

from text23d.errors import ConfigError
from text23d.guidance.base import Text
from text23d.guidance.cfg import guided_noise
from text23d.guidance.sds import SDSGuidance

from tests.helpers import check_settings




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
    out = sds.from_model_space(latent_prior, x, Text(cond, uncond), t=t, noise=noise)
    out.loss.backward()

    grad, tol = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 7.5, weighting, with_tol=True)
    # threestudio's bug: ε_c + s·(ε_c − ε_u), i.e. CFG s + 1. The tolerance must not hide it.
    wrong = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 8.5, weighting)
    # The loss is divided by the batch size: each view receives its own SDS gradient / B.
    assert_grad_close(x.grad * batch, grad, tol, wrong=wrong)
    # |Δ ½Σg²| ≤ Σ|g|·tol + ½N·tol² and |Δ‖g‖| ≤ √N·tol for elementwise errors ≤ tol.
    loss_tol = (grad.abs().sum().item() * tol + 0.5 * grad.numel() * tol**2) / batch
    assert abs(out.loss.item() - 0.5 * (grad**2).sum().item() / batch) <= loss_tol
    assert abs(out.grad_norm.item() - grad.norm().item()) <= grad.numel() ** 0.5 * tol
    assert torch.equal(out.t, t)


def test_view_guidance_scales_the_view_words_on_their_own(pixel_prior):
    """ε̂ = ε_u + s·(ε_y − ε_u) + s_v·(ε_c − ε_y) against three separate U-Net calls; s_v = s is plain CFG."""
    torch.manual_seed(5)
    emb = pixel_prior.encode_text(["a red cube, front view", "", "a red cube"])  # (3, L, D)
    cond, uncond, plain = (e[None].expand(2, -1, -1) for e in emb)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 3, 16, 16)
    sds = SDSGuidance(guidance_scale=7.5, view_guidance_scale=30.0)
    sds.from_model_space(pixel_prior, x, Text(cond, uncond, plain), t=t, noise=noise).loss.backward()
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
    same.from_model_space(pixel_prior, x, Text(cond, uncond, plain), t=t, noise=noise).loss.backward()
    tol = NET_RTOL * cfg_amplification(7.5) * 2 * max(e.abs().max().item() for e in (e_c, e_u, e_y))
    assert_grad_close(x.grad * 2, (1 - alpha) * (e_u + 7.5 * (e_c - e_u) - noise), tol)
    with pytest.raises(ConfigError, match="view_guidance_scale"):  # a system that passes no plain prompt
        sds.from_model_space(pixel_prior, x, Text(cond, uncond), t=t, noise=noise)


def test_grad_clip_bounds(latent_prior):
    torch.manual_seed(1)
    cond, uncond = _text(latent_prior, 1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([600]), torch.randn(1, 4, 8, 8)
    sds = SDSGuidance(guidance_scale=100.0, grad_clip=0.05)
    sds.from_model_space(latent_prior, x, Text(cond, uncond), t=t, noise=noise).loss.backward()
    grad, tol = _reference_grad(latent_prior, x.detach(), cond, uncond, t, noise, 100.0, with_tol=True)
    assert grad.abs().max() > 0.05  # the clip is active in this case
    assert x.grad.abs().max() <= 0.05 + 1e-6
    assert_grad_close(x.grad, grad.clamp(-0.05, 0.05), tol, wrong=grad)  # wrong: no clip


def test_latent_gradient_reaches_rgb_through_vae(latent_prior):
    torch.manual_seed(2)
    cond, uncond = _text(latent_prior, 1)
    rgb = torch.rand(1, 24, 24, 3, requires_grad=True)  # renderer layout (B, H, W, 3), resized to 16
    out = SDSGuidance()(latent_prior, rgb, Text(cond, uncond))
    out.loss.backward()
    assert rgb.grad.shape == rgb.shape and torch.isfinite(rgb.grad).all()
    assert rgb.grad.abs().sum() > 0
    assert 20 <= out.t.item() <= 980


def test_pixel_gradient_is_exact_at_native_resolution(pixel_prior):
    torch.manual_seed(3)
    batch = 2
    cond, uncond = _text(pixel_prior, batch)
    rgb = torch.rand(batch, 16, 16, 3, requires_grad=True)
    t, noise = torch.tensor([250, 900]), torch.randn(batch, 3, 16, 16)
    SDSGuidance(guidance_scale=20.0)(pixel_prior, rgb, Text(cond, uncond), t=t, noise=noise).loss.backward()
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
        check_settings(SDSGuidance, max_step_percent=[5000, 0.98, 0.5, 5001], anneal_max_step_percent=0.5)
    with pytest.raises(ConfigError, match=r"a ramp's steps must be in order, 0 ≤ start_step ≤ end_step"):
        check_settings(SDSGuidance, max_step_percent=[5001, 0.98, 0.5, 5000])
    with pytest.raises(ConfigError, match=r"max_step_percent=\[0, 0.98, 1.5, 10\] is invalid"):
        check_settings(SDSGuidance, max_step_percent=[0, 0.98, 1.5, 10])


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
        check_settings(SDSGuidance, **kwargs)


def test_defaults_are_dreamfusions(pixel_prior):
    """SDSGuidance() is DreamFusion's SDS: CFG 100, w(t) = 1 − ᾱ_t, t ~ U{20, ..., 980} of T = 1000."""
    sds = SDSGuidance()
    assert (sds.guidance_scale, sds.weighting, sds.min_step_percent, sds.max_step_percent) == (100.0, "sds", 0.02, 0.98)
    assert sds.grad_clip is None and sds.view_guidance_scale is None and sds.anneal_max_step_percent is None
    assert sds.anneal_at_fraction == 0.5  # where an anneal, once set, starts
    assert [SDSGuidance(anneal_max_step_percent=0.5).max_step_at(s, 100) for s in (49, 50)] == [0.98, 0.5]
    torch.manual_seed(11)
    t = sds.sample_timesteps(pixel_prior, 20_000)
    assert t.min() == 20 and t.max() == 980


def test_timestep_range_reaches_t_minus_one_and_no_further(pixel_prior):
    """max_step_percent = 1: t up to T − 1 = 999 (the last index of ᾱ), never T."""
    torch.manual_seed(12)
    t = SDSGuidance(min_step_percent=0.9, max_step_percent=1.0).sample_timesteps(pixel_prior, 5000)
    assert t.min() == 900 and t.max() == 999


def test_max_step_at_without_the_step_or_the_stage_length():
    annealed = SDSGuidance(anneal_max_step_percent=0.5, anneal_at_fraction=0.4)
    # No stage length (or no step): the anneal cannot be placed, so max t stays max_step_percent.
    assert annealed.max_step_at(70, None) == 0.98 and annealed.max_step_at(None, 100) == 0.98
    assert SDSGuidance().max_step_at(70, 100) == 0.98  # no anneal configured


def test_ramp_is_linear_between_its_steps_and_constant_outside():
    ramp = SDSGuidance(max_step_percent=[100, 0.9, 0.5, 200])
    values = [ramp.max_step_at(s, None) for s in (0, 50, 100, 150, 175, 200, 300)]
    assert values == pytest.approx([0.9, 0.9, 0.9, 0.7, 0.6, 0.5, 0.5])
    jump = SDSGuidance(max_step_percent=[100, 0.98, 0.5, 100])  # start step = end step: a jump at that step
    assert [jump.max_step_at(s, None) for s in (99, 100, 101)] == [0.98, 0.5, 0.5]


def test_annealed_max_t_reaches_the_sampled_timesteps_through_the_call(pixel_prior):
    """step / max_steps passed to __call__ lower the sampled t once step ≥ anneal_at_fraction · max_steps."""
    torch.manual_seed(13)
    batch = 32
    cond, uncond = _text(pixel_prior, batch)
    rgb = torch.rand(batch, 16, 16, 3)
    sds = SDSGuidance(guidance_scale=7.5, anneal_max_step_percent=0.3, anneal_at_fraction=0.5)
    late = sds(pixel_prior, rgb, Text(cond, uncond), step=60, max_steps=100).t
    early = sds(pixel_prior, rgb, Text(cond, uncond), step=40, max_steps=100).t
    assert 20 <= late.min() and late.max() <= 300
    assert early.max() > 300  # 32 draws from U{20, ..., 980}: all ≤ 300 has probability (281/961)^32 < 1e-16


def test_call_passes_the_plain_prompt_for_view_guidance(pixel_prior):
    """__call__ (renderer layout) and from_model_space (x = 2·rgb − 1 at native size) agree with view guidance on."""
    torch.manual_seed(14)
    emb = pixel_prior.encode_text(["a red cube, front view", "", "a red cube"])
    cond, uncond, plain = (e[None].expand(2, -1, -1) for e in emb)
    rgb = torch.rand(2, 16, 16, 3)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 3, 16, 16)
    sds = SDSGuidance(guidance_scale=7.5, view_guidance_scale=30.0)
    a = sds(pixel_prior, rgb, Text(cond, uncond, plain), t=t, noise=noise)
    b = sds.from_model_space(pixel_prior, rgb.permute(0, 3, 1, 2) * 2 - 1, Text(cond, uncond, plain), t=t, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, t)


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (16, 16, 3), (1, 16, 16, 4)])
def test_rgb_outside_renderer_layout_is_rejected(pixel_prior, shape):
    cond, uncond = _text(pixel_prior, 1)
    with pytest.raises(ValueError, match=r"renderer layout \(B, H, W, 3\)"):
        SDSGuidance()(pixel_prior, torch.rand(shape), Text(cond, uncond))


def test_nonfinite_prediction_is_flagged_and_its_gradient_made_finite(pixel_prior):
    """A NaN in one view (here a NaN in its noise) sets "nonfinite" and zeroes that view's gradient
    where it is NaN; the other view keeps its own SDS gradient, the loss and grad norm stay finite."""
    torch.manual_seed(15)
    cond, uncond = _text(pixel_prior, 2)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t, noise = torch.tensor([300, 600]), torch.randn(2, 3, 16, 16)
    sds = SDSGuidance(guidance_scale=7.5)
    clean = sds.from_model_space(pixel_prior, x, Text(cond, uncond), t=t, noise=noise)
    assert not clean.nonfinite
    noise[0, 0, 0, 0] = float("nan")
    out = sds.from_model_space(pixel_prior, x, Text(cond, uncond), t=t, noise=noise)
    assert out.nonfinite
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
    grad, tol = _reference_grad(pixel_prior, x.detach()[1:], cond[1:], uncond[1:], t[1:], noise[1:], 7.5, with_tol=True)
    assert_grad_close(x.grad[1:] * 2, grad, tol)


def test_guidance_runs_on_the_priors_device(tiny_pixel_model):
    """t, ε and the loss live on the prior's device (PyTorch's "meta" device: shapes without data, so
    no GPU is needed to see a tensor left on the CPU)."""
    from text23d.prior.loading import load_prior

    prior = load_prior(str(tiny_pixel_model))
    cond, uncond = (e.to("meta") for e in _text(prior, 2))
    prior.to("meta")
    sds = SDSGuidance()
    assert sds.sample_timesteps(prior, 3).device.type == "meta"
    x = torch.zeros(2, 3, 16, 16, device="meta", requires_grad=True)
    for t in (None, [100, 200]):
        out = sds.from_model_space(prior, x, Text(cond, uncond), t=t)
        assert {v.device.type for v in (out.loss, out.grad_norm, out.nonfinite, out.t, out.x0)} == {"meta"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 0.0}, {"guidance_scale": 0.5}, {"grad_clip": 0.5}, {"view_guidance_scale": 0.0},
        {"view_guidance_scale": 0.5}, {"anneal_max_step_percent": 1.0}, {"anneal_at_fraction": 0.0},
        {"anneal_at_fraction": 1.0}, {"max_step_percent": [100, 0.98, 0.5, 100]},
    ],
)
def test_boundary_arguments_are_accepted_and_kept(kwargs):
    sds = SDSGuidance(**kwargs)
    for key, value in kwargs.items():
        assert (sds.max_step_ramp == tuple(value)) if isinstance(value, list) else (getattr(sds, key) == value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"anneal_max_step_percent": 1.5}, "anneal_max_step_percent=1.5"),
        ({"anneal_max_step_percent": 0.02}, "anneal_max_step_percent=0.02"),  # = min: an empty range
        ({"anneal_at_fraction": 1.5}, "anneal_at_fraction=1.5"),
        ({"anneal_at_fraction": -0.1}, "anneal_at_fraction=-0.1"),
        ({"max_step_percent": [0, 0.98, 0.5]}, "a number or a ramp"),
        ({"max_step_percent": [0, "0.98", 0.5, 10]}, "a number or a ramp"),
        ({"max_step_percent": [True, 0.98, 0.5, 10]}, "a number or a ramp"),
        ({"max_step_percent": [0, 1.5, 0.5, 10]}, r"max_step_percent=\[0, 1.5, 0.5, 10\] is invalid"),
        ({"max_step_percent": [-1, 0.98, 0.5, 10]}, "0 ≤ start_step ≤ end_step"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_settings(SDSGuidance, **kwargs)


def test_cfg_of_four_views_against_separate_calls(pixel_prior):
    """guided_noise on B = 4 views with their own prompts and t: each view's ε̂ from its own
    predictions, for plain CFG and for view guidance (one batched U-Net call of 2B or 3B rows)."""
    torch.manual_seed(16)
    emb = pixel_prior.encode_text(["a red cube, front view", "a blue sphere, side view", "", "a red cube", "a blue sphere"])
    cond, uncond, plain = emb[[0, 1, 0, 1]], emb[[2, 2, 2, 2]], emb[[3, 4, 3, 4]]
    x_t, t = torch.randn(4, 3, 16, 16), torch.tensor([50, 300, 600, 950])
    with torch.no_grad():
        e_c, e_u, e_y = (pixel_prior.unet(x_t, t, encoder_hidden_states=e).sample for e in (cond, uncond, plain))
        plain_cfg = guided_noise(pixel_prior, x_t, t, cond, uncond, 7.5)
        view_cfg = guided_noise(pixel_prior, x_t, t, cond, uncond, 7.5, 30.0, plain)
    eps_scale = max(e.abs().max().item() for e in (e_c, e_u, e_y))
    expected = e_u + 7.5 * (e_c - e_u)
    assert_grad_close(plain_cfg, expected, NET_RTOL * cfg_amplification(7.5) * eps_scale, wrong=e_c)
    tol = NET_RTOL * (6.5 + 22.5 + 30.0) * eps_scale
    assert_grad_close(view_cfg, e_u + 7.5 * (e_y - e_u) + 30.0 * (e_c - e_y), tol, wrong=expected)


def test_what_a_guidance_declares():
    """The system reads these, never the class: the loss term's name (lambda_<name>, train/loss_<name>),
    whether it learns from the renders (VSD's LoRA), and the prompt without view words only when the
    view words have a scale of their own. A refused CFG names the method's usual value."""
    from text23d.guidance.vsd import VSDGuidance

    assert (SDSGuidance.name, VSDGuidance.name) == ("sds", "vsd")
    assert VSDGuidance.learns_from_renders and not SDSGuidance.learns_from_renders
    for kind in (SDSGuidance, VSDGuidance):
        assert "text_plain" not in kind().needs and "text_plain" in kind(view_guidance_scale=30.0).needs
        assert {"rgb", "text"} <= kind(view_guidance_scale=30.0).needs
    assert VSDGuidance(view_guidance_scale=30.0).needs >= {"camera_pose", "lora_training"}
    for kind, usual in ((SDSGuidance, r"100 \(SDS on Stable Diffusion; 20 on DeepFloyd IF; 7.5 on the built-in prior"),
                        (VSDGuidance, "7.5$")):
        with pytest.raises(ConfigError, match=rf"Fix: e.g. guidance.guidance_scale={usual}"):
            check_settings(kind, guidance_scale=-1.0)


def test_the_output_names_its_term(pixel_prior):
    cond, uncond = _text(pixel_prior, 1)
    out = SDSGuidance()(pixel_prior, torch.rand(1, 16, 16, 3), Text(cond, uncond))
    assert out.name == "sds" and out.x0.shape == (1, 3, 16, 16) and not out.x0.requires_grad
