"""The `text23d` command as a user runs it: real processes, real Hydra, real launchers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEXT23D = str(Path(sys.executable).parent / "text23d")


def cli(*args, cwd, timeout=300, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([TEXT23D, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def smoke(model, root):
    return ["debug=smoke", f"prior.pretrained_model_name_or_path={model}", f"output_root={root}",
            "trainer.enable_progress_bar=false"]


INTERNAL_GROUPS = {"hydra", "tuned", "pair", "debug_size"}  # picked by the config itself, never by a user


def test_help_lists_the_groups_a_user_chooses_and_every_option_of_each(tmp_path):
    """--help names every option of every group a user picks (as conf/ holds them), and none of the
    groups the config picks by itself (tuned, pair, debug_size) or the schemas (schema/...)."""
    import re

    code, out = cli("--help", cwd=tmp_path)
    assert code == 0
    listed = out.split("== Config groups")[1].split("== Hydra flags")[0]
    groups = dict(re.findall(r"^(\w+): (.+)$", listed, flags=re.M))
    conf = Path(__file__).resolve().parents[1] / "conf"
    expected = {d.name: {f.stem for f in d.glob("*.yaml")} for d in conf.iterdir()
                if d.is_dir() and d.name not in INTERNAL_GROUPS and not d.name.startswith("_")}
    assert set(groups) == set(expected)
    for group, options in groups.items():
        assert set(re.findall(r"\w+", re.sub(r"\(= (\w+)\)", r" \1", options))) == expected[group], group
    assert "schema" not in listed and "tuned:" not in listed
    for word in ("resume=", "export=", "prompt_file=", "debug=smoke prior=builtin"):
        assert word in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    code, out = cli("prompt=a red cube", "system=sds", "debug=smoke", "trainer.max_steps=9", "--cfg", "job",
                    cwd=tmp_path)
    assert code == 0 and "max_steps: 9" in out and "DreamFusion" in out


def test_shell_completion_completes_groups(tmp_path):
    env = {**os.environ, "COMP_LINE": "text23d syst", "COMP_POINT": "12"}
    p = subprocess.run([TEXT23D, "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "system=" in p.stdout


@pytest.mark.parametrize("args,expect", [
    (["debug=smoke"], 'prompt is empty'),
    (["prompt=x", "system=nope"], "Available options in 'system'"),
    (["prompt=x", "trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["prompt=x", "trainer.max_stepz=5"], "max_stepz"),
    (["prompt=x", "resume=/nonexistent/run"], "does not exist"),
    (["export=/nonexistent/run"], "does not exist"),
    (["prompt=x", "seed=-1"], "seed=-1: must be an integer in [0, 4294967295]"),
    (["prompt=x", "seed=4294967296"], "seed=4294967296"),
    (["prompt=x", "seed=1.5"], "seed=1.5"),
    (["prompt=x", "guidance=vsd"], "guidance VSDGuidance needs each view's camera pose"),
    (["prompt=x", "system=vsd", "guidance=sds"], "Fix: guidance=vsd"),
    (["prompt_file=/nonexistent/prompts.txt"], "prompt_file='/nonexistent/prompts.txt' does not exist"),
    (["prompt=x", "prompt_file=/dev/null"], "prompt= and prompt_file= were both given"),
    (["-m", "prompt=a cat,'a dog"], "a quote (') is not closed"),
    (["-m", "prompt=x", "--cfg", "hydra"], "-m with --cfg: a sweep cannot also print its config or info. Fix: drop -m"),
    (["-m", "prompt=x,y", "--cfg=job"], "-m with --cfg: a sweep cannot also print"),
    (["--multirun", "prompt=x", "--info"], "-m with --info"),
    # a sweep checks every job before the first starts: the bad value of the last job is refused up front
    (["-m", "prompt=x", "prior=builtin", "guidance.guidance_scale=7.5,-1"],
     "job 1 of 2 (guidance.guidance_scale=-1): guidance.guidance_scale=-1.0: must be a finite number ≥ 0"),
    (["-m", "prompt=a cat,a dog", "prior=builtin", "trainer.max_steps=5,0"], "job 1 of 4 (prompt='a cat' trainer.max_steps=0)"),
])
def test_bad_input_gives_a_clear_error_not_a_traceback(tmp_path, args, expect):
    code, out = cli(*args, f"output_root={tmp_path}", cwd=tmp_path)
    assert code != 0
    assert expect in out
    assert "Traceback" not in out
    assert not (tmp_path / "multirun").exists()  # a refused sweep started no job


def test_unreadable_model_folder_and_corrupt_checkpoint(tmp_path):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "model_index.json").write_text("{ not json")
    code, out = cli("prompt=x", *smoke(bad_model, tmp_path), cwd=tmp_path)
    assert code != 0 and str(bad_model) in out and "Traceback" not in out
    ckpt = tmp_path / "run" / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(os.urandom(100))
    code, out = cli(f"resume={ckpt}", cwd=tmp_path)
    assert code != 0 and "cannot read checkpoint" in out and "Traceback" not in out


def test_hostile_prompt_runs_into_a_safe_folder_inside_outputs(tiny_latent_model, tmp_path):
    prompt = ("a 🍔 hamburger/../../etc " * 100)[:2000]
    root = tmp_path / "outputs"
    code, out = cli(f"prompt={prompt}", *smoke(tiny_latent_model, root), "trainer.max_steps=1",
                    "export.video_views=2", cwd=tmp_path)
    assert code == 0, out
    [run_dir] = list((root / "dreamfusion").iterdir())
    assert run_dir.resolve().parent == (root / "dreamfusion").resolve()
    assert len(run_dir.name) < 80 and run_dir.name.isascii()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prompt"] == prompt
    assert not (tmp_path / "etc").exists()
    # text23d's summary line prints once, and reaches the run's log file too; Lightning's start-up INFO
    # (GPU/TPU available, its cloud-logger advertisement) is not printed (tests/test_console.py).
    assert sum("text23d: dreamfusion on" in line for line in out.splitlines()) == 1, out
    assert "text23d: dreamfusion on" in (run_dir / "text23d.log").read_text()
    assert "GPU available" not in out


def _sweep(tiny_latent_model, tmp_path, *launcher):
    code, out = cli("-m", "prompt=a red cube", *smoke(tiny_latent_model, tmp_path), "trainer.max_steps=2",
                    "export.video_views=2", "guidance.guidance_scale=7.5,100", *launcher, cwd=tmp_path, timeout=600)
    assert code == 0, out
    [sweep] = list((tmp_path / "multirun").iterdir())
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    return sweep, summary


def test_multirun_runs_one_job_per_value_and_summarises(tiny_latent_model, tmp_path):
    sweep, summary = _sweep(tiny_latent_model, tmp_path)
    jobs = summary  # sweep_summary.json is a list of jobs
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
    swept = {o for j in jobs for o in j["overrides"] if o.startswith("guidance.guidance_scale=")}
    assert swept == {"guidance.guidance_scale=7.5", "guidance.guidance_scale=100"}
    assert len({j["folder"] for j in jobs}) == 2
    table = (sweep / "sweep_summary.md").read_text()
    assert "guidance.guidance_scale" in table and "7.5" in table and "100" in table
    assert (sweep / "sweep_grid.png").stat().st_size > 0


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]])
def test_parallel_and_cluster_launchers(tiny_latent_model, tmp_path, launcher):
    sweep, summary = _sweep(tiny_latent_model, tmp_path, *launcher)
    jobs = summary
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)


# --- prompts are literal text ------------------------------------------------------------------

def _encoded_texts(cache: Path) -> set:
    """What the text encoder was given: the texts behind the run's cached embeddings."""
    from safetensors import safe_open

    texts = set()
    for path in cache.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            texts.add(f.metadata()["text"])
    return texts


@pytest.mark.parametrize("prompt", [
    "a DSLR photo of a pineapple, highly detailed",
    "🍍 a pineapple",
    "a back\\slash, a \\${escaped} one and a trailing \\",
    "${oc.env:HOME}",
    "it's \"quoted\" [a,b]=null",
])
def test_a_prompt_is_taken_literally_as_typed(tiny_latent_model, tmp_path, prompt):
    cache = tmp_path / "cache"
    code, out = cli(f"prompt={prompt}", *smoke(tiny_latent_model, tmp_path / "o"), "trainer.max_steps=1",
                    "export.video_views=2", cwd=tmp_path, env={"TEXT23D_CACHE": str(cache)})
    assert code == 0, out
    [run_dir] = list((tmp_path / "o" / "dreamfusion").iterdir())
    assert json.loads((run_dir / "summary.json").read_text())["prompt"] == prompt
    # What the model was conditioned on is the prompt itself (plus the view suffix), nothing read
    # from the environment or the config; config.yaml loads back to the same text.
    assert f"{prompt}, front view" in _encoded_texts(cache)
    from omegaconf import OmegaConf
    assert OmegaConf.load(run_dir / "config.yaml").prompt == prompt
    if prompt == "${oc.env:HOME}":  # and it stays literal when the run is resumed
        code, out = cli(f"resume={run_dir}", "trainer.max_steps=2", cwd=tmp_path, env={"TEXT23D_CACHE": str(cache)})
        assert code == 0, out
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["prompt"] == prompt
        assert os.environ["HOME"] not in {t.split(",")[0] for t in _encoded_texts(cache)}


def _sweep_prompts(root: Path) -> list[str]:
    [sweep] = list((root / "multirun").iterdir())
    return sorted(json.loads(p.read_text())["prompt"] for p in sweep.glob("*/summary.json"))


def test_multirun_sweeps_prompts_separated_by_commas(tiny_latent_model, tmp_path):
    code, out = cli("-m", "prompt=a red cube,'a blue, cone'", *smoke(tiny_latent_model, tmp_path), "trainer.max_steps=1",
                    "export.video_views=2", cwd=tmp_path, timeout=600)
    assert code == 0, out
    assert "sweeping 2 prompts" in out
    assert _sweep_prompts(tmp_path) == ["a blue, cone", "a red cube"]


def test_multirun_over_a_prompt_file_one_job_per_line(tiny_latent_model, tmp_path):
    lines = ["🍍 a pineapple, highly detailed", "${oc.env:HOME}"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines[:1] + ["", "   "] + lines[1:]) + "\n", encoding="utf-8")
    code, out = cli("-m", "prompt_file=prompts.txt", *smoke(tiny_latent_model, tmp_path), "trainer.max_steps=1",
                    "export.video_views=2", cwd=tmp_path, timeout=600)
    assert code == 0, out
    assert _sweep_prompts(tmp_path) == sorted(lines)
    code, out = cli("prompt_file=prompts.txt", cwd=tmp_path)  # a single run takes one prompt
    assert code == 2 and "holds 2 prompts" in out and "-m" in out and "Traceback" not in out


def test_builtin_prior_names_the_words_it_does_not_know(tmp_path):
    cache = tmp_path / "cache"
    code, out = cli("prompt=An orange PINEAPPLE 🍍", "prior=builtin", "debug=smoke", f"output_root={tmp_path}",
                    "trainer.max_steps=1", "export.video_views=2", "trainer.enable_progress_bar=false",
                    cwd=tmp_path, env={"TEXT23D_CACHE": str(cache)})
    assert code == 0, out
    [line] = [x for x in out.splitlines() if "does not know" in x]  # one warning, at the start
    assert "'pineapple', '🍍'" in line and "It knows: a back black blue cone cube" in line
    assert "'an'" not in line and "'orange'" not in line
    assert "a orange PINEAPPLE 🍍, front view" in _encoded_texts(cache)  # "an" read as "a"


def test_a_value_refused_before_training_leaves_no_run_folder(tmp_path):
    code, out = cli('prompt=a red cube, on a table', "prior=builtin", "debug=smoke", "export.resolution=-1",
                    f"output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert code == 2 and "export.resolution=-1: must be an integer in [2, 1024]" in out and "Traceback" not in out
    assert not (tmp_path / "out" / "dreamfusion").exists()  # no half-made run to trip over later


# --- the thin CLI: Hydra's errors, HYDRA_FULL_ERROR, checks that run once ------------------------

def test_hydra_full_error_is_the_users_to_set(tmp_path):
    """text23d never sets HYDRA_FULL_ERROR: a job sees the user's environment as it is. Without it,
    an unknown key is one line; with the user's HYDRA_FULL_ERROR=1, Hydra shows it in full."""
    code, out = cli("prompt=x", "+probe=${oc.env:HYDRA_FULL_ERROR,unset}", "--cfg", "job", "--resolve", cwd=tmp_path,
                    env={"HYDRA_FULL_ERROR": "0"})
    assert code == 0 and "probe: '0'" in out, out
    code, out = cli("prompt=x", "trainer.max_stepz=5", f"output_root={tmp_path}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "Traceback" not in out
    assert [line for line in out.splitlines() if line.strip()] == [
        "text23d: error: trainer.max_stepz=5: no such key (trainer has: " + out.split("(trainer has: ")[1].strip()]
    code, out = cli("prompt=x", "trainer.max_stepz=5", f"output_root={tmp_path}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert code != 0 and "Traceback" in out and "max_stepz" in out and "text23d: error" not in out
    assert not (tmp_path / "dreamfusion").exists()


def _reworded(e: BaseException) -> BaseException:
    """`e` with the same type and attributes but another message (and its cause's message too)."""
    other = e.__class__.__new__(e.__class__)
    other.__dict__.update(e.__dict__)
    other.args = ("a message Hydra might word differently one day",)
    if e.__cause__ is not None:
        other.__cause__ = _reworded(e.__cause__)
        if hasattr(other.__cause__, "msg"):
            other.__cause__.msg = "reworded too"
    return other


@pytest.mark.parametrize("overrides,expect", [
    (["prompt=x", "system=dreamfusio"], "system=dreamfusio: no such option. Available options in 'system': dreamfusion"),
    (["prompt=x", "trainer.max_stepz=5"], "did you mean trainer.max_steps=5? Or +trainer.max_stepz=5"),
    (["prompt=x", "geometri=grid"], "geometri=grid: no such key"),
    (["prompt=x", "trainer.max_steps=[1,"], "cannot read the override 'trainer.max_steps=[1,'"),
    (["prompt=x", "seed=abc"], "seed='abc': must be an integer in [0, 4294967295]"),  # the schema's type
])
def test_hydra_errors_are_told_from_their_types_not_their_wording(overrides, expect):
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from text23d.launch import describe_hydra_error

    with initialize_config_module("text23d.conf", version_base="1.3"), pytest.raises(HydraException) as caught:
        compose("config", overrides=overrides)
    said = describe_hydra_error(caught.value, overrides)
    assert expect in said and "Fix:" in said and "\n" not in said
    assert describe_hydra_error(_reworded(caught.value), overrides) == said


CHECKS_COUNTED = """
import sys
import text23d.run, text23d.runfolder as folders
calls, real = [], folders.check_new_run_folder
folders.check_new_run_folder = lambda *a: (calls.append(a), real(*a))[1]
# what is checked before a run, not the run; the run is told the config was checked (it does not check again)
text23d.run.run = lambda cfg, overrides=None, checked=False: print("run told checked:", checked) or {}
from text23d.cli import main
sys.argv[0] = "text23d"
main()
print("folder checks:", [key for _, key in calls])
"""


@pytest.mark.parametrize("chosen", [True, False])
def test_a_new_run_folder_is_checked_once(tmp_path, chosen):
    """The pre-flight checks a folder the user chose, the job only text23d's own timestamped one
    (named as the job starts): each exactly once."""
    (tmp_path / "empty").mkdir()
    folder = [f"output_dir={tmp_path / 'empty'}"] if chosen else []
    p = subprocess.run([sys.executable, "-c", CHECKS_COUNTED, "prompt=x", "prior=builtin", f"output_root={tmp_path}",
                        *folder], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"folder checks: {['output_dir'] if chosen else [None]}" in p.stdout, p.stdout + p.stderr[-3000:]
    assert "run told checked: True" in p.stdout


def test_a_sweep_goes_on_past_a_failed_job_and_names_its_summary_last(tmp_path):
    missing = [str(tmp_path / "no-such-model-a"), str(tmp_path / "no-such-model-b")]
    code, out = cli("-m", "prompt=a red cube", "prior=builtin", "debug=smoke", f"output_root={tmp_path}",
                    f"prior.pretrained_model_name_or_path={','.join(missing)}", cwd=tmp_path)
    [sweep] = list((tmp_path / "multirun").iterdir())
    last = out.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert last.startswith("text23d: error: prior ") and "no-such-model-a" in last
    assert last.endswith(f"(2 of 2 jobs of the sweep failed. Every job's status: {sweep / 'sweep_summary.md'})")
    jobs = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in jobs] == ["failed", "failed"]  # both ran: the first failure did not stop the sweep
