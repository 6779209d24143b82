"""DreamFusion (Poole et al. 2022): a NeRF optimised with Score Distillation Sampling."""
from __future__ import annotations

import torch

from text23d.systems import losses
from text23d.systems.base import BaseSystem


class DreamFusion(BaseSystem):
    def sample_shading(self, step: int) -> str:
        """Albedo only while the shape forms; then DreamFusion's random mix, where textureless
        renders make the geometry (not the colours) carry the object."""
        sh = self.cfg.system.shading
        if step < sh.ambient_only_steps or torch.rand(()) < sh.albedo_prob:
            return "albedo"
        return "textureless" if torch.rand(()) < sh.textureless_prob else "lambertian"

    def training_step(self, batch, batch_idx):
        s, step = self.cfg.system, self.global_step
        lam = {k.removeprefix("lambda_"): losses.scheduled(v, step) for k, v in s.loss.items()}
        cams = self.camera_sampler.sample(s.batch_size).to(self.device)
        shading = self.sample_shading(step)
        out = self.renderer(self.geometry, self.background, cams, s.height, s.width, shading=shading,
                            need_normals=lam.get("orient", 0.0) > 0, jitter=True)
        cond, uncond = self.prompt_processor(cams.elevation, cams.azimuth)
        guide = self.guidance(self.prior, out["comp_rgb"], cond, uncond)

        terms = {"sds": guide["loss_sds"], "sparsity": losses.sparsity(out["opacity"]),
                 "opaque": losses.opaque(out["opacity"])}
        if "normals" in out:
            terms["orient"] = losses.orientation(out["weights"], out["normals"], out["dirs"])
        loss = sum(lam[k] * v for k, v in terms.items() if lam.get(k, 0.0) != 0.0)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in terms.items()}, batch_size=s.batch_size)
        self.log("train/grad_norm", guide["grad_norm"], batch_size=s.batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=s.batch_size)
        return loss
