"""Checkpoints: written atomically, read without executing code (weights_only=True)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from text23d import fileio
from text23d.errors import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash mid-write leaves the previous checkpoint intact: write a temp file, then rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        # Serialised in memory first: a failed write then raises a plain OSError with its errno
        # (torch's own writer reports a full disk as "basic_ios::clear: iostream error"), and the
        # message can say exactly how much space the checkpoint needs.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            full = fileio.disk_full(path, e, buffer.getbuffer().nbytes)
            if full is None:
                raise
            raise full from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Temporary files of a process killed mid-write (kill -9, power cut); the files they were
    to replace are intact. Removed when the run is resumed."""
    patterns = ("ckpts/.*.ckpt.tmp*", "**/*.tmp-*")
    gone = sorted({str(p) for pattern in patterns for p in Path(run_dir).glob(pattern) if p.is_file()})
    for p in gone:
        Path(p).unlink(missing_ok=True)
    return gone


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
            "checkpoint. Fix: start it again, saving more often with checkpoint.every_n_train_steps=N.")
    if p.is_file():
        return p
    raise CheckpointError(f"'{p}' does not exist. Fix: pass a run folder (outputs/<system>/<prompt>@<time>) "
                          "or its ckpts/last.ckpt")


def run_dir_of(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (the parent of ckpts/)."""
    return ckpt.parent.parent if ckpt.parent.name == "ckpts" else ckpt.parent


def load_checkpoint_file(path, map_location=None) -> dict:
    fix = "Fix: pass another run folder or checkpoint of text23d's, or start the run anew"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): a copy or download of it was cut short. {fix}")
    try:
        data = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled objects we refuse to run
        why = (str(e).splitlines() or [""])[0].split(". ")[0][:160]  # torch's first sentence
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(e).__name__}: {why}): it is truncated, corrupt or not a "
            f"checkpoint. {fix}") from None
    if not isinstance(data, dict) or "text23d" not in data or "state_dict" not in data:
        keys = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"'{path}' is not a text23d checkpoint (it holds {keys}, not text23d's config and "
                              f"weights). {fix}")
    return data
