"""The jobs of a sweep folder, as the sweep summary (sweep.py) and the gallery (gallery.py) read
them: each job folder, its overrides, its summary.json (artifact paths rebased when the folder
moved), and values formatted for tables."""
from __future__ import annotations

import json
import math
import os
import re

import yaml
from omegaconf import OmegaConf

SUMMARY_NAME = "summary.json"


def _natural_key(path: str) -> list:
    """Sort "2" before "10" (Hydra names job folders by job number)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_job_dirs(sweep_dir: str) -> list[str]:
    """Folders under sweep_dir holding summary.json or .hydra/ (nested subdirs allowed)."""
    jobs = []
    for root, dirs, files in os.walk(sweep_dir):
        if root != sweep_dir and (SUMMARY_NAME in files or ".hydra" in dirs):
            jobs.append(root)
            dirs.clear()  # a job's own subfolders (checkpoints, videos) are not jobs
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(jobs, key=lambda p: _natural_key(os.path.relpath(p, sweep_dir)))


def _read_overrides(job_dir: str) -> list[str]:
    path = os.path.join(job_dir, ".hydra", "overrides.yaml")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [str(o) for o in (yaml.safe_load(f) or [])]


def _rebase(path, output_dir: str | None, job_dir: str):
    """Point an absolute artifact path into job_dir when the sweep folder was moved or copied."""
    if isinstance(path, list):
        return [_rebase(p, output_dir, job_dir) for p in path]
    if not isinstance(path, str) or not path or os.path.exists(path) or not output_dir:
        return path
    rel = os.path.relpath(path, output_dir)
    moved = os.path.join(job_dir, rel)
    return moved if not rel.startswith("..") and os.path.exists(moved) else path


def read_job(job_dir: str, sweep_dir: str) -> dict:
    """One sweep_summary.json entry; status "ok" or "failed" (with the reason in "error")."""
    job = {
        "folder": os.path.relpath(job_dir, sweep_dir),
        "status": "failed",
        "overrides": _read_overrides(job_dir),
        "steps": None,
        "final_loss": None,
        "wall_time_s": None,
        "artifacts": {},
    }
    path = os.path.join(job_dir, SUMMARY_NAME)
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        job["error"] = f"no {SUMMARY_NAME}: the job crashed or is still running"
        logs = sorted(f for f in os.listdir(job_dir) if f.endswith(".log"))  # Hydra's job log
        if logs:
            job["log"] = os.path.join(job["folder"], logs[0])
        return job
    except (OSError, ValueError) as e:
        job["error"] = f"unreadable {SUMMARY_NAME}: {e}"
        return job
    if not isinstance(summary, dict):
        job["error"] = f"{SUMMARY_NAME} holds a {type(summary).__name__}, expected an object"
        return job
    for key in ("prompt", "system", "steps", "final_loss", "wall_time_s", "metrics"):
        job[key] = summary.get(key)
    out, artifacts = summary.get("output_dir"), summary.get("artifacts") or {}
    job["artifacts"] = {k: _rebase(v, out, job_dir) for k, v in artifacts.items()}
    job["status"] = "ok"
    return job


def split_override(override: str) -> tuple[str, str]:
    """(key, value as typed): a quoted value, as the CLI writes prompts, is shown as its text."""
    key, _, value = override.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            text = str(OverridesParser.create().parse_override(f"x={value}").value())
            value = OmegaConf.create({"x": text}).x  # and the prompt's escaped ${ back to ${
        except Exception:  # not ours to judge: show it as written
            pass
    return key, value


def fmt(x) -> str:
    """A value for a table cell: None as a dash, floats to 4 significant digits."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)
