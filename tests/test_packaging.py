"""A non-editable install carries the config tree: `text23d --help` works from the wheel alone."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_config_tree_and_the_cli_runs_from_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    [wheel] = list((tmp_path / "dist").glob("text23d-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in (ROOT / "conf").rglob("*.yaml"):
        assert f"text23d/conf/{conf.relative_to(ROOT / 'conf')}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = "import text23d, sys; assert text23d.__file__.startswith(sys.argv[1]), text23d.__file__; " \
           "sys.argv = ['text23d', '--help']; from text23d.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "system: dreamfusion (= sds), magic3d, prolificdreamer (= vsd)" in p.stdout  # conf/hydra/ shipped
    code = code.replace("'--help'", "'prompt=x', 'system=sds', '--cfg', 'job'")
    p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "DreamFusion" in p.stdout, p.stderr
