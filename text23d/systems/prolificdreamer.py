"""ProlificDreamer (Wang et al. 2023): n particles optimised with variational score distillation,
against the frozen prior and a camera-conditioned LoRA that learns what the particles currently
look like (VSD, eq. 9; the LoRA is trained with the plain diffusion loss).

Three stages by default (conf/system/prolificdreamer.yaml): `nerf` (VSD on a NeRF), `geometry` (a
DMTet mesh from each particle's density, SDS on rendered normals) and `texture` (that mesh frozen,
its colour field optimised with VSD). A stage whose guidance is SDS is guided as in DreamFusion; the
VSD stages share one LoRA, which carries on from the first stage to the texture stage (or, with
`system.stage.texture.lora=reset`, starts the stage at the weights it was built with)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from text23d.cameras.sampler import Cameras
from text23d.errors import ConfigError
from text23d.guidance.base import Text
from text23d.systems.dreamfusion import DreamFusion

log = logging.getLogger("text23d")


class ProlificDreamer(DreamFusion):
    # The LoRA's own parameters ride in the state dict (so resume restores them); exporting a
    # checkpoint needs only the particles, so a system built without the prior skips these keys.
    export_skips_prefix = "lora_params."
    provides = DreamFusion.provides | {"camera_pose", "lora_training"}  # systems/parts.py
    needs = frozenset({"lora"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lora = self.lora_optimizer = self.lora_scaler = None
        self._lora_optimizer_state = self._lora_scaler_state = None
        self._lora_initial = None
        self._lora_from = None  # (weights, optimizer state, where) of an init_from source
        vsd = [st.cfg.name for st in self.vsd_stages()]
        for st in self.stages:
            if st.cfg.lora == "reset" and (st.cfg.name not in vsd or st.cfg.name == vsd[0]):
                raise ConfigError(
                    f"system.stage.{st.cfg.name}.lora=reset: only a VSD stage after the first trains a LoRA "
                    f"it could reset (VSD stages here: {vsd}). Fix: system.stage.{st.cfg.name}.lora=carry")

    def stage_needs(self, stage_cfg) -> frozenset:
        """A stage that names a guidance of its own (the geometry stage's SDS) is guided as in
        DreamFusion; every other stage uses the system's guidance, which must be VSD."""
        own = (self.cfg.system.get("stage") or {}).get(stage_cfg.name) or {}
        return frozenset() if (own.get("guidance") or {}).get("_target_") else self.needs

    def vsd_stages(self) -> list:
        return [st for st in self.stages if st.guidance.learns_from_renders]

    def setup_guidance(self) -> None:
        first, *others = self.vsd_stages()
        lora = first.guidance.setup(self.prior)
        for stage in others:  # one LoRA for every VSD stage: it carries on
            stage.guidance.lora = lora
        guidance = first.guidance
        object.__setattr__(self, "lora", lora)  # not a registered child: its frozen base stays out
        # Only the trainable LoRA + camera-embedding tensors are registered (same Parameter objects).
        self.lora_params = nn.ParameterDict(
            {name.replace(".", "__"): p for name, p in lora.named_parameters() if p.requires_grad})
        # The weights it was built with (the same on a resumed run: built from the same seed, before
        # the checkpoint is restored), for a stage that resets it.
        self._lora_initial = lora.trainable_state_dict() if any(st.cfg.lora == "reset" for st in self.stages) else None
        self.lora_optimizer = guidance.lora_optimizer()
        self.lora_scaler = self._lora_grad_scaler()
        if self._lora_from is not None:
            self._load_carried_lora(*self._lora_from)
        if self._lora_optimizer_state is not None:
            self.lora_optimizer.load_state_dict(self._lora_optimizer_state)
        if self.lora_scaler is not None and self._lora_scaler_state is not None:
            self.lora_scaler.load_state_dict(self._lora_scaler_state)

    def _lora_grad_scaler(self) -> torch.amp.GradScaler | None:
        """Under 16-mixed, a GradScaler for the LoRA (its loss runs under fp16 autocast too), with the
        settings of Lightning's. Its own: Lightning's scaler steps only the optimizers Lightning wraps,
        not the LoRA's AdamW, and the two losses overflow at different scales, so with one shared
        scale an overflow of either would skip the other's step and lower its scale."""
        shared = self.grad_scaler()
        if shared is None:
            return None
        return torch.amp.GradScaler(self.trainer.strategy.root_device.type, init_scale=shared.get_scale(),
                                    growth_factor=shared.get_growth_factor(),
                                    backoff_factor=shared.get_backoff_factor(),
                                    growth_interval=shared.get_growth_interval())

    def carry_lora(self, weights: dict, optimizer_state: dict | None, source: str) -> None:
        """init_from: the source run's LoRA goes on training here (loaded in setup_guidance)."""
        if not weights:
            log.info("init_from=%s has no LoRA (not a VSD run): the LoRA starts from its initial weights", source)
            return
        self._lora_from = (weights, optimizer_state, source)

    def _load_carried_lora(self, weights: dict, optimizer_state: dict | None, source: str) -> None:
        own = {k: p.shape for k, p in self.lora_params.items()}
        theirs = {k: v.shape for k, v in weights.items()}
        if own != theirs:
            odd = sorted(k for k in own.keys() | theirs.keys() if own.get(k) != theirs.get(k))
            raise ConfigError(
                f"init_from={source}: its LoRA does not fit this one ({len(odd)} tensors differ, e.g. {odd[:2]}): "
                "another lora_rank or LoRA base. Fix: the source's guidance.lora_rank and LoRA base model")
        with torch.no_grad():
            for k, p in self.lora_params.items():
                p.copy_(weights[k])
        if optimizer_state is not None:
            self.lora_optimizer.load_state_dict(optimizer_state)
        log.info("init_from=%s: its LoRA carries on", source)

    def begin_stage(self, k: int) -> None:
        """`lora: reset`: the stage starts with a new LoRA (the built weights, a fresh optimizer).
        Once, as every stage start: a run resumed inside the stage has the LoRA it had trained."""
        super().begin_stage(k)
        stage = self.stages[k]
        if stage.cfg.lora == "reset" and self._lora_initial is not None:
            self.lora.load_trainable_state_dict(self._lora_initial)
            self.lora_optimizer = stage.guidance.lora_optimizer()
            log.info("stage %s: the LoRA starts again from its initial weights (lora=reset)", stage.cfg.name)

    def after_particles(self, views: list[dict]) -> dict:
        """Fit the LoRA to the particles' current (detached) renders: the score of their distribution.
        Only in VSD stages (an SDS stage's renders are normal maps, not what the LoRA models)."""
        guidance = self.stages[self.stage_at(self.global_step)].guidance
        if not guidance.learns_from_renders:
            return {}
        x0 = torch.cat([v["guide"].x0 for v in views])
        text = Text(torch.cat([v["text"].cond for v in views]), torch.cat([v["text"].uncond for v in views]))
        cams = Cameras.cat([v["cams"] for v in views])
        scaler = self.lora_scaler
        for _ in range(guidance.lora_steps):
            with torch.enable_grad():
                loss = guidance.learn(x0, text, cams)
            self.lora_optimizer.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            self._average_lora_grads()  # before the check below: every rank then decides alike
            if scaler is not None:
                # It unscales, skips a step whose (averaged, so on every rank the same) gradients are
                # not finite and lowers its scale; a non-finite loss gives such gradients too.
                scaler.step(self.lora_optimizer)
                scaler.update()
                continue
            if not all(bool(torch.isfinite(p.grad).all()) for p in self.lora.trainable_parameters()
                       if p.grad is not None) or not bool(torch.isfinite(loss)):
                log.warning("LoRA step skipped: non-finite loss or gradient")
                self.lora_optimizer.zero_grad(set_to_none=True)
                continue
            self.lora_optimizer.step()
        return {"train/loss_lora": loss.detach()}

    def _average_lora_grads(self) -> None:
        """DDP syncs only what Lightning's optimizers train; the LoRA has its own optimizer, so its
        gradients are averaged here (one all-reduce; gloo has no AVG: sum, then divide). Every rank's
        LoRA then stays the same and learns from every rank's renders, as the particles do."""
        if self._trainer is None or self.trainer.world_size < 2:
            return
        params = list(self.lora.trainable_parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    # ---- the LoRA and its optimizer travel with the checkpoint; a .safetensors copy beside it --
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora_optimizer is not None:
            checkpoint["text23d"]["lora_optimizer"] = self.lora_optimizer.state_dict()
            if self.lora_scaler is not None:  # 16-mixed: its scale, so a resumed run goes on with it
                checkpoint["text23d"]["lora_scaler"] = self.lora_scaler.state_dict()
            if self.global_rank == 0:  # called on every DDP rank; one writer
                self.save_lora(self.out_dir / "ckpts" / "lora.safetensors")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._lora_optimizer_state = checkpoint["text23d"].get("lora_optimizer")
        self._lora_scaler_state = checkpoint["text23d"].get("lora_scaler")
        if self.lora_optimizer is not None and self._lora_optimizer_state is not None:
            self.lora_optimizer.load_state_dict(self._lora_optimizer_state)
        if self.lora_scaler is not None and self._lora_scaler_state is not None:
            self.lora_scaler.load_state_dict(self._lora_scaler_state)

    def save_lora(self, path: Path) -> str:
        os.makedirs(Path(path).parent, exist_ok=True)
        meta = {"prior": str(self.prior.name), "rank": str(self.vsd_stages()[0].guidance.lora_rank),
                "prompt": str(self.cfg.prompt), "step": str(self.global_step)}
        self.lora.save_safetensors(path, meta)
        return str(path)
