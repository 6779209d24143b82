"""What a user sees on the console of a short run and its resume: one progress bar, each line once,
nothing they cannot act on; and what the run leaves (a validation image even for a run shorter
than validation.every_n_steps, absolute folders after a resume from a relative path)."""
import json
import os
import subprocess
import sys
from pathlib import Path

TEXT23D = str(Path(sys.executable).parent / "text23d")
SHORT = ["prior=builtin", "debug=smoke", "validation.every_n_steps=100", "export.texture=false",
         "export.video_views=2", "output_root=out"]


def text23d(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run([TEXT23D, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout.replace("\r", "\n"), p.stderr.replace("\r", "\n")


def test_a_short_run_and_its_resume_have_a_quiet_console(tmp_path):
    code, out, err = text23d(["prompt=a red cube", "trainer.max_steps=3", *SHORT], tmp_path)
    assert code == 0, err[-3000:]
    console = out + err
    for noise in ("GPU available", "TPU available", "litlogger", "FLOPs", "Epoch 0", "Training:", "LeafSpec",
                  "Warning", "warn("):
        assert noise not in console, (noise, console[-3000:])
    bars = {line.split(":")[0] for line in console.splitlines() if "it/s]" in line or "s/it]" in line}
    assert bars == {"steps"}, bars  # one bar, named in steps
    lines = [line.split("] - ", 1)[-1] for line in console.splitlines() if "][text23d][" in line]
    assert len(lines) == len(set(lines)), lines  # every line once
    [run] = list((tmp_path / "out" / "dreamfusion").iterdir())
    assert (run / "save" / "it000003-val.png").is_file()  # 3 steps < every_n_steps: the run's end still gets one

    relative = os.path.relpath(run, tmp_path)
    code, out, err = text23d([f"resume={relative}", "trainer.max_steps=5"], tmp_path)
    assert code == 0, err[-3000:]
    rates = [line for line in (out + err).splitlines() if "it/s" in line or "s/it" in line]
    assert rates and not any(", -" in line or "[-" in line for line in rates), rates  # no negative it/s or ETA
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and Path(summary["output_dir"]).is_absolute()
    assert Path(summary["resumed_from"]).is_absolute() and summary["output_dir"] == str(run.resolve())
    assert summary["train_time_s"] == round(sum(s["train_time_s"] for s in summary["stages"]), 2)
    assert (run / "save" / "it000005-val.png").is_file()


def test_an_accelerator_is_suggested_only_where_it_would_run(caplog):
    """On a machine without CUDA the torch path is said once at INFO, with no install suggestion
    (nvdiffrast and tinycudann need CUDA); the suggestion is for a GPU machine that lacks them."""
    import logging

    import torch

    from text23d import accel

    accel._warned.discard("nvdiffrast")
    with caplog.at_level(logging.INFO, logger="text23d"):
        assert accel.choose("renderer", "auto", "nvdiffrast") == "torch"
        assert accel.choose("renderer", "auto", "nvdiffrast") == "torch"
    said = [r for r in caplog.records if "nvdiffrast" in r.getMessage()]
    assert len(said) == 1  # once
    if not torch.cuda.is_available():
        assert said[0].levelno == logging.INFO and "pip install" not in said[0].getMessage()
    else:
        assert said[0].levelno == logging.WARNING and "pip install" in said[0].getMessage()


def test_a_run_refused_while_loading_leaves_only_its_log_and_says_so_on_stderr(tmp_path):
    """A model that is not there is found only as the run loads, after Hydra made the run folder: the
    folder goes (nothing was made in it), its log stays under output_root/.failed/, and the error is one
    line on stderr in the CLI's own format (`text23d: error: ...`), none on stdout."""
    code, out, err = text23d(["prompt=a red cube", f"prior.pretrained_model_name_or_path={tmp_path / 'missing'}",
                              "output_root=out"], tmp_path)
    assert code == 2
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("text23d: error: prior ") and "Fix:" in errors[0], err
    assert "ERROR" not in out and "error" not in out.lower(), out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".failed"]
    [log] = list((tmp_path / "out" / ".failed").iterdir())
    assert log.name.startswith("a_red_cube@") and log.suffix == ".log" and "[ERROR]" in log.read_text()
