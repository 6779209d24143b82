"""index.html for a sweep folder or a single run folder: a static page that works offline.

Plain HTML, inline CSS and a few lines of inline script; nothing is fetched from the network.
Every link is relative to the page's folder and points at a file that exists when the page is
written, so the folder can be moved or zipped. User text (prompts, overrides, logs) is escaped.

For hundreds of jobs the page stays light: images load lazily, and a video (preload="none") gets
its controls and first frame only when it scrolls into view.
Rebuild a run's page by hand: `python -m text23d.gallery <run dir>` (a sweep's: `python -m text23d.sweep`).
"""
from __future__ import annotations

import html
import logging
import os
import sys
from urllib.parse import quote

from PIL import Image

from text23d.fileio import write_text_atomic
from text23d.jobs import fmt, read_job, split_override

log = logging.getLogger(__name__)
PAGE = "index.html"
LOG_TAIL_LINES = 8  # of a failed job's log, shown on its card

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}code{background:#eee;padding:0 3px;border-radius:3px}
.wide{overflow-x:auto;margin:12px 0}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;white-space:nowrap}th{background:#f0f0f0}
tr.failed td{background:#fdecec}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}
.cards.single{grid-template-columns:minmax(280px,720px)}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow-wrap:anywhere}
.card.failed{border:2px solid #c62828;background:#fff5f5}
.card img,.card video{width:100%;height:auto;display:block;background:#eee;margin:4px 0}
.badge{font-weight:bold;padding:0 6px;border-radius:3px;color:#fff;background:#2e7d32;font-size:12px}
.badge.failed{background:#c62828}.prompt{font-style:italic;word-break:break-word}
.kv{margin:4px 0;padding:0;list-style:none;word-break:break-all}.muted{color:#777}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px;background:#f4f4f4;padding:4px}
"""

# A video gets controls and loads its first frame when it comes into view (hundreds of media
# controls at load time cost seconds); one that cannot be decoded says so next to its mp4 link.
SCRIPT = """
const seen = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    seen.unobserve(e.target);
    e.target.controls = true;
    e.target.preload = 'metadata';
    e.target.load();
  }
}, { rootMargin: '300px' });
for (const v of document.querySelectorAll('video')) {
  seen.observe(v);
  v.addEventListener('error', () => { v.nextElementSibling.hidden = false; }, true);
}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _href(path, page_dir: str) -> str | None:
    """The escaped relative URL of an existing file, else None (a page never links to nothing)."""
    if not isinstance(path, str) or not path or not os.path.isfile(path):
        return None
    rel = os.path.relpath(path, page_dir).replace(os.sep, "/")
    return _e(quote(rel))


def _links(named: dict, page_dir: str) -> str:
    """Links to those of the named files that exist, separated by dots."""
    out = [f'<a href="{h}">{_e(name)}</a>' for name, p in named.items() if (h := _href(p, page_dir))]
    return " · ".join(out) or '<span class="muted">no files</span>'


def _settings(overrides: list[str]) -> str:
    """Overrides as typed, with a quoted value (a prompt) shown as its text."""
    return " ".join("<code>{}={}</code>".format(*map(_e, split_override(o))) for o in overrides)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _files(job: dict, job_dir: str) -> dict:
    """The links a job's card and row show, by name: absolute paths (missing ones are dropped)."""
    a = job["artifacts"]
    named = {"mp4": a.get("video"), "glb": a.get("mesh_glb"), "obj": a.get("mesh_obj"),
             "views": a.get("grid"), "config": a.get("config") or os.path.join(job_dir, "config.yaml"),
             "metrics.csv": os.path.join(job_dir, "logs", "csv", "metrics.csv")}
    logs = sorted(f for f in os.listdir(job_dir) if f.endswith(".log")) if os.path.isdir(job_dir) else []
    named["log"] = os.path.join(job_dir, logs[0]) if logs else None
    return named


def _image(path, page_dir: str, alt: str) -> str:
    href = _href(path, page_dir)
    if href is None:
        return ""
    try:
        with Image.open(path) as im:  # reads the header only; the size keeps lazy layout stable
            w, h = im.size
    except OSError:
        return f'<a href="{href}">{_e(alt)}</a>'  # not an image a browser can show either
    return f'<a href="{href}"><img loading="lazy" src="{href}" width="{w}" height="{h}" alt="{_e(alt)}"></a>'


def _video(path, page_dir: str) -> str:
    href = _href(path, page_dir)
    if href is None:
        return ""
    return (f'<video preload="none" muted loop playsinline><source src="{href}" type="video/mp4"></video>'
            '<p class="muted" hidden>This browser cannot play this H.264 video; open the mp4 link.</p>')


def _card(n: int, job: dict, keys: list[str], job_dir: str, page_dir: str, single: bool) -> str:
    ok = job["status"] == "ok"
    values = dict(map(split_override, job["overrides"]))
    files = _files(job, job_dir)
    page = os.path.join(job_dir, PAGE)
    if os.path.abspath(page) != os.path.abspath(os.path.join(page_dir, PAGE)):
        files["page"] = page  # a sweep job's own run page
    parts = [f'<article class="card{"" if ok else " failed"}" id="job-{n}">',
             f'<div><a href="#job-{n}"><b>{_e(job["folder"])}</b></a> '
             f'<span class="badge{"" if ok else " failed"}">{"OK" if ok else "FAILED"}</span></div>']
    if job.get("prompt") is not None:
        parts.append(f'<div class="prompt">{_e(job["prompt"])}</div>')
    settings = "".join(f"<li><code>{_e(k)}={_e(values[k])}</code></li>" for k in keys if k in values)
    parts.append(f'<ul class="kv">{settings}</ul>' if settings else "")
    if ok:
        parts += [_image(job["artifacts"].get("grid"), page_dir, "final views"),
                  _video(job["artifacts"].get("video"), page_dir),
                  f'<div>steps {fmt(job["steps"])} · loss {fmt(job["final_loss"])} · '
                  f'{_duration(job["wall_time_s"])}</div>']
        metrics = job.get("metrics") or {}
        if metrics:
            rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(fmt(v))}</td></tr>" for k, v in metrics.items())
            parts.append(f"<details{' open' if single else ''}><summary>metrics ({len(metrics)})</summary>"
                         f"<table>{rows}</table></details>")
    else:
        parts.append(f'<div>{_e(job.get("error", "failed"))}</div>')
        tail = _log_tail(files["log"]) if files["log"] else ""
        parts.append(f"<pre>{_e(tail)}</pre>" if tail else "")
    parts += [f"<div>{_links(files, page_dir)}</div>", "</article>"]
    return "\n".join(p for p in parts if p)


def _table(jobs: list[dict], keys: list[str], dirs: list[str], page_dir: str) -> str:
    names = list(dict.fromkeys(k for j in jobs for k in (j.get("metrics") or {})))
    head = ["job", *keys, "status", "steps", "final loss", "wall time", *names, "files"]
    rows = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for n, (job, job_dir) in enumerate(zip(jobs, dirs)):
        values, metrics = dict(map(split_override, job["overrides"])), job.get("metrics") or {}
        files = {k: v for k, v in _files(job, job_dir).items() if k in ("mp4", "glb", "obj", "log")}
        cells = [f'<a href="#job-{n}">{_e(job["folder"])}</a>', *(_e(values.get(k, "—")) for k in keys),
                 "ok" if job["status"] == "ok" else "<b>FAILED</b>", _e(fmt(job["steps"])),
                 _e(fmt(job["final_loss"])), _e(_duration(job["wall_time_s"])),
                 *(_e(fmt(metrics.get(k))) for k in names), _links(files, page_dir)]
        css = "" if job["status"] == "ok" else ' class="failed"'
        rows.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return '<div class="wide"><table>\n' + "\n".join(rows) + "\n</table></div>"


def render_page(title: str, intro: str, jobs: list[dict], keys: list[str], dirs: list[str],
                page_dir: str, single: bool = False) -> str:
    """The whole page: `intro` is ready HTML; jobs come from text23d.jobs.read_job, each with
    its folder in `dirs`; `keys` are the settings to show per job."""
    cards = "\n".join(_card(n, j, keys, d, page_dir, single) for n, (j, d) in enumerate(zip(jobs, dirs)))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{_e(title)}</h1>\n{intro}\n{_table(jobs, keys, dirs, page_dir)}\n"
            f'<section class="cards{" single" if single else ""}">\n{cards}\n</section>\n'
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def write_sweep_page(sweep_dir: str, jobs: list[dict], keys: list[str]) -> str:
    """<sweep_dir>/index.html: every job's card (failed ones marked FAILED) and one table."""
    failed = sum(j["status"] != "ok" for j in jobs)
    common = [o for o in (jobs[0]["overrides"] if jobs else []) if split_override(o)[0] not in keys]
    files = {n: os.path.join(sweep_dir, n) for n in ("sweep_summary.md", "sweep_summary.json", "sweep_grid.png")}
    intro = (f"<p>{len(jobs)} jobs, {failed} failed. {_links(files, sweep_dir)}</p>"
             + (f"<p>Same in every job: {_settings(common)}</p>" if common else ""))
    dirs = [os.path.join(sweep_dir, j["folder"]) for j in jobs]
    page = render_page(f"Sweep {os.path.basename(sweep_dir)}", intro, jobs, keys, dirs, sweep_dir)
    return write_text_atomic(os.path.join(sweep_dir, PAGE), page)


def write_run_page(run_dir) -> str | None:
    """<run_dir>/index.html for one run, from its summary.json: the same card and table as a
    sweep's page. Returns the page's path; never raises (a run's results matter more than its page)."""
    run_dir = os.path.abspath(str(run_dir))
    try:
        job = read_job(run_dir, run_dir)
        job["folder"] = os.path.basename(run_dir)
        title = job.get("prompt") or job["folder"]
        intro = (f"<p>{_e(job.get('system') or '')} run <code>{_e(job['folder'])}</code></p>"
                 f"<p>Settings: {_settings(job['overrides']) or 'the defaults'}</p>")
        page = render_page(title, intro, [job], [], [run_dir], run_dir, single=True)
        return write_text_atomic(os.path.join(run_dir, PAGE), page)
    except Exception:
        log.exception("The run page was not written. Retry with: python -m text23d.gallery %s", run_dir)
        return None


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python -m text23d.gallery <run dir>  (a folder holding summary.json; "
                 "for a sweep folder use: python -m text23d.sweep <sweep dir>)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(write_run_page(sys.argv[1]) or sys.exit(1))
