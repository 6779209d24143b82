"""The LightningModule every system shares: building parts, RNG-exact checkpoints, validation images.

Only this layer sees the composed config; geometry, renderer, guidance and prior take plain kwargs.
The diffusion prior is a plain attribute (not a registered module), so it never enters the
state dict: checkpoints hold the 3D representation (and, for VSD, the LoRA), not gigabytes of U-Net.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from text23d import faults
from text23d.errors import ConfigError, Text23dError
from text23d.export.video import make_grid, save_image, to_uint8
from text23d.guidance.base import Text
from text23d.systems import losses, parts
from text23d.systems.stages import Stage, allocate_steps, render_size, stage_configs, start_from

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


class BaseSystem(L.LightningModule):
    """Builds every stage's parts, checks that they fit (systems/parts.py), and runs the training
    step of the stage the run is in: for each particle, render a batch of views, let the guidance
    score them, add the regularisers. Every guidance is called alike (guidance/base.py); subclasses
    say what happens after all particles (`after_particles`: VSD trains its LoRA there).

    Optimisation is manual, one optimizer per stage: a stage's parameters exist from the start
    (so checkpoints of any stage restore into the same modules), and at a stage's first step its
    particles are initialised from the previous stage's (stages.start_from), once: which stages
    have started is a buffer in the checkpoint, so a resumed run never initialises twice."""

    provides = frozenset({"rgb", "text", "text_plain"})  # what the training step hands the guidance
    needs = frozenset()  # what the system needs from the guidance

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        n = cfg.system.get("num_particles", 1)  # checked, as every value, by text23d.schema
        configs = stage_configs(cfg)
        self.stage_steps = allocate_steps(cfg, configs)
        self.stages = nn.ModuleList()
        for c in configs:
            self.stages.append(Stage(c, self.stages[-1] if len(self.stages) else None, n))
        for k, (stage, steps) in enumerate(zip(self.stages, self.stage_steps)):
            stage.steps = steps  # stage-local schedules (VSD's t anneal) count these
            if k and stage.cfg.init == "previous":
                previous = self.stages[k - 1]
                parts.check_start(stage.cfg.name, stage.particles[0].geometry, previous.cfg.name,
                                  previous.particles[0].geometry)
            sh = stage.cfg.shading
            parts.check(self, stage.particles[0].geometry, stage.renderer, stage.guidance,
                        {k.removeprefix("lambda_"): v for k, v in stage.cfg.loss.items()},
                        shading_needs_normals=(sh.ambient_only_steps < steps and sh.albedo_prob < 1)
                        or sh.get("normal_prob", 0) > 0, system_needs=self.stage_needs(stage.cfg))
        resets = [st.cfg.name for st in self.stages if st.cfg.lora == "reset"]
        if resets and "lora_training" not in self.provides:
            raise ConfigError(f"system.stage.{resets[0]}.lora=reset: system {cfg.system.name} trains no LoRA. "
                              f"Fix: drop it, or system=vsd (ProlificDreamer)")
        self.register_buffer("stage_started", torch.zeros(len(self.stages), dtype=torch.bool))
        self.camera_sampler = instantiate(cfg.camera)  # the evaluation orbit: videos, meshes, checks
        self.prompt_processor = build_prompt_processor(cfg)
        self.prior = None  # loaded for training only (setup)
        self.out_dir = Path(cfg.output_dir)
        self._rng_to_restore = None
        self.stage_log: list[dict] = []  # per finished stage: name, steps, training time, loss, outputs
        self._stage_clock, self._stage_elapsed = None, 0.0  # the current stage's time, across resumes
        self._nonfinite_in_a_row = self._nonfinite_total = 0  # skipped steps (see skip_step)
        self._fired: dict[int, int] = {}  # faults.* injected, per step

    # ---- which stage --------------------------------------------------------------------------
    @property
    def stage_ends(self) -> list[int]:
        return [sum(self.stage_steps[:k + 1]) for k in range(len(self.stage_steps))]

    def stage_at(self, step: int) -> int:
        """The stage that takes optimisation step `step` (0-based), skipping stages of 0 steps."""
        return next((k for k, end in enumerate(self.stage_ends) if step < end), len(self.stages) - 1)

    @property
    def stage_index(self) -> int:
        """The stage being trained, or (after training, in an export) the last one that started."""
        started = self.stage_started.nonzero()
        return int(started.max()) if len(started) else 0

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    @property
    def particles(self) -> nn.ModuleList:
        return self.stage.particles

    @property
    def renderer(self) -> nn.Module:
        return self.stage.renderer

    @property
    def guidance(self):
        return self.stage.guidance

    def stage_tag(self, k: int | None = None) -> str:
        """'' for a one-stage system, else '<name>-': the prefix of every artefact a stage makes."""
        return "" if len(self.stages) == 1 else f"{self.stages[self.stage_index if k is None else k].cfg.name}-"

    # ---- parts that only training needs (export never loads the diffusion model) ----------
    def setup(self, stage: str) -> None:
        # In setup, not on_fit_start: parts built from the prior (VSD's LoRA) must exist before
        # Lightning configures optimizers and restores a checkpoint into them.
        if stage != "fit" or self.prior is not None:
            return
        from text23d.prior.loading import load_prior

        device = self.trainer.strategy.root_device
        self.prior = load_prior(**OmegaConf.to_container(self.cfg.prior, resolve=True), device=device,
                                trainer_precision=str(self.trainer.precision))  # prior.dtype=auto follows bf16
        self.prompt_processor.prepare(self.prior)
        # Every embedding is cached now: DeepFloyd IF's T5 (4.7 B parameters) need not stay in memory.
        self.prior.release_text_encoder()
        self.setup_guidance()

    def setup_guidance(self) -> None:
        """Hook for systems whose guidance has trainable parts (VSD)."""

    def stage_needs(self, stage_cfg: DictConfig) -> frozenset:
        """What this system needs from a stage's guidance (systems/parts.py)."""
        return self.needs

    def on_fit_start(self) -> None:
        from text23d import memory

        memory.check(self, self.device)  # before any stage starts
        plan = " → ".join(f"{st.cfg.name} {n} steps {type(st.particles[0].geometry).__name__}/"
                          f"{type(st.renderer).__name__} {st.cfg.width or self.prior.resolution}x"
                          f"{st.cfg.height or self.prior.resolution}"
                          for st, n in zip(self.stages, self.stage_steps) if n)
        log.info("text23d: %s on %s | prior %s (%s, %dpx) | %d particle(s) | %s | %s", self.cfg.system.name,
                 self.device, self.prior.name, "latent" if self.prior.latent else "pixel", self.prior.resolution,
                 len(self.particles), plan, self.out_dir)

    def configure_optimizers(self):
        return [stage.optimizer() for stage in self.stages]

    def train_dataloader(self) -> DataLoader:
        # Its own generator: creating the iterator must not draw from the global RNG.
        return DataLoader(StepDataset(sum(self.stage_steps)), batch_size=None, generator=torch.Generator())

    # ---- the training step: one home for the per-particle loss ------------------------------
    @staticmethod
    def sample_shading(shading: DictConfig, step: int) -> str:
        """Albedo only while the shape forms; then DreamFusion's random mix, where textureless
        renders make the geometry (not the colours) carry the object."""
        if shading.get("normal_prob", 0.0) > 0 and torch.rand(()) < shading.normal_prob:
            return "normal"  # drawn only when asked for, so other runs keep their random streams
        if step < shading.ambient_only_steps or torch.rand(()) < shading.albedo_prob:
            return "albedo"
        return "textureless" if torch.rand(()) < shading.textureless_prob else "lambertian"

    def begin_stage(self, k: int) -> None:
        """A stage's first step: initialise it from the previous stage (once; see the class doc)."""
        stage = self.stages[k]
        if k and stage.cfg.init == "previous":
            info = start_from(stage, self.stages[k - 1], self.camera_sampler.orbit(8), self.renderer.radius)
            log.info("stage %s starts from stage %s: %s", stage.cfg.name, self.stages[k - 1].cfg.name, info)
        self.stage_started[k] = True
        self._stage_clock, self._stage_elapsed = time.time(), 0.0

    def training_step(self, batch, batch_idx):
        k = self.stage_at(self.global_step)
        try:
            return self._training_step(k)
        except torch.OutOfMemoryError as e:  # saved by faults.Guard (on_exception), reported by run()
            raise faults.OutOfMemory(faults.oom_advice(e, self.stages[k].cfg, self.device)) from e

    def _injected(self) -> float:
        """faults.*: each listed step fires once per listing (nan_at_steps=[5,5]: two attempts)."""
        step, fired = self.global_step, self._fired
        listed = list((self.cfg.get("faults") or {}).get("nan_at_steps") or [])
        fired[step] = fired.get(step, 0) + 1
        if fired[step] > 1 and listed.count(step) < fired[step]:  # a retried step: only the NaNs left
            return 1.0
        return faults.inject(self.cfg.get("faults"), step, self.global_rank)

    def _training_step(self, k: int):
        if not self.stage_started[k]:
            self.begin_stage(k)
        scale = self._injected()
        stage, step = self.stages[k], self.global_step - (self.stage_ends[k] - self.stage_steps[k])
        lam = {name.removeprefix("lambda_"): losses.scheduled(v, step) for name, v in stage.cfg.loss.items()}
        total, logs, views = 0.0, {}, []
        for i, particle in enumerate(stage.particles):
            try:
                loss, terms, view = self.particle_loss(stage, particle, step, lam)
            except Text23dError as e:  # say which stage and step, e.g. for a mesh that vanished
                raise type(e)(f"stage {stage.cfg.name}, step {step} of {stage.steps}: {e}") from None
            total = total + loss
            prefix = "train/" if len(stage.particles) == 1 else f"train/p{i}_"
            logs.update({f"{prefix}loss_{name}": v.detach() for name, v in terms.items()})
            logs[f"{prefix}grad_norm"] = view["guide"].grad_norm
            views.append(view)
        total = total * scale
        # The guidance's own gradient (made finite before it reaches the loss) or the loss itself.
        bad = bool(torch.stack([v["guide"].nonfinite for v in views]).any()) \
            or not bool(torch.isfinite(total))
        if not self._any_rank(bad):  # the same on every DDP rank: VSD's LoRA step all-reduces its gradients
            logs.update(self.after_particles(views))  # VSD's LoRA: not trained on a skipped step
        optimizers = self.optimizers()
        optimizer = optimizers[k] if isinstance(optimizers, list) else optimizers
        optimizer.zero_grad()
        self.manual_backward(total)  # under 16-mixed: the loss times the GradScaler's scale
        scaler = self.grad_scaler()
        if scaler is None:  # with a scaler, non-finite gradients are its overflow to handle (below)
            bad = bad or not all(bool(torch.isfinite(p.grad).all()) for g in optimizer.param_groups
                                 for p in g["params"] if p.grad is not None)
        if self._any_rank(bad):
            self.skip_step(optimizer, step)
        else:
            # Under 16-mixed, Lightning's scaler unscales, and skips a step whose scaled gradients
            # overflowed, lowering its scale. Skipped here instead, the scale would never come down
            # and the guard would stop the run (guard.max_nonfinite_steps).
            optimizer.step()
            self._nonfinite_in_a_row = 0
        if scaler is not None:
            logs["train/grad_scale"] = float(scaler.get_scale())
        logs["train/nonfinite_skipped"] = float(self._nonfinite_total)
        batch_size = stage.cfg.batch_size
        self.log_dict(logs, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/stage", float(k), batch_size=batch_size)
        if self.global_step == self.stage_ends[k] and k < len(self.stages) - 1:
            # Here, not in a hook: the checkpoint written at this step must already know it ended.
            self.end_stage(k, final_loss=float(total.detach()))
        return total.detach()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Lightning's GradScaler under 16-mixed; None under 32-true and bf16-mixed (no scaling)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on any DDP rank (every rank must skip the same steps)."""
        if self.trainer.world_size > 1:
            t = torch.tensor([float(flag)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item())
        return flag

    def skip_step(self, optimizer, step: int) -> None:
        """A non-finite loss or gradient: not applied (the same step is tried again with new
        cameras and noise); too many in a row stop the run, whose state is still the last finite one.
        Non-finite in float32 terms only: under 16-mixed, an overflow of the scaled gradients is the
        GradScaler's (it skips the step and lowers its scale), not one of these."""
        optimizer.zero_grad()
        self._nonfinite_in_a_row += 1
        self._nonfinite_total += 1
        limit = (self.cfg.get("guard") or {}).get("max_nonfinite_steps", 20)
        log.warning("step %d of stage %s: non-finite loss or gradient, step skipped (%d in a row, %d in all)",
                    step, self.stage.cfg.name, self._nonfinite_in_a_row, self._nonfinite_total)
        if self._nonfinite_in_a_row >= limit:
            raise faults.NonFiniteError(
                f"{self._nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient (guard.max_nonfinite_steps="
                f"{limit}); the run stopped at step {self.global_step} with the last finite state saved. Likely "
                "causes: half precision (use prior.dtype=float32), a learning rate too high (lower "
                "system.optimizer.lr), or a very high CFG (lower guidance.guidance_scale). Then resume with "
                f"text23d resume={self.out_dir} <the change>")

    def particle_loss(self, stage: Stage, particle, step: int, lam: dict) -> tuple[torch.Tensor, dict, dict]:
        """One particle: render a batch of random views, score them with the guidance, add the
        regularisers. Returns the weighted loss, its unweighted terms, and what was rendered."""
        c = stage.cfg
        if particle.occupancy is not None:
            particle.occupancy.update(particle.geometry.density, step, stage.renderer.sample_spacing)
        cams = stage.camera_sampler.sample(c.batch_size).to(self.device)
        shading = self.sample_shading(c.shading, step)
        height, width = render_size(c, step, self.prior.resolution)  # null: the prior's; lists: milestones
        out = stage.renderer(particle.geometry, particle.background, cams, height, width, shading=shading,
                             **stage.renderer.accepted(need_normals=lam.get("orient", 0.0) > 0, jitter=True,
                                                       occupancy=particle.occupancy))
        # The stage's own view thresholds (ProlificDreamer: 30° sectors, 45° in its geometry stage).
        cond, uncond = self.prompt_processor(cams.elevation, cams.azimuth, **c.prompt_processor)
        plain = self.prompt_processor.plain(len(cond)) if "text_plain" in stage.guidance.needs else None
        text = Text(cond, uncond, plain)
        guide = stage.guidance(self.prior, out["comp_rgb"], text, cams, step=step, max_steps=stage.steps)
        terms = {guide.name: guide.loss, **losses.regularisers(out, lam)}
        # The distillation term's weight: lambda_<name>, else lambda_sds (systems that inherit
        # DreamFusion's loss block), else 1; regularisers weigh 0 unless their lambda says otherwise.
        weights = {**lam, guide.name: lam.get(guide.name, lam.get("sds", 1.0))}
        loss = sum(weights[n] * v for n, v in terms.items() if weights.get(n, 0.0) != 0.0)
        return loss, terms, {"guide": guide, "text": text, "cams": cams}

    def after_particles(self, views: list[dict]) -> dict:
        """Hook after every particle's loss, with what each rendered; returns extra values to log."""
        return {}

    # ---- exact resume: the RNG state travels in the checkpoint ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["text23d"] = {"config": OmegaConf.to_yaml(self.cfg), "rng": rng, "stages": self.stage_log,
                                 "stage": self.stages[self.stage_index].cfg.name,
                                 "stage_elapsed_s": self._elapsed(), "nonfinite_skipped": self._nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("text23d", {})
        self._rng_to_restore = saved.get("rng")
        self.stage_log = list(saved.get("stages", []))
        self._stage_elapsed = float(saved.get("stage_elapsed_s", 0.0))
        self._nonfinite_total = int(saved.get("nonfinite_skipped", 0))

    def _elapsed(self) -> float:
        return self._stage_elapsed + (time.time() - self._stage_clock if self._stage_clock else 0.0)

    def on_train_start(self) -> None:
        self._stage_clock = time.time()
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
            cam = cams[i:i + 1].to(self.device)
            out = self.renderer(p.geometry, p.background, cam, resolution, resolution,
                                shading=shading, **self.renderer.accepted(need_normals=True))
            normal = (out["comp_normal"][0] * 0.5 + 0.5) * out["opacity"][0] + (1 - out["opacity"][0])
            views.append({"rgb": out["comp_rgb"][0].cpu().numpy(), "normal": normal.cpu().numpy(),
                          "opacity": out["opacity"][0].expand(-1, -1, 3).cpu().numpy()})
        return views

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every, step = self.cfg.validation.every_n_steps, self.global_step
        # every n steps, and at the end of each stage: a run shorter than n steps still gets one
        if every and (step % every == 0 or step in self.stage_ends) and self.global_rank == 0:
            self.save_validation(self.global_step)

    def end_stage(self, k: int, outputs: dict | None = None, final_loss: float | None = None) -> dict:
        """Record a finished stage (and, but for the last, which ends with the run's export in
        run.py, its turntable and views) in stage_log."""
        from text23d.export.artifacts import export_views

        if outputs is None and self.global_rank == 0:
            outputs = export_views(self, self.cfg.export, self.out_dir, self.global_step)
        if final_loss is None and self._trainer is not None:
            loss = self.trainer.callback_metrics.get("train/loss")
            final_loss = float(loss) if loss is not None else None
        entry = {"name": self.stages[k].cfg.name, "steps": self.stage_steps[k], "end_step": self.stage_ends[k],
                 "train_time_s": round(self._elapsed(), 2),  # this stage's training, across resumes
                 "final_loss": final_loss, "outputs": outputs or {}}
        self.stage_log = [e for e in self.stage_log if e["name"] != entry["name"]] + [entry]
        self.train()
        return entry

    def save_validation(self, step: int) -> Path:
        """Rows: rgb / normals / opacity of a few orbit views, for every particle."""
        v = self.cfg.validation
        cams = self.camera_sampler.orbit(v.views)
        tiles = []
        for i in range(len(self.particles)):
            views = self.render_views(cams, v.resolution, particle=i)
            tiles += [to_uint8(x[k]) for k in ("rgb", "normal", "opacity") for x in views]
        grid = make_grid(tiles, ncol=v.views)
        path = save_image(grid, self.out_dir / "save" / f"{self.stage_tag()}it{step:06d}-val.png")
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val", np.ascontiguousarray(grid), step, dataformats="HWC")
        return Path(path)
