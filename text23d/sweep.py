"""One summary for a Hydra multirun: a JSON list, a Markdown table, a side-by-side image and
an offline gallery page (index.html, text23d/gallery.py).

Enable it in the Hydra config:
    hydra:
      callbacks:
        sweep_summary:
          _target_: text23d.sweep.SweepSummary
or run it on any finished sweep folder: `python -m text23d.sweep multirun/2024-01-01/12-00-00`.

Each job folder (one holding `summary.json` or `.hydra/`) is one job; its settings are the
overrides Hydra saved in `.hydra/overrides.yaml`. A job without `summary.json` is reported as
failed. The run writes summary.json with: steps, wall_time_s, final_loss, artifacts{video,
mesh_obj, mesh_glb, grid, checkpoint}, output_dir (and prompt, system, metrics).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from text23d.export.video import make_grid, save_image
from text23d.fileio import atomic_output
from text23d.gallery import write_sweep_page
from text23d.jobs import SUMMARY_NAME, find_job_dirs, fmt, read_job, split_override

log = logging.getLogger(__name__)

GRID_COLS = 4  # more jobs wrap into rows, so the image stays viewable
MAX_TILE_W = 1024  # a job's grid of views can be wide; cap each tile so the sweep image is not huge


def differing_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (the swept ones), in first-seen order."""
    per_job = [dict(map(split_override, j["overrides"])) for j in jobs]
    keys = dict.fromkeys(k for d in per_job for k in d)
    return [k for k in keys if len({d.get(k) for d in per_job}) > 1]


def _label(job: dict, keys: list[str]) -> str:
    values = dict(map(split_override, job["overrides"]))
    swept = " ".join(f"{k}={values[k]}" for k in keys if k in values)
    # FAILED goes first so that wrapping a long label onto a small tile never cuts it off
    return ("FAILED " if job["status"] != "ok" else "") + f"{job['folder']}: {swept}"


def _cell(x) -> str:
    """A Markdown table cell: "|" would end the cell, a newline the row."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _link(name: str, path: str | None, sweep_dir: str) -> str:
    return f"[{name}]({os.path.relpath(path, sweep_dir)})" if path else "—"


def write_markdown(jobs: list[dict], keys: list[str], sweep_dir: str) -> str:
    """A table with one row per job and one column per swept override; links relative to
    sweep_dir, so the file renders the same wherever the folder is copied."""
    failed = sum(j["status"] != "ok" for j in jobs)
    lines = ["# Sweep summary", "", f"`{sweep_dir}`: {len(jobs)} jobs, {failed} failed.", ""]
    common = [o for o in (jobs[0]["overrides"] if jobs else []) if split_override(o)[0] not in keys]
    if common:
        lines += ["Same in every job: " + ", ".join(f"`{o}`" for o in common), ""]
    header = ["job", *keys, "status", "steps", "final loss", "wall time (s)", "video", "mesh"]
    lines += ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        values, a = dict(map(split_override, j["overrides"])), j["artifacts"]
        mesh = [f"[{f}]({os.path.relpath(a[f'mesh_{f}'], sweep_dir)})"
                for f in ("glb", "obj") if a.get(f"mesh_{f}")]
        status = j["status"] + (f" ([log]({j['log']}))" if j.get("log") else "")
        cells = [j["folder"], *(values.get(k, "—") for k in keys), status, fmt(j["steps"]),
                 fmt(j["final_loss"]), fmt(j["wall_time_s"]),
                 _link("mp4", a.get("video"), sweep_dir), " ".join(mesh) or "—"]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines) + "\n"


def _preview(job: dict) -> np.ndarray | None:
    """The job's grid of final views, else its video's first frame, else None.  # (H, W, 3)"""
    a = job["artifacts"]
    try:
        if a.get("grid") and os.path.exists(a["grid"]):
            with Image.open(a["grid"]) as im:
                return np.asarray(im.convert("RGB"))
        if a.get("video") and os.path.exists(a["video"]):
            import imageio.v2 as iio  # ffmpeg start-up only when a video is needed

            with iio.get_reader(a["video"]) as reader:
                return reader.get_data(0)
    except Exception as e:  # a corrupt artifact must not hide the rest of the sweep
        log.warning("Job %s: no preview image (%s); showing a blank tile.", job["folder"], e)
    return None


def write_grid(jobs: list[dict], keys: list[str], path: str) -> str | None:
    """Each job's preview side by side (blank tile if none), labelled with its swept overrides."""
    previews = [_preview(j) for j in jobs]
    found = [p for p in previews if p is not None]
    if not found:
        log.warning("No job has a grid image or video yet; %s not written.", path)
        return None
    h, w = found[0].shape[:2]
    if w > MAX_TILE_W:
        h, w = max(1, round(h * MAX_TILE_W / w)), MAX_TILE_W
    tiles = [np.full((h, w, 3), 200, np.uint8) if p is None else p for p in previews]
    # make_grid sizes every tile like the first one
    tiles[0] = np.asarray(Image.fromarray(tiles[0]).resize((w, h), Image.BILINEAR))
    grid = make_grid(tiles, ncol=min(GRID_COLS, len(tiles)), labels=[_label(j, keys) for j in jobs])
    return save_image(grid, path)


def summarize_sweep(sweep_dir: str) -> dict:
    """Write sweep_summary.json / .md / sweep_grid.png and index.html into sweep_dir.

    Returns {"sweep_dir", "jobs": [...], "json", "md", "grid", "html"} (paths absolute; grid may be None).
    Never raises for a missing or empty sweep: it logs a warning instead.
    """
    sweep_dir = os.path.abspath(str(sweep_dir))
    result = {"sweep_dir": sweep_dir, "jobs": [], "json": None, "md": None, "grid": None, "html": None}
    if not os.path.isdir(sweep_dir):
        log.warning("Sweep folder %s does not exist; nothing to summarize.", sweep_dir)
        return result
    jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
    if not jobs:
        log.warning("No job folders (with %s or .hydra/) under %s; the summary is empty.",
                    SUMMARY_NAME, sweep_dir)
    keys = differing_keys(jobs)
    files = {"json": json.dumps(jobs, indent=2), "md": write_markdown(jobs, keys, sweep_dir)}
    for kind, text in files.items():
        path = os.path.join(sweep_dir, f"sweep_summary.{kind}")
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            f.write(text)
        result[kind] = path
    if jobs:
        result["grid"] = write_grid(jobs, keys, os.path.join(sweep_dir, "sweep_grid.png"))

    result["html"] = write_sweep_page(sweep_dir, jobs, keys)
    result["jobs"] = jobs
    log.info("Sweep summary (%d jobs): %s", len(jobs), result["md"])
    return result


class SweepSummary(Callback):
    """Hydra callback: summarize the sweep folder after each job and when the multirun ends."""

    def _summarize(self, config: DictConfig) -> None:
        # A relative sweep dir is relative to where Hydra was launched, not to a job's cwd
        # (hydra.job.chdir=true moves that into the job folder).
        launch_cwd = OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd()
        sweep_dir = os.path.join(launch_cwd, str(config.hydra.sweep.dir))
        try:
            summarize_sweep(sweep_dir)
        except Exception:  # the jobs' own outputs are safe on disk; don't fail the sweep over this
            log.exception("Sweep summary failed. Retry with: python -m text23d.sweep %s", sweep_dir)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        # Hydra's basic sweeper re-raises a failed job's error *before* on_multirun_end, so that
        # hook never runs for a sweep with a failure. Refreshing after every job keeps a summary
        # (failed jobs included) on disk regardless. Parallel launchers may race here; the atomic
        # writes keep each file whole, and on_multirun_end writes the final version.
        if OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN:
            self._summarize(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._summarize(config)



# --- the jobs of a sweep, before it starts (text23d.launch checks each) ---------------------------

def sweep_jobs(argv: list[str]) -> tuple[list[list[str]], set[str]]:
    """The overrides of every job a multirun will launch, as Hydra's basic sweeper expands them (the
    product of every swept key's values), and the swept keys; hydra.* and flags are left out."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    lists, swept = [], set()
    for o in OverridesParser.create().parse_overrides(args):
        key = o.get_key_element()
        if o.is_sweep_override():
            swept.add(key)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        lists.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*lists)], swept


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m text23d.sweep <sweep_dir>")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = summarize_sweep(sys.argv[1])
    print("\n".join(f"{k}: {out[k]}" for k in ("json", "md", "grid", "html") if out[k]))
