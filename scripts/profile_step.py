"""Where one training step's time goes: a table of phases, for the note of a speed change.

    python scripts/profile_step.py                          # the built-in SDS step (prior=builtin)
    python scripts/profile_step.py geometry=hashgrid        # any overrides

Runs 3 warm-up steps, then profiles steps 4-8 with torch.profiler, the phases marked by wrapping the
renderer, the geometry's lookups, the U-Net and the backward pass; prints the mean milliseconds of
each phase per step and the top operators. Timed after the albedo-only warm-up, as scripts/bench.py.
"""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from text23d.config import compose  # noqa: E402
from text23d.run import build_system  # noqa: E402

PHASES = ("step", "render", "geometry.density", "geometry.albedo+normals", "unet", "backward", "optimizer")


def marked(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["prompt=a red cube", "prior=builtin", f"output_dir={tmp}/run",
                       "system.shading.ambient_only_steps=0", *overrides])
        L.seed_everything(0, verbose=False)
        system = build_system(cfg)
        profiled, warmup = 5, 3

        class Profile(L.Callback):
            def on_fit_start(self, trainer, module):
                stage = module.stages[0]
                stage.renderer.forward = marked(stage.renderer.forward, "render")
                for particle in module.particles:
                    geometry = particle.geometry
                    geometry.density = marked(geometry.density, "geometry.density")
                    geometry.albedo_and_normals = marked(geometry.albedo_and_normals, "geometry.albedo+normals")
                module.prior.unet.forward = marked(module.prior.unet.forward, "unet")

            def on_train_batch_start(self, trainer, module, batch, i):
                if i == warmup:
                    self.prof = torch.profiler.profile()
                    self.prof.__enter__()
                if i >= warmup:
                    self.step = torch.profiler.record_function("step")
                    self.step.__enter__()

            def on_before_backward(self, trainer, module, loss):
                if trainer.global_step >= warmup:
                    self.back = torch.profiler.record_function("backward")
                    self.back.__enter__()

            def on_after_backward(self, trainer, module):
                if trainer.global_step >= warmup:
                    self.back.__exit__(None, None, None)

            def on_before_optimizer_step(self, trainer, module, optimizer):
                if trainer.global_step >= warmup:
                    self.opt = torch.profiler.record_function("optimizer")
                    self.opt.__enter__()

            def on_train_batch_end(self, trainer, module, outputs, batch, i):
                if i >= warmup:
                    self.opt.__exit__(None, None, None)
                    self.step.__exit__(None, None, None)
                if i == warmup + profiled - 1:
                    self.prof.__exit__(None, None, None)

        trainer = L.Trainer(max_steps=warmup + profiled, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[profile := Profile()], max_epochs=-1)
        trainer.fit(system)
    events = {e.key: e for e in profile.prof.key_averages()}
    print(f"| phase | ms per step | share of the step |\n|---|---|---|")
    total = events["step"].cpu_time_total / profiled / 1000
    for name in PHASES:
        if name in events:
            ms = events[name].cpu_time_total / profiled / 1000
            print(f"| {name} | {ms:.1f} | {ms / total:.0%} |")
    print(f"\nthreads: {torch.get_num_threads()}; overrides: {' '.join(overrides) or '(none)'}\n")
    print(profile.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
