"""What drives a finished VSD run's gradient: the LoRA term, or only the guidance term?

    python scripts/vsd_terms.py outputs/prolificdreamer/a_red_cube@...   [more run folders]

VSD's gradient splits as  ε̂_pretrained − ε̂_lora = (s − 1)(ε_c − ε_u) + (ε_c − ε̂_lora):
a guidance term, and a term that exists only once the LoRA has learnt the particle's own score
(it is exactly 0 at initialisation). SDS has (ε_c − ε) in that place. For each run this renders
the particle from 16 random views, noises them at t = 0.2, 0.5, 0.8·T (fixed seed) and prints
JSON with the norm of each term, so a run whose LoRA never moved is visible at a glance.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def terms(run_dir: Path, n_views: int = 16) -> dict:
    import torch
    from omegaconf import OmegaConf

    from text23d.guidance.lora import load_lora_safetensors
    from text23d.prior.loading import load_prior
    from text23d.run import load_system

    system, step, _ = load_system(run_dir)
    cfg = system.cfg
    prior = load_prior(**OmegaConf.to_container(cfg.prior, resolve=True))
    guidance, processor = system.guidance, system.prompt_processor
    lora = guidance.setup(prior)
    lora.load_trainable_state_dict(load_lora_safetensors(run_dir / "ckpts" / "lora.safetensors")[0])
    processor.prepare(prior)
    torch.manual_seed(0)
    cams = system.camera_sampler.sample(n_views)
    s = guidance.guidance_scale
    rows = {}
    with torch.no_grad():
        out = system.renderer(system.geometry, system.background, cams, cfg.system.height, cfg.system.width,
                              shading="lambertian")
        x = prior.images_to_model_space(out["comp_rgb"].permute(0, 3, 1, 2))
        cond, uncond = processor(cams.elevation, cams.azimuth)
        for frac in (0.2, 0.5, 0.8):
            t = torch.full((n_views,), int(frac * prior.num_train_timesteps))
            noise = torch.randn(x.shape)
            a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x + (1 - a).sqrt() * noise
            eps_c, eps_u = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                               torch.cat([cond, uncond])).chunk(2)
            eps_lora = lora.predict_noise(x_t, t, cond, cams.c2w.reshape(n_views, 16))
            norm = lambda v: round(float(v.flatten(1).norm(dim=1).mean()), 4)  # noqa: E731
            rows[f"t={frac:g}T"] = {"guidance_term": norm((s - 1) * (eps_c - eps_u)),
                                    "lora_term": norm(eps_c - eps_lora), "sds_noise_term": norm(eps_c - noise)}
    return {"run": str(run_dir), "step": step, "lora_lr": guidance.lora_lr, "guidance_scale": s, "terms": rows}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(json.dumps(terms(Path(arg))), flush=True)
