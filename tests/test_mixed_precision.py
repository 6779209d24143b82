"""Mixed precision. Under 16-mixed, Lightning's GradScaler owns fp16 overflow: optimizer.step()
unscales, skips a step whose scaled gradients overflowed and lowers its scale, and VSD's LoRA (its own
optimizer) has a GradScaler of its own. The guard counts only steps that are non-finite in float32
terms. bf16-mixed needs no scaler. Lightning turns `precision=16-mixed` on CPU into bf16-mixed, so
the fp16 path is driven here with its MixedPrecision plugin and a real CPU GradScaler."""
import math

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file

from helpers import compose_cfg
from text23d.run import build_system, run


def vsd_cfg(model, out, *extra):  # deliberate copy of tests/test_vsd_run.py's: stage 1 of system=vsd
    return compose_cfg(["prompt=a red cube", "system=vsd", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
                        f"output_dir={out}", "trainer.enable_progress_bar=false", "geometry=grid",
                        "geometry.resolution=16", "system.stages=[nerf]", *tiny_lora(extra), *extra])


def tiny_lora(extra):  # a LoRA on the tiny prior itself (prior=sd21base pairs VSD with SD 2.1 from the hub)
    return [] if "guidance=sds" in extra else ["guidance.lora_pretrained_model_name_or_path=null"]


class Record(L.Callback):
    """Before and after every step attempt: the step, the weights, both scales, the guard's count."""

    def __init__(self):
        self.attempts = []

    @staticmethod
    def state(trainer, system) -> dict:
        lora_scaler = getattr(system, "lora_scaler", None)
        return {"step": trainer.global_step, "skipped": system._nonfinite_total,
                "particles": [p.detach().clone() for p in system.particles.parameters()],
                "lora": [p.detach().clone() for p in system.lora.trainable_parameters()],
                "scale": trainer.precision_plugin.scaler.get_scale(),
                "lora_scale": lora_scaler.get_scale() if lora_scaler is not None else None}

    def on_train_batch_start(self, trainer, system, batch, batch_idx):
        self._before = self.state(trainer, system)

    def on_train_batch_end(self, trainer, system, outputs, batch, batch_idx):
        self.attempts.append((self._before, self.state(trainer, system)))


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_fp16_overflow_is_the_scalers_and_a_nan_loss_is_the_guards(tiny_pixel_model, tmp_path):
    # A scale of 2^127 overflows every gradient; the first backoff brings it to 1. Step 2's loss is NaN.
    cfg = vsd_cfg(tiny_pixel_model, tmp_path / "run", "trainer.max_steps=3", "faults.nan_at_steps=[2]",
                  "guard.max_nonfinite_steps=3", "validation.every_n_steps=0", "checkpoint.every_n_train_steps=0")
    L.seed_everything(0, verbose=False)
    system, record = build_system(cfg), Record()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-127)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[record],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(system)  # before the fix: NonFiniteError, 3 overflowing steps in a row at a scale never lowered
    (b0, a0), (b1, a1), (b2, a2), (b3, a3) = record.attempts
    # 1. Overflow: both scalers skip their steps and lower their scales; the guard counts nothing.
    assert (b0["scale"], a0["scale"]) == (2.0**127, 1.0) and (b0["lora_scale"], a0["lora_scale"]) == (2.0**127, 1.0)
    assert same(b0["particles"], a0["particles"]) and same(b0["lora"], a0["lora"])
    assert a0["skipped"] == 0 and a0["step"] == 1  # a step like any other (torch AMP counts it too)
    # 2. At scale 1 both train.
    assert not same(b1["particles"], a1["particles"]) and not same(b1["lora"], a1["lora"])
    assert a1["scale"] == a1["lora_scale"] == 1.0 and a1["skipped"] == 0
    # 3. A NaN loss is non-finite in float32 terms: the guard's, skipped and retried; the scales stay.
    assert (b2["step"], a2["step"], a2["skipped"]) == (2, 2, 1)
    assert same(b2["particles"], a2["particles"]) and same(b2["lora"], a2["lora"])
    assert a2["scale"] == a2["lora_scale"] == 1.0
    assert a3["step"] == 3 and not same(b3["particles"], a3["particles"]) and system._nonfinite_in_a_row == 0
    # The LoRA's scaler rides in the checkpoint (Lightning saves its own), and a resume restores it.
    system.lora_scaler.update(0.5)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["text23d"]["lora_scaler"]["scale"] == 0.5 and ckpt["MixedPrecision"]["scale"] == 1.0
    system.lora_scaler.update(4.0)
    system.on_load_checkpoint(ckpt)
    assert system.lora_scaler.get_scale() == 0.5


def test_bf16_mixed_trains_without_a_scaler_and_the_guard_still_counts(tiny_pixel_model, tmp_path):
    s = run(vsd_cfg(tiny_pixel_model, tmp_path / "run", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                    "faults.nan_at_steps=[1]"))
    assert s["steps"] == 3 and s["metrics"]["train/nonfinite_skipped"] == 1.0  # the NaN step, retried
    assert math.isfinite(s["final_loss"]) and "train/grad_scale" not in s["metrics"]
    lora = load_file(s["artifacts"]["lora"])
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the LoRA trained (B starts at 0)


def test_bf16_mixed_runs_the_mlp_geometries_and_the_mesh_stage(tiny_latent_model, tmp_path):
    # Under autocast the fields' MLPs answer in bfloat16; the volume renderer scatters them into
    # float32 buffers (it raised "Index put requires the source and destination dtypes match").
    s = run(compose_cfg(["prompt=a red cube", "system=magic3d", "debug=smoke",
                         f"prior.pretrained_model_name_or_path={tiny_latent_model}", f"output_dir={tmp_path}", "trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed",
                         "geometry.n_levels=4", "geometry.log2_table=12", "system.stage.fine.geometry.resolution=12",
                         "trainer.max_steps=null", "system.stage.coarse.steps=2", "system.stage.fine.steps=2",
                         "renderer.occupancy.warmup_steps=1", "renderer.occupancy.update_every=1"]))
    assert s["steps"] == 4 and math.isfinite(s["final_loss"]) and s["metrics"]["train/nonfinite_skipped"] == 0.0
