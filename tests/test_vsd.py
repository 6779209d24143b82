"""VSD and its camera-LoRA score model on the tiny models, against formulas written out here:
the prior's U-Net and the LoRA copy's U-Net are called directly, with classifier-free guidance."""

import copy
import math

import pytest
import torch

from helpers import NET_RTOL, assert_grad_close, cams_of, cfg_amplification, text_pair as _text

from text23d.errors import CheckpointError, ConfigError
from text23d.guidance.base import Text
from text23d.guidance.lora import CameraLoRAUNet, load_lora_safetensors
from text23d.guidance.sds import SDSGuidance
from text23d.guidance.vsd import VSDGuidance, _check_compatible
from text23d.testing import build_tiny_model

from tests.helpers import check_settings


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored after): on a busy 2-core machine the tiny
    U-Net's many small ops ran ~4x slower with 2 threads (61 s vs 13 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _poses(batch, seed=0):
    """Random camera-to-world matrices (B, 4, 4): a rotation and a translation at distance ~2."""
    gen = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(batch, 3, 3, generator=gen))
    c2w = torch.eye(4).repeat(batch, 1, 1)
    c2w[:, :3, :3] = rot
    c2w[:, :3, 3] = 2 * rot[:, :, 2]
    return c2w


def _perturb_lora(lora, seed=0):
    """Random LoRA B matrices and camera MLP, so that ε̂_φ differs from the base model's prediction."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _reference_grad(prior, lora, x, cond, uncond, c2w, t, noise, scale, lora_scale, weighting):
    """w(t)·(ε̂_pretrained − ε̂_φ) from eq. 9, with one U-Net call per branch, and the float32
    tolerance for comparing it with the guidance's batched calls (tests/helpers.py)."""
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
    labels = c2w.reshape(-1, 16)
    with torch.no_grad():
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=uncond).sample
        lora_c = lora.unet(x_t, t, encoder_hidden_states=cond, class_labels=labels).sample
        lora_u = lora.unet(x_t, t, encoder_hidden_states=cond, class_labels=torch.zeros_like(labels)).sample
    weight = 1 - alpha if weighting == "sds" else torch.ones_like(alpha)
    eps_pretrained = eps_u + scale * (eps_c - eps_u)
    eps_lora = lora_u + lora_scale * (lora_c - lora_u)  # camera-free branch as "unconditional"
    eps_scale = max(v.abs().max().item() for v in (eps_c, eps_u, lora_c, lora_u))
    tol = NET_RTOL * (cfg_amplification(scale) + cfg_amplification(lora_scale)) * weight.max().item() * eps_scale
    return weight * (eps_pretrained - eps_lora), tol


def test_vsd_gradient_parity_pixel_through_rgb(pixel_prior):
    torch.manual_seed(0)
    batch = 2
    cond, uncond = _text(pixel_prior, batch)
    vsd = VSDGuidance(guidance_scale=7.5)
    _perturb_lora(vsd.setup(pixel_prior))
    rgb = torch.rand(batch, 16, 16, 3, requires_grad=True)  # native resolution: x = 2·rgb − 1 exactly
    c2w, t, noise = _poses(batch), torch.tensor([250, 900]), torch.randn(batch, 3, 16, 16)
    out = vsd(pixel_prior, rgb, Text(cond, uncond), cams_of(c2w), t=t, noise=noise)
    out.loss.backward()

    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    grad, tol = _reference_grad(pixel_prior, vsd.lora, x, cond, uncond, c2w, t, noise, 7.5, 1.0, "sds")
    # A wrong formula must fail: threestudio's CFG of s + 1.
    wrong, _ = _reference_grad(pixel_prior, vsd.lora, x, cond, uncond, c2w, t, noise, 8.5, 1.0, "sds")
    to_rgb = lambda g: (2 * g / batch).permute(0, 2, 3, 1)  # noqa: E731  d x / d rgb = 2; loss / B
    assert_grad_close(rgb.grad, to_rgb(grad), 2 * tol / batch, wrong=to_rgb(wrong))
    assert abs(out.grad_norm.item() - grad.norm().item()) <= grad.numel() ** 0.5 * tol
    assert torch.equal(out.t, t)
    assert torch.equal(out.x0, x) and not out.x0.requires_grad  # what the LoRA trains on


def test_vsd_view_guidance_in_the_pretrained_term(pixel_prior):
    """With view_guidance_scale the pretrained term is ε_u + s·(ε_y − ε_u) + s_v·(ε_c − ε_y) (cfg.py);
    the LoRA term is untouched. Checked against separate U-Net calls."""
    torch.manual_seed(6)
    batch = 2
    emb = pixel_prior.encode_text(["a red cube, front view", "", "a red cube"])
    cond, uncond, plain = (e[None].expand(batch, -1, -1) for e in emb)
    vsd = VSDGuidance(guidance_scale=7.5, view_guidance_scale=30.0)
    _perturb_lora(vsd.setup(pixel_prior))
    x = torch.randn(batch, 3, 16, 16, requires_grad=True)
    c2w, t, noise = _poses(batch), torch.tensor([300, 700]), torch.randn(batch, 3, 16, 16)
    vsd.from_model_space(pixel_prior, x, Text(cond, uncond, plain), cams_of(c2w), t=t, noise=noise).loss.backward()
    plain_cfg, tol = _reference_grad(pixel_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 1.0, "sds")
    alpha = pixel_prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x.detach() + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        e_c, e_u, e_y = (pixel_prior.unet(x_t, t, encoder_hidden_states=e).sample for e in (cond, uncond, plain))
    # Replace plain CFG's pretrained term by the compositional one: the LoRA term stays as it is.
    expected = plain_cfg + (1 - alpha) * ((e_u + 7.5 * (e_y - e_u) + 30.0 * (e_c - e_y)) - (e_u + 7.5 * (e_c - e_u)))
    tol *= (6.5 + 22.5 + 30.0 + 1.0) / (cfg_amplification(7.5) + 1.0)  # three predictions, amplified
    assert_grad_close(x.grad * batch, expected, tol, wrong=plain_cfg)
    with pytest.raises(ConfigError, match="view_guidance_scale"):
        vsd.from_model_space(pixel_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise)


def test_vsd_gradient_parity_latent_with_lora_cfg(latent_prior):
    torch.manual_seed(1)
    batch = 2
    cond, uncond = _text(latent_prior, batch)
    vsd = VSDGuidance(guidance_scale=7.5, lora_guidance_scale=2.0, weighting="uniform")
    _perturb_lora(vsd.setup(latent_prior), seed=1)
    x = torch.randn(batch, 4, 8, 8, requires_grad=True)
    c2w, t, noise = _poses(batch, 1), torch.tensor([100, 700]), torch.randn(batch, 4, 8, 8)
    out = vsd.from_model_space(latent_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise)
    out.loss.backward()
    grad, tol = _reference_grad(
        latent_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 2.0, "uniform"
    )
    # A wrong formula must fail: the LoRA's camera CFG ignored (scale 1 instead of 2).
    wrong, _ = _reference_grad(latent_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 1.0, "uniform")
    assert_grad_close(x.grad * batch, grad, tol, wrong=wrong)
    # |Δ ½Σg²| ≤ Σ|g|·tol + ½N·tol² for elementwise errors ≤ tol.
    loss_tol = (grad.abs().sum().item() * tol + 0.5 * grad.numel() * tol**2) / batch
    assert abs(out.loss.item() - 0.5 * (grad**2).sum().item() / batch) <= loss_tol


def test_fresh_lora_is_the_base_model_so_vsd_is_sds_with_eps_hat_for_eps(latent_prior):
    torch.manual_seed(2)
    batch = 2
    cond, uncond = _text(latent_prior, batch)
    vsd = VSDGuidance(guidance_scale=7.5)
    lora = vsd.setup(latent_prior)
    x_t, t, c2w = torch.randn(batch, 4, 8, 8), torch.tensor([30, 600]), _poses(batch, 2)
    with torch.no_grad():
        base = latent_prior.predict_noise(x_t, t, cond)
        assert torch.equal(lora.predict_noise(x_t, t, cond, c2w), base)  # B = 0 and zero camera MLP
        assert torch.equal(lora.predict_noise(x_t, t, cond, torch.zeros_like(c2w)), base)

    # With one particle and an untrained LoRA: grad_VSD = grad_SDS + w(t)·(ε − ε̂_base(x_t; y, t)).
    x = torch.randn(batch, 4, 8, 8)
    noise = torch.randn(batch, 4, 8, 8)
    grads = []
    for guidance, args in ((vsd, (cams_of(c2w),)), (SDSGuidance(guidance_scale=7.5), ())):
        xg = x.clone().requires_grad_(True)
        out = guidance.from_model_space(latent_prior, xg, Text(cond, uncond), *args, t=t, noise=noise)
        out.loss.backward()
        grads.append(xg.grad * batch)
    alpha = latent_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        difference = (1 - alpha) * (noise - latent_prior.predict_noise(x_t, t, cond))
    assert torch.allclose(grads[0], grads[1] + difference, rtol=1e-4, atol=1e-5 * difference.abs().max())


@pytest.fixture(scope="module")
def trained(pixel_prior):
    """A VSD whose LoRA took 4 AdamW steps (lr 1e-3) on a fixed batch of renders, with the prior's
    U-Net snapshot from before anything was built."""
    before = {k: v.clone() for k, v in pixel_prior.unet.state_dict().items()}
    vsd = VSDGuidance(lora_lr=1e-3)
    lora = vsd.setup(pixel_prior)
    initial = lora.trainable_state_dict()
    cond, _ = _text(pixel_prior, 2)
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1)  # "renders" in model space
    c2w = _poses(2, 3)

    def loss():
        torch.manual_seed(123)  # the same t, ε and camera-drop draws every time: a fixed batch
        return vsd.learn(x0, Text(cond, cond), cams_of(c2w))

    with torch.no_grad():
        losses = [loss().item()]
    opt = vsd.lora_optimizer()
    for _ in range(4):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        losses.append(loss().item())
    return dict(vsd=vsd, before=before, initial=initial, losses=losses, cond=cond)


def test_lora_training_moves_the_copy_and_never_the_prior(pixel_prior, trained):
    first, last = trained["losses"]
    assert last < first
    after = trained["vsd"].lora.trainable_state_dict()
    assert after.keys() == trained["initial"].keys()
    moved = {k for k in after if not torch.equal(after[k], trained["initial"][k])}
    assert any(".lora_B." in k for k in moved) and any(".lora_A." in k for k in moved)
    assert "unet.class_embedding.2.weight" in moved and "unet.class_embedding.0.weight" in moved
    assert all(v.dtype == torch.float32 for v in after.values())

    unet = pixel_prior.unet
    state = unet.state_dict()
    assert state.keys() == trained["before"].keys()
    assert all(torch.equal(state[k], trained["before"][k]) for k in state)  # bit-identical
    assert not any("lora" in name for name, _ in unet.named_modules())
    assert getattr(unet, "peft_config", None) is None and not getattr(unet, "_hf_peft_config_loaded", False)
    assert unet.class_embedding is None
    assert not any(p.requires_grad for p in unet.parameters())


def test_camera_changes_the_trained_lora_prediction(trained):
    lora, cond = trained["vsd"].lora, trained["cond"][:1]
    torch.manual_seed(4)
    x_t, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        cameras = (_poses(1, 5), _poses(1, 6), torch.zeros(1, 4, 4))  # two poses and "no camera"
        a, b, none = (lora.predict_noise(x_t, t, cond, c) for c in cameras)
    assert (a - b).abs().max() > 1e-4 * a.abs().max()
    assert (a - none).abs().max() > 1e-4 * a.abs().max()


def test_safetensors_round_trip_restores_outputs(pixel_prior, trained, tmp_path):
    lora = trained["vsd"].lora
    path = tmp_path / "lora" / "lora.safetensors"
    lora.save_safetensors(path, {"prompt": "a red cube", "step": "4"})
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))  # atomic: no temp file left
    state, meta = load_lora_safetensors(path)
    assert meta["prompt"] == "a red cube" and meta["rank"] == "4" and meta["prediction_type"] == "epsilon"

    fresh = CameraLoRAUNet(pixel_prior.unet, pixel_prior.alphas_cumprod, pixel_prior.prediction_type)
    fresh.load_trainable_state_dict(state)
    torch.manual_seed(5)
    x_t, t, c2w = torch.randn(1, 3, 16, 16), torch.tensor([300]), _poses(1, 7)
    cond = trained["cond"][:1]
    with torch.no_grad():
        assert torch.equal(fresh.predict_noise(x_t, t, cond, c2w), lora.predict_noise(x_t, t, cond, c2w))

    wider = CameraLoRAUNet(pixel_prior.unet, pixel_prior.alphas_cumprod, rank=8)
    with pytest.raises(CheckpointError, match="lora_rank"):
        wider.load_trainable_state_dict(state)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora_safetensors(tmp_path / "missing.safetensors")


def test_lora_weights_stay_float32_on_a_bfloat16_base(pixel_prior):
    base = copy.deepcopy(pixel_prior.unet).to(torch.bfloat16)
    lora = CameraLoRAUNet(base, pixel_prior.alphas_cumprod)
    assert {p.dtype for p in lora.trainable_parameters()} == {torch.float32}
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and base.dtype == torch.bfloat16
    cond, _ = _text(pixel_prior, 1)
    with torch.no_grad():
        eps = lora.predict_noise(torch.randn(1, 3, 16, 16), torch.tensor([400]), cond, _poses(1))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_v_prediction_lora_base(pixel_prior, tmp_path):
    folder = build_tiny_model(tmp_path / "v", kind="pixel", seed=1, prediction_type="v_prediction")
    vsd = VSDGuidance(lora_pretrained_model_name_or_path=str(folder), camera_drop_prob=0.5)
    lora = vsd.setup(pixel_prior)
    assert lora.prediction_type == "v_prediction"
    _perturb_lora(lora, seed=8)
    batch = 2
    cond, _ = _text(pixel_prior, batch)
    x_t, t, c2w = torch.randn(batch, 3, 16, 16), torch.tensor([50, 800]), _poses(batch, 8)
    alpha = lora.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        v = lora.unet(x_t, t, encoder_hidden_states=cond, class_labels=c2w.reshape(batch, 16)).sample
        eps = lora.predict_noise(x_t, t, cond, c2w)
    assert torch.allclose(eps, alpha.sqrt() * v + (1 - alpha).sqrt() * x_t, rtol=1e-5, atol=1e-6)

    # diffusion_loss: t, then ε, then the camera-drop draw from the global RNG; the target is v.
    x0 = torch.rand(batch, 3, 16, 16) * 2 - 1
    torch.manual_seed(9)
    with torch.no_grad():
        loss = vsd.learn(x0, Text(cond, cond), cams_of(c2w))
    torch.manual_seed(9)
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn(x0.shape)
    drop = torch.rand(batch) < 0.5
    labels = torch.where(drop[:, None], 0.0, c2w.reshape(batch, 16))
    alpha = lora.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    with torch.no_grad():
        pred = lora.unet(x_t, t, encoder_hidden_states=cond, class_labels=labels).sample
    assert torch.allclose(loss, ((pred - target) ** 2).mean(), rtol=1e-5)


def test_lora_base_of_another_space_is_rejected(latent_prior, tiny_pixel_model):
    vsd = VSDGuidance(lora_pretrained_model_name_or_path=str(tiny_pixel_model))
    with pytest.raises(ConfigError, match=r"pixel space, 3 channels.*latent space, 4 channels"):
        vsd.setup(latent_prior)


def test_annealing_schedule(pixel_prior):
    vsd = VSDGuidance()  # 0.98 → 0.5 at 20% of the run (ProlificDreamer: after 5k of 25k steps)
    assert vsd.max_step_at(None, None) == 0.98
    assert vsd.max_step_at(0, 25_000) == 0.98
    assert vsd.max_step_at(4_999, 25_000) == 0.98
    assert vsd.max_step_at(5_000, 25_000) == 0.5
    assert vsd.max_step_at(24_999, 25_000) == 0.5
    assert VSDGuidance(anneal_max_step_percent=None).max_step_at(20_000, 25_000) == 0.98
    assert vsd.max_step_at(20_000, None) == 0.98  # run length unknown: no anneal
    ramp = VSDGuidance(max_step_percent=[5000, 0.98, 0.5, 5001], anneal_max_step_percent=None)
    assert ramp.max_step_at(None, None) == 0.98 and ramp.max_step_at(6000, None) == 0.5  # step unknown: the start
    torch.manual_seed(10)
    late = vsd.sample_timesteps(pixel_prior, 4000, vsd.max_step_at(6_000, 25_000))
    early = vsd.sample_timesteps(pixel_prior, 4000, vsd.max_step_at(10, 25_000))
    assert late.min() == 20 and late.max() == 500 and early.max() == 980


def test_the_configured_anneal_is_at_step_5000_of_every_stage():
    """conf/guidance/vsd.yaml: threestudio's ramp, so a 30,000-step texture stage anneals at 5,000 too."""
    from hydra.utils import instantiate

    from helpers import compose_cfg

    vsd = instantiate(compose_cfg(["prompt=x", "system=vsd", "prior=sd15"]).guidance)
    assert [vsd.max_step_at(s, 30_000) for s in (5000, 5001, 6000)] == [0.98, 0.5, 0.5]


def test_vsd_needs_setup(pixel_prior):
    cond, uncond = _text(pixel_prior, 1)
    with pytest.raises(RuntimeError, match="setup"):
        VSDGuidance()(pixel_prior, torch.rand(1, 16, 16, 3), Text(cond, uncond), cams_of(_poses(1)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"lora_guidance_scale": -0.5}, "lora_guidance_scale=-0.5"),
        ({"min_step_percent": 0.0}, "min_step_percent=0.0"),
        ({"max_step_percent": 1.5}, "max_step_percent=1.5"),
        ({"anneal_max_step_percent": 0.01}, "anneal_max_step_percent=0.01"),
        ({"anneal_at_fraction": 1.5}, "anneal_at_fraction=1.5"),
        ({"weighting": "sjc"}, "weighting='sjc'"),
        ({"grad_clip": 0.0}, "grad_clip=0.0"),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_lr": 0.0}, "lora_lr=0.0"),
        ({"lora_steps": 0}, "lora_steps=0"),
        ({"camera_drop_prob": math.nan}, "camera_drop_prob=nan"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_settings(VSDGuidance, **kwargs)


def test_a_missing_lora_base_names_its_own_key(pixel_prior, tmp_path):
    # ProlificDreamer on sd21base defaults its LoRA base to SD 2.1: offline, the message must point at
    # guidance.lora_pretrained_model_name_or_path, not at the prior's key.
    from text23d.errors import PriorLoadError

    vsd = VSDGuidance(lora_pretrained_model_name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(PriorLoadError, match=r"^the LoRA base \(guidance.lora_pretrained_model_name_or_path\): .*"
                       r"guidance.lora_pretrained_model_name_or_path=/path/to/model\. Or .*=null: a LoRA on a copy") as e:
        vsd.setup(pixel_prior)
    assert "prior.pretrained_model_name_or_path" not in str(e.value)


def test_defaults_are_prolificdreamers(pixel_prior):
    """VSDGuidance(): CFG 7.5, t ~ U{20, ..., 980} then max t 0.5 after 20 % of the run, a rank-4 LoRA
    trained by AdamW at 1e-4, one LoRA step per 3D step, the camera dropped for 10 % of its views."""
    vsd = VSDGuidance()
    assert (vsd.guidance_scale, vsd.lora_guidance_scale, vsd.weighting, vsd.grad_clip) == (7.5, 1.0, "sds", None)
    assert (vsd.min_step_percent, vsd.max_step_percent, vsd.anneal_max_step_percent, vsd.anneal_at_fraction) == (
        0.02, 0.98, 0.5, 0.2)
    assert (vsd.lora_rank, vsd.lora_lr, vsd.lora_steps, vsd.camera_drop_prob) == (4, 1e-4, 1, 0.1)
    assert vsd.lora_pretrained_model_name_or_path is None and vsd.view_guidance_scale is None and vsd.lora is None
    torch.manual_seed(20)
    t = vsd.sample_timesteps(pixel_prior, 20_000)  # no max given: max_step_percent
    assert t.min() == 20 and t.max() == 980
    torch.manual_seed(21)
    t = VSDGuidance(min_step_percent=0.9, max_step_percent=1.0, anneal_max_step_percent=None).sample_timesteps(
        pixel_prior, 5000)
    assert t.min() == 900 and t.max() == 999  # up to T − 1, never T


def test_lora_rank_and_learning_rate_reach_the_model_and_its_optimizer(pixel_prior):
    vsd = VSDGuidance(lora_rank=2, lora_lr=3e-3)
    lora = vsd.setup(pixel_prior)
    assert lora.rank == 2
    down = [v for k, v in lora.trainable_state_dict().items() if ".lora_A." in k]
    assert down and all(v.shape[0] == 2 for v in down)  # A: (rank, in_features)
    opt = vsd.lora_optimizer()
    assert isinstance(opt, torch.optim.AdamW) and [g["lr"] for g in opt.param_groups] == [3e-3]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in lora.trainable_parameters()}
    assert VSDGuidance().setup(pixel_prior).rank == 4


def test_vsd_of_four_views_with_lora_cfg(pixel_prior):
    """B = 4 views, camera CFG 2 on the LoRA: each view against its own separate U-Net calls."""
    torch.manual_seed(22)
    batch = 4
    cond, uncond = _text(pixel_prior, batch)
    vsd = VSDGuidance(guidance_scale=7.5, lora_guidance_scale=2.0)
    _perturb_lora(vsd.setup(pixel_prior), seed=22)
    x = torch.randn(batch, 3, 16, 16, requires_grad=True)
    c2w, t, noise = _poses(batch, 22), torch.tensor([40, 300, 650, 900]), torch.randn(batch, 3, 16, 16)
    vsd.from_model_space(pixel_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise).loss.backward()
    grad, tol = _reference_grad(pixel_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 2.0, "sds")
    wrong, _ = _reference_grad(pixel_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 1.0, "sds")
    assert_grad_close(x.grad * batch, grad, tol, wrong=wrong)


def test_annealed_max_t_reaches_the_sampled_timesteps_through_the_call(pixel_prior):
    torch.manual_seed(23)
    batch = 16
    cond, uncond = _text(pixel_prior, batch)
    vsd = VSDGuidance(anneal_max_step_percent=0.3, anneal_at_fraction=0.5)
    vsd.setup(pixel_prior)
    rgb, c2w = torch.rand(batch, 16, 16, 3), _poses(batch, 23)
    late = vsd(pixel_prior, rgb, Text(cond, uncond), cams_of(c2w), step=60, max_steps=100).t
    early = vsd(pixel_prior, rgb, Text(cond, uncond), cams_of(c2w), step=40, max_steps=100).t
    assert 20 <= late.min() and late.max() <= 300
    assert early.max() > 300  # 16 draws from U{20, ..., 980}: all ≤ 300 has probability < 1e-8


def test_call_passes_the_plain_prompt_and_the_draws(pixel_prior):
    """__call__ (renderer layout) equals from_model_space on x = 2·rgb − 1 (native size), view guidance on."""
    torch.manual_seed(24)
    emb = pixel_prior.encode_text(["a red cube, front view", "", "a red cube"])
    cond, uncond, plain = (e[None].expand(2, -1, -1) for e in emb)
    vsd = VSDGuidance(view_guidance_scale=30.0)
    _perturb_lora(vsd.setup(pixel_prior), seed=24)
    rgb, c2w = torch.rand(2, 16, 16, 3), _poses(2, 24)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 3, 16, 16)
    a = vsd(pixel_prior, rgb, Text(cond, uncond, plain), cams_of(c2w), t=t, noise=noise)
    b = vsd.from_model_space(pixel_prior, rgb.permute(0, 3, 1, 2) * 2 - 1, Text(cond, uncond, plain), cams_of(c2w),
                             t=t, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, t) and torch.equal(a.x0, b.x0)
    with pytest.raises(ValueError, match=r"renderer layout \(B, H, W, 3\)"):
        vsd(pixel_prior, rgb.permute(0, 3, 1, 2), Text(cond, uncond, plain), cams_of(c2w), t=t, noise=noise)


def test_nonfinite_prediction_is_flagged_and_its_gradient_made_finite(pixel_prior):
    torch.manual_seed(25)
    cond, uncond = _text(pixel_prior, 2)
    vsd = VSDGuidance()
    _perturb_lora(vsd.setup(pixel_prior), seed=25)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    c2w, t, noise = _poses(2, 25), torch.tensor([300, 600]), torch.randn(2, 3, 16, 16)
    assert not vsd.from_model_space(pixel_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise).nonfinite
    noise[0, 0, 0, 0] = float("nan")
    out = vsd.from_model_space(pixel_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise)
    assert out.nonfinite
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
    grad, tol = _reference_grad(pixel_prior, vsd.lora, x.detach()[1:], cond[1:], uncond[1:], c2w[1:], t[1:],
                                noise[1:], 7.5, 1.0, "sds")
    assert_grad_close(x.grad[1:] * 2, grad, tol)


def test_vsd_runs_on_the_priors_device(tiny_pixel_model):
    """t, ε, x0 and the loss live on the prior's device (PyTorch's "meta" device: no GPU needed)."""
    from text23d.prior.loading import load_prior

    prior = load_prior(str(tiny_pixel_model))
    cond, uncond = (e.to("meta") for e in _text(prior, 2))
    prior.to("meta")
    vsd = VSDGuidance()
    vsd.setup(prior)
    assert vsd.sample_timesteps(prior, 3).device.type == "meta"
    x = torch.zeros(2, 3, 16, 16, device="meta", requires_grad=True)
    for t in (None, [100, 200]):
        out = vsd.from_model_space(prior, x, Text(cond, uncond), cams_of(_poses(2)), t=t)
        assert {v.device.type for v in (out.loss, out.grad_norm, out.nonfinite, out.t, out.x0)} == {"meta"}


def _edited_copy(model, tmp_path, component, **changes):
    """A copy of a tiny model folder with some keys of one component's config changed."""
    import json
    import shutil

    folder = shutil.copytree(model, tmp_path / "edited")
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = folder / component / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def test_lora_base_with_another_schedule_is_rejected(pixel_prior, tiny_pixel_model, tmp_path):
    folder = _edited_copy(tiny_pixel_model, tmp_path, "scheduler", beta_schedule="linear", beta_end=0.03)
    with pytest.raises(ConfigError, match="another noise schedule"):
        VSDGuidance(lora_pretrained_model_name_or_path=str(folder)).setup(pixel_prior)


def test_latent_lora_base_needs_the_priors_vae_scaling(latent_prior, tiny_latent_model, tmp_path):
    same = VSDGuidance(lora_pretrained_model_name_or_path=str(tiny_latent_model)).setup(latent_prior)
    assert same.prediction_type == latent_prior.prediction_type  # the same family: accepted
    folder = _edited_copy(tiny_latent_model, tmp_path, "vae", scaling_factor=0.5)
    with pytest.raises(ConfigError, match="scaling_factor=0.5"):
        VSDGuidance(lora_pretrained_model_name_or_path=str(folder)).setup(latent_prior)


def test_lora_base_loads_in_the_priors_dtype(tiny_pixel_model):
    from text23d.prior.loading import load_prior

    prior = load_prior(str(tiny_pixel_model), dtype="bfloat16")
    lora = VSDGuidance(lora_pretrained_model_name_or_path=str(tiny_pixel_model)).setup(prior)
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 0.0}, {"guidance_scale": 0.5}, {"lora_guidance_scale": 0.0}, {"lora_guidance_scale": 0.5},
        {"grad_clip": 0.5}, {"lora_rank": 1}, {"lora_lr": 1.5}, {"camera_drop_prob": 0.0}, {"camera_drop_prob": 1.0},
        {"anneal_at_fraction": 0.0}, {"anneal_at_fraction": 1.0}, {"anneal_max_step_percent": 1.0},
        {"view_guidance_scale": 0.0}, {"max_step_percent": [5000, 0.98, 0.5, 5001], "anneal_max_step_percent": None},
    ],
)
def test_boundary_arguments_are_accepted_and_kept(kwargs):
    vsd = VSDGuidance(**kwargs)
    for key, value in kwargs.items():
        assert (vsd.max_step_ramp == tuple(value)) if isinstance(value, list) else (getattr(vsd, key) == value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": 2.0}, "lora_rank=2.0"),
        ({"lora_steps": 1.0}, "lora_steps=1.0"),
        ({"camera_drop_prob": 1.5}, "camera_drop_prob=1.5"),
        ({"camera_drop_prob": -0.1}, "camera_drop_prob=-0.1"),
        ({"anneal_max_step_percent": 1.5}, "anneal_max_step_percent=1.5"),
        ({"anneal_max_step_percent": 0.02}, "anneal_max_step_percent=0.02"),
        ({"anneal_at_fraction": -0.1}, "anneal_at_fraction=-0.1"),
        ({"lora_lr": -1e-4}, "lora_lr=-0.0001"),
        ({"max_step_percent": [5000, 0.98, 0.5, 5001], "anneal_max_step_percent": 0.5},
         "is a ramp and anneal_max_step_percent=0.5 an anneal"),
    ],
)
def test_invalid_arguments_at_the_boundaries(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_settings(VSDGuidance, **kwargs)


def test_grad_clip_bounds_each_element_on_both_sides(pixel_prior):
    """grad_clip c: the gradient is w(t)·(ε̂_pretrained − ε̂_φ) clamped elementwise to [−c, c]."""
    torch.manual_seed(26)
    cond, uncond = _text(pixel_prior, 1)
    vsd = VSDGuidance(grad_clip=0.02)
    _perturb_lora(vsd.setup(pixel_prior), seed=26)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    c2w, t, noise = _poses(1, 26), torch.tensor([700]), torch.randn(1, 3, 16, 16)
    out = vsd.from_model_space(pixel_prior, x, Text(cond, uncond), cams_of(c2w), t=t, noise=noise)
    out.loss.backward()
    grad, tol = _reference_grad(pixel_prior, vsd.lora, x.detach(), cond, uncond, c2w, t, noise, 7.5, 1.0, "sds")
    assert (grad > 0.03).sum() > 10 and (grad < -0.03).sum() > 10 and (grad.abs() < 0.01).sum() > 10
    clipped = grad.clamp(-0.02, 0.02)
    assert_grad_close(x.grad, clipped, tol, wrong=grad)
    assert abs(out.grad_norm.item() - clipped.norm().item()) <= grad.numel() ** 0.5 * tol


def _base_like(prior, **unet_changes):
    """A LoRA base sharing the prior's VAE and scheduler, with a fresh U-Net of the prior's config
    with `unet_changes` (another family's latent width or text width)."""
    from diffusers import UNet2DConditionModel

    from text23d.prior.prior import Prior

    unet = UNet2DConditionModel.from_config({**prior.unet.config, **unet_changes})
    return Prior(name="base", model_dir=prior.model_dir, unet=unet, vae=prior.vae, scheduler=prior.scheduler,
                 resolution=prior.resolution, dtype=prior.dtype, device=prior.device, cache_key="base",
                 text_loader=None)


def test_lora_base_with_other_latent_channels_or_text_width_is_rejected(latent_prior):
    """Same latent space but 16 channels (SD3's VAE), or 16-wide text embeddings: rejected, each alone."""
    with pytest.raises(ConfigError, match=r"works in latent space, 16 channels, but .* latent space, 4 channels"):
        _check_compatible(latent_prior, _base_like(latent_prior, in_channels=16, out_channels=16))
    with pytest.raises(ConfigError, match=r"text embeddings of width 16, the prior .* produces 32"):
        _check_compatible(latent_prior, _base_like(latent_prior, cross_attention_dim=16))


def test_lora_base_schedule_within_rounding_is_the_priors(pixel_prior):
    """ᾱ_t equal to the prior's within rtol 1e-4 and atol 1e-6 (float rounding of the betas) is the
    same schedule; 3e-4 off is another. SD's ᾱ_T ≈ 0.0047 makes the absolute part count at large t."""
    base = copy.copy(pixel_prior)  # the prior's modules, its own ᾱ
    alpha = pixel_prior.alphas_cumprod
    assert alpha.min() < 0.005 and alpha.max() > 0.99
    base.alphas_cumprod = alpha * (1 + 5e-5) + 9e-7
    _check_compatible(pixel_prior, base)  # accepted
    base.alphas_cumprod = alpha * (1 + 3e-4)
    with pytest.raises(ConfigError, match="another noise schedule"):
        _check_compatible(pixel_prior, base)
