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
from text23d.systems import losses, parts

log = logging.getLogger("text23d")


def build_prompt_processor(cfg: DictConfig):
    """The prompt processor, with the prompts passed as plain strings. Not through instantiate:
    it resolves the config in place, and a resolved `${...}` typed in a prompt would then be
    interpolated a second time (reading an environment variable into the prompt)."""
    from hydra.utils import get_class

    params = OmegaConf.to_container(cfg.system.prompt_processor, resolve=True)
    return get_class(params.pop("_target_"))(cfg.prompt, cfg.negative_prompt, **params)


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
    """Builds the parts, checks that they fit (systems/parts.py), and runs the training step:
    for each particle, render a batch of views, let the guidance score them, add the regularisers.
    Subclasses say how their guidance is called (`guide`) and what happens after all particles
    (`after_particles`: VSD trains its LoRA there)."""

    provides = frozenset({"rgb", "text"})  # what the training step hands the guidance
    needs = frozenset()  # what the system needs from the guidance

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.system.get("num_particles", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"system.num_particles={n!r}: must be an integer ≥ 1 (e.g. system.num_particles=2)")
        self.particles = nn.ModuleList(
            Particle(instantiate(cfg.geometry), instantiate(cfg.system.background)) for _ in range(n))
        self.renderer = instantiate(cfg.renderer)
        self.camera_sampler = instantiate(cfg.camera)
        # Cheap objects that only check their arguments: bad values fail here, before any model loads.
        self.guidance = instantiate(cfg.guidance)
        self.prompt_processor = build_prompt_processor(cfg)
        parts.check(self, self.geometry, self.renderer, self.guidance,
                    {k.removeprefix("lambda_"): v for k, v in cfg.system.loss.items()},
                    shading_needs_normals=self._shading_needs_normals())
        self.prior = None  # loaded for training only (setup)
        self.out_dir = Path(cfg.output_dir)
        self._rng_to_restore = None

    def _shading_needs_normals(self) -> bool:
        sh, steps = self.cfg.system.shading, self.cfg.trainer.max_steps
        return sh.ambient_only_steps < steps and sh.albedo_prob < 1

    # ---- parts that only training needs (export never loads the diffusion model) ----------
    def setup(self, stage: str) -> None:
        # In setup, not on_fit_start: parts built from the prior (VSD's LoRA) must exist before
        # Lightning configures optimizers and restores a checkpoint into them.
        if stage != "fit" or self.prior is not None:
            return
        from text23d.prior.loading import load_prior

        device = self.trainer.strategy.root_device
        self.prior = load_prior(**OmegaConf.to_container(self.cfg.prior, resolve=True), device=device)
        self.prompt_processor.prepare(self.prior)
        # Every embedding is cached now: DeepFloyd IF's T5 (4.7 B parameters) need not stay in memory.
        self.prior.release_text_encoder()
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

    # ---- the training step: one home for the per-particle loss ------------------------------
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
        total, logs, views = 0.0, {}, []
        for i, particle in enumerate(self.particles):
            loss, terms, view = self.particle_loss(particle, step, lam)
            total = total + loss
            prefix = "train/" if len(self.particles) == 1 else f"train/p{i}_"
            logs.update({f"{prefix}loss_{k}": v.detach() for k, v in terms.items()})
            logs[f"{prefix}grad_norm"] = view["guide"]["grad_norm"]
            views.append(view)
        logs.update(self.after_particles(views))
        self.log_dict(logs, batch_size=s.batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=s.batch_size)
        return total

    def particle_loss(self, particle: Particle, step: int, lam: dict) -> tuple[torch.Tensor, dict, dict]:
        """One particle: render a batch of random views, score them with the guidance, add the
        regularisers. Returns the weighted loss, its unweighted terms, and what was rendered."""
        s = self.cfg.system
        cams = self.camera_sampler.sample(s.batch_size).to(self.device)
        shading = self.sample_shading(step)
        out = self.renderer(particle.geometry, particle.background, cams, s.height, s.width, shading=shading,
                            need_normals=lam.get("orient", 0.0) > 0, jitter=True)
        cond, uncond = self.prompt_processor(cams.elevation, cams.azimuth)
        guide = self.guide(out["comp_rgb"], cond, uncond, cams, step)
        [key] = [k for k in guide if k.startswith("loss_")]  # loss_sds, loss_vsd
        name = key.removeprefix("loss_")
        terms = {name: guide[key], **losses.regularisers(out)}
        # The distillation term's weight: lambda_<name>, else lambda_sds (systems that inherit
        # DreamFusion's loss block), else 1; regularisers weigh 0 unless their lambda says otherwise.
        weights = {**lam, name: lam.get(name, lam.get("sds", 1.0))}
        loss = sum(weights[k] * v for k, v in terms.items() if weights.get(k, 0.0) != 0.0)
        return loss, terms, {"guide": guide, "cond": cond, "cams": cams}

    def guide(self, rgb, cond, uncond, cams, step: int) -> dict:
        """The guidance's loss on the renders rgb (B, H, W, 3); subclasses pass what it needs."""
        raise NotImplementedError

    def after_particles(self, views: list[dict]) -> dict:
        """Hook after every particle's loss, with what each rendered; returns extra values to log."""
        return {}

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
