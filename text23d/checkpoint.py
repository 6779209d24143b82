"""Checkpoints: written atomically, read without executing code (weights_only=True)."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from text23d.errors import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash mid-write leaves the previous checkpoint intact: write a temp file, then rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location)


class PeriodicCheckpoint(L.Callback):
    """`last.ckpt` every `every_n_train_steps` steps (0: only at the end), at the end of every stage
    (a run killed at a boundary resumes into the next stage), and when training ends. At the end of
    a stage that hands over to another, a copy stays as `<stage>.ckpt`, for export= and init_from=."""

    def __init__(self, path: Path, every_n_train_steps: int):
        self.path, self.every = Path(path), every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, ends = trainer.global_step, getattr(pl_module, "stage_ends", [])[:-1]
        if (self.every and step % self.every == 0) or step in ends:
            trainer.save_checkpoint(self.path, weights_only=False)
        if step in ends:
            name = pl_module.stages[ends.index(step)].cfg.name
            trainer.save_checkpoint(self.path.with_name(f"{name}.ckpt"), weights_only=False)

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)


def find_checkpoint(path_or_dir: str) -> Path:
    """A run folder (→ its ckpts/last.ckpt) or a checkpoint file; CheckpointError otherwise."""
    p = Path(str(path_or_dir)).expanduser()
    if p.is_dir():
        for cand in (p / "ckpts" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"'{p}' holds no checkpoint (looked for ckpts/last.ckpt): the run stopped before its first "
            "checkpoint. Start it again, or save more often with checkpoint.every_n_train_steps=N.")
    if p.is_file():
        return p
    raise CheckpointError(f"'{p}' does not exist: pass a run folder (outputs/<system>/<prompt>@<time>) "
                          "or its ckpts/last.ckpt")


def run_dir_of(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (the parent of ckpts/)."""
    return ckpt.parent.parent if ckpt.parent.name == "ckpts" else ckpt.parent


def load_checkpoint_file(path, map_location=None) -> dict:
    try:
        data = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled objects we refuse to run
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "It is corrupt or not a text23d checkpoint; resume from another run folder or start anew.") from None
    if not isinstance(data, dict) or "text23d" not in data or "state_dict" not in data:
        raise CheckpointError(f"'{path}' is not a text23d checkpoint (no config or weights inside)")
    return data
