"""ProlificDreamer (Wang et al. 2023), stage 1: n particles optimised with variational score
distillation, against the frozen prior and a camera-conditioned LoRA that learns what the
particles currently look like (VSD, eq. 9; the LoRA is trained with the plain diffusion loss)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from text23d.errors import ConfigError
from text23d.systems import losses
from text23d.systems.dreamfusion import DreamFusion


class ProlificDreamer(DreamFusion):
    # The LoRA's own parameters ride in the state dict (so resume restores them); exporting a
    # checkpoint needs only the particles, so a system built without the prior skips these keys.
    export_skips_prefix = "lora_params."

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.guidance._target_.endswith("VSDGuidance"):
            raise ConfigError(f"system={cfg.system.name} needs guidance=vsd, got {cfg.guidance._target_}; "
                              "drop the guidance override, or use system=dreamfusion for SDS")
        self.lora = self.lora_optimizer = None
        self._lora_optimizer_state = None

    def setup_guidance(self) -> None:
        lora = self.guidance.setup(self.prior)
        object.__setattr__(self, "lora", lora)  # not a registered child: its frozen base stays out
        # Only the trainable LoRA + camera-embedding tensors are registered (same Parameter objects).
        self.lora_params = nn.ParameterDict(
            {name.replace(".", "__"): p for name, p in lora.named_parameters() if p.requires_grad})
        self.lora_optimizer = torch.optim.AdamW(self.lora_params.values(), lr=self.guidance.lora_lr)
        if self._lora_optimizer_state is not None:
            self.lora_optimizer.load_state_dict(self._lora_optimizer_state)

    def training_step(self, batch, batch_idx):
        s, step = self.cfg.system, self.global_step
        lam = {k.removeprefix("lambda_"): losses.scheduled(v, step) for k, v in s.loss.items()}
        total, renders, log = 0.0, [], {}
        for i, particle in enumerate(self.particles):
            cams = self.camera_sampler.sample(s.batch_size).to(self.device)
            shading = self.sample_shading(step)
            out = self.renderer(particle.geometry, particle.background, cams, s.height, s.width,
                                shading=shading, need_normals=lam.get("orient", 0.0) > 0, jitter=True)
            cond, uncond = self.prompt_processor(cams.elevation, cams.azimuth)
            c2w = cams.c2w.reshape(len(cams), 16)
            guide = self.guidance(self.prior, out["comp_rgb"], cond, uncond, c2w, step=step,
                                  max_steps=self.cfg.trainer.max_steps)
            terms = {"vsd": guide["loss_vsd"], "sparsity": losses.sparsity(out["opacity"]),
                     "opaque": losses.opaque(out["opacity"])}
            if "normals" in out:
                terms["orient"] = losses.orientation(out["weights"], out["normals"], out["dirs"])
            weights = {**lam, "vsd": lam.get("vsd", lam.get("sds", 1.0))}
            total = total + sum(weights[k] * v for k, v in terms.items() if weights.get(k, 0.0) != 0.0)
            renders.append((guide["x0"], cond, c2w))
            log.update({f"train/p{i}_loss_{k}": v.detach() for k, v in terms.items()})
        log["train/loss_lora"] = self.train_lora(renders)
        self.log_dict(log, batch_size=s.batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=s.batch_size)
        return total

    def train_lora(self, renders) -> torch.Tensor:
        """Fit the LoRA to the particles' current (detached) renders: the score of their distribution."""
        x0 = torch.cat([r[0] for r in renders])
        cond = torch.cat([r[1] for r in renders])
        c2w = torch.cat([r[2] for r in renders])
        for _ in range(self.guidance.lora_steps):
            with torch.enable_grad():
                loss = self.guidance.lora_loss(x0, cond, c2w)
            self.lora_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.lora_optimizer.step()
        return loss.detach()

    # ---- the LoRA and its optimizer travel with the checkpoint; a .safetensors copy beside it --
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora_optimizer is not None:
            checkpoint["text23d"]["lora_optimizer"] = self.lora_optimizer.state_dict()
            self.save_lora(self.out_dir / "ckpts" / "lora.safetensors")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._lora_optimizer_state = checkpoint["text23d"].get("lora_optimizer")
        if self.lora_optimizer is not None and self._lora_optimizer_state is not None:
            self.lora_optimizer.load_state_dict(self._lora_optimizer_state)

    def save_lora(self, path: Path) -> str:
        os.makedirs(Path(path).parent, exist_ok=True)
        meta = {"prior": str(self.prior.name), "rank": str(self.guidance.lora_rank),
                "prompt": str(self.cfg.prompt), "step": str(self.global_step)}
        self.lora.save_safetensors(path, meta)
        return str(path)
