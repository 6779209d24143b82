"""index.html of sweeps and runs: written from job folders on disk, and opened from the file system in
headless Chromium (scripts/check_gallery.mjs), as a user opens it."""
import html
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from test_sweep import make_job

from text23d.cli import literal
from text23d.gallery import write_run_page
from text23d.sweep import summarize_sweep

ROOT = Path(__file__).resolve().parents[1]
TEXT23D = str(Path(sys.executable).parent / "text23d")
VIEWER_MODULES = ROOT / ".tools" / "viewer" / "node_modules"
NO_BROWSER = shutil.which("node") is None or not (VIEWER_MODULES / "@sparticuz" / "chromium").exists()
WHY = ("the headless-Chromium check (node + npm @sparticuz/chromium, puppeteer-core) is set up by `make setup`; "
       "this machine has no node or no .tools/viewer")
# Unescaped, this would be a script of the page (and a console error in the browser check).
PROMPT = """a <script>console.error("unescaped")</script> & 'cube' "🍔\""""


class Page(HTMLParser):
    """The tags of a page with their attributes, and the text of each card (<article id=...>)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.cards, self.card, self.title = [], {}, None, ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "article":
            self.card = dict(attrs)["id"]
            self.cards[self.card] = ""

    def handle_endtag(self, tag):
        if tag == "article":
            self.card = None

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "title":
            self.title += data
        if self.card:
            self.cards[self.card] += data

    def refs(self) -> list[str]:
        return [a[k] for _, a in self.tags for k in ("href", "src") if k in a]


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def assert_links_resolve(page: Page, folder: Path) -> None:
    ids = {a["id"] for _, a in page.tags if "id" in a}
    for ref in page.refs():
        if ref.startswith("#"):
            assert ref[1:] in ids, ref
        else:
            assert ":" not in ref and not ref.startswith("/"), f"{ref} is not relative"
            assert (folder / unquote(ref)).is_file(), ref


def fake_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2024-01-01"
    common = f"prompt={literal(PROMPT)}"  # as the CLI hands it to Hydra
    make_job(sweep, "0-cube", [common, "guidance.guidance_scale=7.5"], 0.25, grid_value=0, video=True, prompt=PROMPT)
    make_job(sweep, "1-cube", [common, "guidance.guidance_scale=100"], 0.5, grid_value=128, prompt=PROMPT)
    make_job(sweep, "10-cube", [common, "guidance.guidance_scale=1000"])  # failed: no summary.json
    return sweep


def test_sweep_page_lists_every_job_marks_failures_and_escapes_prompts(tmp_path):
    sweep = fake_sweep(tmp_path)
    assert summarize_sweep(sweep)["html"] == str(sweep / "index.html")
    page = read_page(sweep / "index.html")
    assert list(page.cards) == ["job-0", "job-1", "job-2"]
    assert "OK" in page.cards["job-0"] and "FAILED" not in page.cards["job-0"]
    assert "FAILED" in page.cards["job-2"] and "no summary.json" in page.cards["job-2"]
    assert "Traceback ..." in page.cards["job-2"]  # the tail of its log, and a link to it
    assert "10-cube/text23d.log" in page.refs()
    # The prompt is text: its <script> is no tag of the page, and it reads back exactly.
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own
    assert PROMPT in page.cards["job-0"] and "guidance.guidance_scale=7.5" in page.cards["job-0"]
    assert f"Same in every job: <code>prompt={html.escape(PROMPT)}</code>" in (sweep / "index.html").read_text()
    # Lazy media: no image or video is fetched before it scrolls into view.
    images = [a for t, a in page.tags if t == "img"]
    assert [a["src"] for a in images] == ["0-cube/save/it2-test.png", "1-cube/save/it2-test.png"]
    assert all(a["loading"] == "lazy" and int(a["width"]) == 80 for a in images)
    videos = [a for t, a in page.tags if t == "video"]
    assert len(videos) == 1 and videos[0]["preload"] == "none" and "controls" not in videos[0]
    assert [a["src"] for t, a in page.tags if t == "source"] == ["0-cube/save/it2-test.mp4"]
    # Only files that exist are linked: make_job names meshes it never writes.
    assert not any(r.endswith(".glb") for r in page.refs())
    assert_links_resolve(page, sweep)
    (sweep / "1-cube" / "save" / "model.glb").write_bytes(b"glTF")
    summarize_sweep(sweep)
    assert "1-cube/save/model.glb" in read_page(sweep / "index.html").refs()


def test_moved_or_unzipped_sweep_page_still_finds_every_file(tmp_path):
    sweep = fake_sweep(tmp_path / "cluster")
    summarize_sweep(sweep)
    moved = tmp_path / "laptop" / "sweep"
    shutil.copytree(sweep, moved)
    shutil.rmtree(tmp_path / "cluster")
    page = read_page(moved / "index.html")
    assert len(page.refs()) > 10
    assert_links_resolve(page, moved)


def test_run_page_shows_one_run_with_links_into_its_folder(tmp_path, caplog):
    run = make_job(tmp_path, "a_cube@20240101", [f"prompt={literal(PROMPT)}", "seed=3"], 0.25, grid_value=9,
                   video=True, prompt=PROMPT)
    assert write_run_page(run) == str(run / "index.html")
    page = read_page(run / "index.html")
    assert page.title == PROMPT and list(page.cards) == ["job-0"]
    assert PROMPT in page.cards["job-0"] and "OK" in page.cards["job-0"]
    assert "save/it2-test.mp4" in page.refs() and "save/it2-test.png" in page.refs()
    assert_links_resolve(page, run)
    # A page is a convenience: a folder it cannot read is logged with the retry, never raised.
    assert write_run_page(tmp_path / "missing") is None
    assert "python -m text23d.gallery" in caplog.text


def check_in_browser(*pages) -> tuple[int, dict]:
    p = subprocess.run(["node", str(ROOT / "scripts" / "check_gallery.mjs"), *map(str, pages)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "NODE_PATH": str(VIEWER_MODULES)})
    assert p.stdout, p.stderr[-2000:]
    return p.returncode, {r["page"]: r for r in json.loads(p.stdout)["pages"]}


@pytest.mark.skipif(NO_BROWSER, reason=WHY)
def test_browser_check_reports_what_a_broken_page_does(tmp_path):
    """The check itself: every kind of problem it looks for is found on a page that has it."""
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><title>x</title><img src="missing.png"><img src="text.png">'
        '<img src="https://cdn.example.com/x.png"><video><source src="text.mp4" type="video/mp4"></video>'
        '<a href="missing.glb">m</a><a href="#nowhere">n</a><a href="/etc/hostname">a</a>'
        '<script>console.error("boom"); notDefined()</script>')
    code, result = check_in_browser(tmp_path / "index.html")
    problems = "\n".join(result[str(tmp_path / "index.html")]["problems"])
    assert code == 1
    for expect in ("console error: boom", "page error: notDefined is not defined", "<img> missing.png: does not decode",
                   "<img> text.png: does not decode", "network request: https://cdn.example.com/x.png",
                   "text.mp4: no frame decoded", "<a> missing.glb: no such file", "<a> #nowhere: no element",
                   "<a> /etc/hostname: absolute"):
        assert expect in problems, (expect, problems)


def test_real_multirun_gallery_opens_cleanly_in_chromium(tiny_latent_model, tmp_path):
    """`text23d -m` on the tiny model, three jobs, one failing: the sweep's index.html (and one
    job's run page, as run.py writes it) load in headless Chromium from file:// with no console
    error, every image and H.264 video decodes, every link names a file that exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # The third job's model is not there: it fails when the job loads it (a sweep checks every job's
    # settings before the first starts, so a bad value would stop the whole sweep instead).
    missing = tmp_path / "no-such-model"
    cmd = [TEXT23D, "-m", f"prompt={PROMPT}", "debug=smoke",
           f"prior.pretrained_model_name_or_path={tiny_latent_model},{tiny_latent_model},{missing}",
           f"output_root={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_steps=1",
           "export.video_views=4", "seed=0"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "no-such-model" in p.stderr, p.stderr[-3000:]
    [sweep] = (tmp_path / "multirun").iterdir()
    page = read_page(sweep / "index.html")
    assert len(page.cards) == 3 and "FAILED" in page.cards["job-2"] and "does not exist" in page.cards["job-2"]
    assert all("OK" in page.cards[f"job-{n}"] and PROMPT in page.cards[f"job-{n}"] for n in (0, 1))
    assert_links_resolve(page, sweep)
    run = next(sweep.glob("0-*"))
    assert write_run_page(run) == str(run / "index.html")
    if NO_BROWSER:
        pytest.skip(WHY)
    code, result = check_in_browser(sweep / "index.html", run / "index.html")
    assert code == 0, json.dumps(result, indent=1)[-4000:]
    swept, single = result[str(sweep / "index.html")], result[str(run / "index.html")]
    assert len(swept["images"]) == 2 and len(swept["videos"]) == 2 and len(single["videos"]) == 1
    # rgb | normals at export.video_resolution=32, decoded by the browser
    assert all((v["width"], v["height"]) == (64, 32) for v in swept["videos"] + single["videos"])
    assert single["title"] == PROMPT  # the escaped title reads back as the prompt
