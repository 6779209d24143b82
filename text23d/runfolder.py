"""A new run never reuses another run's folder, and a refused one leaves no folder behind.

A run writes config.yaml, ckpts/, save/ and logs/ into its folder: a new run there would mix
with or overwrite another's files, and `resume=` is the one way to continue a run. The pre-flight
(text23d.launch) checks a folder the user chose (output_dir=, hydra.run.dir=) before Hydra writes
anything into it; the job checks text23d's own timestamped folder, whose name Hydra only fixes
as the job starts.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from text23d.errors import ConfigError

RUN_RECORD = (".hydra", "text23d.log")  # what Hydra writes into a run folder as a run starts


def reuse_allowed(folder: Path) -> bool:
    """Whether this process may start in `folder` although it already holds files. False: a new
    run never silently continues or overwrites another (resume= is the way to continue one). The
    hook for a launcher that restarts a job in its own folder: a requeued submitit job must
    resume there. A DDP rank other than 0 may: Lightning starts ranks 1… by running the command
    again with hydra.run.dir set to the folder rank 0 checked and has begun to fill."""
    from text23d.faults import requeued

    return ddp_rank() > 0 or requeued(folder)


def ddp_rank() -> int:
    """This process's rank in a DDP job (0 outside one), read from the environment as Lightning
    reads it (its launcher, torchrun, SLURM), without importing it."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def check_new_run_folder(folder: str, key: str | None) -> None:
    """A new run's folder must be new or empty (Hydra's record of this start aside); ConfigError
    otherwise, naming the folder and the fixes. `key`: the option that chose it (None: text23d's
    own timestamped folder)."""
    p = Path(folder).expanduser()
    name = f"{key}={folder}" if key else f"the run folder {folder}"
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{name} is a file, not a folder. Fix: pass a new or empty folder")
    found = sorted(e.name for e in p.iterdir() if e.name not in RUN_RECORD) if p.is_dir() else []
    if not found or reuse_allowed(p):
        return
    listing = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
    other = (f"another {key}, new or empty" if key else "start again (a new time stamp)") + \
            (" (unset: a new timestamped folder)" if key == "output_dir" else "")
    if any((p / c).is_file() for c in ("ckpts/last.ckpt", "last.ckpt")):
        done = (p / "summary.json").is_file()
        how = f"resume={folder} trainer.max_steps=<more> to train it further" if done else f"resume={folder} to continue it"
        raise ConfigError(f"{name} already holds a {'finished ' if done else ''}run ({listing}): a new run there would "
                          f"overwrite it, and a run is never continued silently. Fix: text23d {how}, or {other}")
    if any((p / c).exists() for c in ("ckpts", "config.yaml", "summary.json")):
        raise ConfigError(f"{name} holds a run that stopped before its first checkpoint ({listing}): there is nothing "
                          f"to resume, and a new run would overwrite its files. Fix: delete it (rm -r {folder}) to start "
                          f"over there, or {other}")
    raise ConfigError(f"{name} is not empty ({listing}): a run writes config.yaml, ckpts/, save/ and logs/ into its "
                      f"folder, mixing with or overwriting these files. Fix: {other}")


def discard_refused_run(out_dir: Path) -> Path | None:
    """A new run refused before it made anything (no checkpoint, no image, no summary: it failed
    while loading, say a model that is not there) leaves no run folder behind. Its log is kept as
    <output_root>/.failed/<run>.log, the path returned; a folder with anything made in it is kept."""
    made = [p for p in ("ckpts", "save", "summary.json", "exports") if (out_dir / p).exists()
            and (not (out_dir / p).is_dir() or any((out_dir / p).iterdir()))]
    if not out_dir.is_dir() or made:
        return None
    kept = None
    log = out_dir / "text23d.log"
    if log.is_file() and log.stat().st_size:
        kept = out_dir.parent.parent / ".failed" / f"{out_dir.name}.log"
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(log), kept)
        except OSError:
            kept = None
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        out_dir.parent.rmdir()  # outputs/<system>/, if this run was its only one
    except OSError:
        pass
    return kept
