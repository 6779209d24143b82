"""The LightningModule every system shares: building parts, RNG-exact checkpoints, validation images.

Only this layer sees the composed config; geometry, renderer, guidance and prior take plain kwargs.
The diffusion prior is a plain attribute (not a registered module), so it never enters the
state dict: checkpoints hold the 3D representation (and, for VSD, the LoRA), not gigabytes of U-Net.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from text23d.errors import ConfigError

from text23d.export.video import make_grid, save_image, to_uint8

log = logging.getLogger("text23d")


class StepDataset(Dataset):
    """One item per optimisation step. Cameras are sampled in the step itself, so the data
    loader holds no randomness and the epoch length gives the progress bar a total and ETA."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Particle(nn.Module):
    """One 3D representation being optimised: a geometry (density + albedo) and its background."""

    def __init__(self, geometry: nn.Module, background: nn.Module):
        super().__init__()
        self.geometry, self.background = geometry, background


class BaseSystem(L.LightningModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.system.get("num_particles", 1)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"system.num_particles={n!r}: must be an integer ≥ 1 (e.g. system.num_particles=2)")
        self.particles = nn.ModuleList(
            Particle(instantiate(cfg.geometry), instantiate(cfg.system.background)) for _ in range(n))
        self.renderer = instantiate(cfg.renderer)
        self.camera_sampler = instantiate(cfg.camera)
        self.prior = self.prompt_processor = self.guidance = None  # loaded for training only
        self.out_dir = Path(cfg.output_dir)
        self._rng_to_restore = None

    # ---- parts that only training needs (export never loads the diffusion model) ----------
    def setup(self, stage: str) -> None:
        # In setup, not on_fit_start: parts built from the prior (VSD's LoRA) must exist before
        # Lightning configures optimizers and restores a checkpoint into them.
        if stage != "fit" or self.prior is not None:
            return
        from text23d.prior.loading import load_prior

        device = self.trainer.strategy.root_device
        self.prior = load_prior(**OmegaConf.to_container(self.cfg.prior, resolve=True), device=device)
        self.prompt_processor = instantiate(self.cfg.system.prompt_processor)
        self.prompt_processor.prepare(self.prior)
        self.guidance = instantiate(self.cfg.guidance)
        self.setup_guidance()

    def setup_guidance(self) -> None:
        """Hook for systems whose guidance has trainable parts (VSD)."""

    def on_fit_start(self) -> None:
        s, t = self.cfg.system, self.cfg.trainer
        log.info("text23d: %s on %s | prior %s (%s, %dpx) | render %dx%d | %d particle(s) | %d steps | %s",
                 s.name, self.device, self.prior.name, "latent" if self.prior.latent else "pixel",
                 self.prior.resolution, s.width, s.height, len(self.particles), t.max_steps, self.out_dir)

    def configure_optimizers(self):
        return instantiate(self.cfg.system.optimizer)(self.particles.parameters())

    def train_dataloader(self) -> DataLoader:
        # Its own generator: creating the iterator must not draw from the global RNG.
        return DataLoader(StepDataset(self.cfg.trainer.max_steps), batch_size=None,
                          generator=torch.Generator())

    # ---- exact resume: the RNG state travels in the checkpoint ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["text23d"] = {"config": OmegaConf.to_yaml(self.cfg), "rng": rng}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("text23d", {}).get("rng")

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1 and self.global_rank > 0:
            # DDP: every rank must draw its own cameras and noise, or N GPUs do one GPU's work.
            # (Checkpoints hold rank 0's RNG; other ranks re-derive theirs from seed, rank and step.)
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.global_rank + self.global_step)
            self._rng_to_restore = None

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Restored here, not at load time: Lightning may draw random numbers in between.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"].cpu())
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    # ---- rendering for people: validation grids, turntables ---------------------------------
    @property
    def geometry(self) -> nn.Module:  # the first (for most systems the only) particle
        return self.particles[0].geometry

    @property
    def background(self) -> nn.Module:
        return self.particles[0].background

    @torch.no_grad()
    def render_views(self, cams, resolution: int, shading: str = "albedo", particle: int = 0) -> list[dict]:
        """Render views one at a time (memory stays flat); returns numpy rgb/normal/opacity."""
        views, p = [], self.particles[particle]
        for i in range(len(cams)):
            cam = type(cams)(*(getattr(cams, f)[i:i + 1].to(self.device) for f in cams.__dataclass_fields__))
            out = self.renderer(p.geometry, p.background, cam, resolution, resolution,
                                shading=shading, need_normals=True)
            normal = (out["comp_normal"][0] * 0.5 + 0.5) * out["opacity"][0] + (1 - out["opacity"][0])
            views.append({"rgb": out["comp_rgb"][0].cpu().numpy(), "normal": normal.cpu().numpy(),
                          "opacity": out["opacity"][0].expand(-1, -1, 3).cpu().numpy()})
        return views

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.validation.every_n_steps
        if every and self.global_step % every == 0 and self.global_rank == 0:
            self.save_validation(self.global_step)

    def save_validation(self, step: int) -> Path:
        """Rows: rgb / normals / opacity of a few orbit views, for every particle."""
        v = self.cfg.validation
        cams = self.camera_sampler.orbit(v.views)
        tiles = []
        for i in range(len(self.particles)):
            views = self.render_views(cams, v.resolution, particle=i)
            tiles += [to_uint8(x[k]) for k in ("rgb", "normal", "opacity") for x in views]
        grid = make_grid(tiles, ncol=v.views)
        path = save_image(grid, self.out_dir / "save" / f"it{step:06d}-val.png")
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val", np.ascontiguousarray(grid), step, dataformats="HWC")
        return Path(path)
