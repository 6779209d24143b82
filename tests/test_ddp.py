"""DDP on CPU: two processes on gloo, through the real `text23d` command (Lightning starts rank 1 by
running the command again, with the run folder fixed). The ranks must draw their own cameras and
noise, rank 0 alone writes files, a fault on one rank ends the job, and a DDP run resumes.

Each DDP run starts two Python processes (about a minute on a 2-core machine), so most tests here
are `slow`. Every command runs in its own process group under a timeout: a hung job fails the test,
and no rank outlives it."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TEXT23D = str(Path(sys.executable).parent / "text23d")
TIMEOUT = 300
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def launch(cmd: list[str], cwd, timeout: int = TIMEOUT) -> tuple[int, str]:
    """Run `cmd`, return its exit code and output. One thread a process (both ranks fit two cores,
    and runs compared with each other do their arithmetic alike)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # every rank: they share the session
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} … hung: no exit within {timeout} s. Its output ends:\n{out[-3000:]}")
    return p.returncode, out


def text23d(*args, cwd) -> tuple[int, str]:
    return launch([TEXT23D, *args], cwd)


def smoke(model, root, *extra) -> list[str]:
    return ["prompt=a red cube", "debug=smoke", f"prior.pretrained_model_name_or_path={model}",
            f"output_root={root}", "trainer.enable_progress_bar=false", *extra]


def run_folder(root: Path) -> Path:
    [folder] = (root / "dreamfusion").iterdir()  # one run folder: rank 1 made no folder of its own
    return folder


def losses(csv_path: Path) -> dict[int, str]:
    """train/loss by step, as logged (text: compared exactly)."""
    with open(csv_path) as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def files(folder: Path) -> set[str]:
    """The files of a run, by path (TensorBoard's event file named without its time stamp and pid)."""
    names = set()
    for p in folder.rglob("*"):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            names.add("logs/tensorboard/events.out.tfevents" if "tfevents" in rel else rel)
    return names


@pytest.mark.slow
def test_two_ranks_train_on_their_own_views_and_rank_0_alone_writes(tiny_pixel_model, tmp_path):
    # The 1-process run goes through DDP too (trainer.devices=1): the same code path and seeding
    # for rank 0, so the two runs differ only in having a rank 1 or not.
    code, out = text23d(*smoke(tiny_pixel_model, tmp_path / "one", "trainer.devices=1", "trainer.strategy=ddp"),
                        cwd=tmp_path)
    assert code == 0, out[-3000:]
    code, out = text23d(*smoke(tiny_pixel_model, tmp_path / "two", *DDP), cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert "Starting with 2 processes" in out
    one, two = run_folder(tmp_path / "one"), run_folder(tmp_path / "two")
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["steps"], s1["world_size"]) == (4, 1) and (s2["steps"], s2["world_size"]) == (4, 2)

    # Rank 0 draws what the single process draws: step 0 (same weights, same views) logs the same
    # loss. After it the runs part: the update averaged rank 0's gradient with rank 1's. Had rank 1
    # drawn rank 0's cameras and noise, that average would be rank 0's gradient exactly, and the
    # weights would stay bit-identical to the 1-process run's.
    l1, l2 = losses(one / "logs/csv/metrics.csv"), losses(two / "logs/csv/metrics.csv")
    assert sorted(l1) == sorted(l2) == [0, 1, 2, 3]
    assert l1[0] == l2[0], (l1, l2)
    w1 = torch.load(one / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(two / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    moved = [k for k in w1 if w1[k].is_floating_point() and not torch.equal(w1[k], w2[k])]
    assert any(k.startswith("stages.0.particles.0.geometry.") for k in moved), moved

    # Rank 0 alone writes: the same files as the 1-process run (one summary, one export, no
    # temporary file left), plus rank 1's own log, which shows it trained and exported nothing.
    assert files(two) == files(one) | {"train_ddp_process_1.log"}, files(two) ^ files(one)
    assert [p.name for p in (tmp_path / "two").rglob("summary.json")] == ["summary.json"]
    assert not [p for p in two.rglob("*") if ".tmp" in p.name]
    for path in s2["artifacts"].values():
        assert not isinstance(path, str) or Path(path).exists(), path
    rank1 = (two / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1" in rank1 and "dreamfusion on cpu" in rank1
    assert "done:" not in rank1 and "textured mesh" not in rank1


@pytest.mark.slow
def test_a_fault_on_rank_1_ends_the_job_and_the_ddp_run_resumes(tiny_pixel_model, tmp_path):
    code, out = text23d(*smoke(tiny_pixel_model, tmp_path, *DDP, "faults.raise_at_step=3", "faults.rank=1"),
                        cwd=tmp_path)
    # Rank 0 waits in the gradient all-reduce of step 3; rank 1's exit closes gloo's connection
    # (or Lightning's watcher kills rank 0): the job ends, with rank 1's error in the output.
    assert code != 0, out[-3000:]
    assert "injected fault" in out and "faults.raise_at_step=3" in out
    run = run_folder(tmp_path)
    assert torch.load(run / "ckpts/last.ckpt", weights_only=True)["global_step"] == 2  # every 2 steps
    assert not (run / "summary.json").exists() and not list(run.glob("save/*-export"))

    code, out = text23d(f"resume={run}", "faults.raise_at_step=null", cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert "Starting with 2 processes" in out  # the saved trainer settings: DDP again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert summary["resumed_from"] == str(run / "ckpts" / "last.ckpt")
    assert sorted(losses(run / "logs/csv/resumed-2/metrics.csv")) == [2, 3]  # went on from step 2
    assert Path(summary["artifacts"]["video"]).is_file() and Path(summary["artifacts"]["mesh_obj"]).is_file()


@pytest.mark.slow
def test_out_of_memory_on_rank_1_ends_the_job(tiny_pixel_model, tmp_path):
    # An out-of-memory error is saved from on one process; under DDP the other rank waits in a
    # collective that such a save never joins, so the rank that ran out exits instead.
    code, out = text23d(*smoke(tiny_pixel_model, tmp_path, *DDP, "faults.oom_at_step=3", "faults.rank=1"),
                        cwd=tmp_path)
    assert code != 0, out[-3000:]
    assert "out of memory in stage main" in out
    assert torch.load(run_folder(tmp_path) / "ckpts/last.ckpt", weights_only=True)["global_step"] == 2


# A script around text23d.run.run with a callback that records, on every rank and step, a digest
# of the RNG state (what the step draws its cameras and noise from) and of every parameter.
PROBE = """
    import hashlib, json, sys
    import lightning as L
    import torch
    from text23d.config import compose
    from text23d.run import run

    def digest(t):
        return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    class Probe(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen[f"rng{trainer.global_step}"] = digest(torch.get_rng_state())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seen[f"params{trainer.global_step}"] = {n: digest(p) for n, p in module.named_parameters()}

        def on_train_end(self, trainer, module):
            with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(self.seen, f)

    run(compose(sys.argv[2:]), callbacks=[Probe()])
"""


@pytest.mark.slow
def test_vsd_lora_stays_the_same_on_every_rank(tiny_pixel_model, tmp_path):
    """ProlificDreamer's LoRA trains with its own optimizer, outside what DDP syncs: its gradients
    are averaged by the system, so every rank holds the same LoRA (and the same particles) after
    every step, while each rank draws its own random numbers."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    code, out = launch([sys.executable, str(script), str(tmp_path), "prompt=a red cube", "system=vsd", "debug=smoke",
                        f"prior.pretrained_model_name_or_path={tiny_pixel_model}", f"output_dir={tmp_path / 'run'}",
                        "trainer.enable_progress_bar=false", "geometry=grid", "geometry.resolution=16",
                        "system.stages=[nerf]", "guidance.lora_pretrained_model_name_or_path=null",
                        "trainer.max_steps=3", *DDP], cwd=tmp_path)
    assert code == 0, out[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for step in (1, 2, 3):
        p0, p1 = r0[f"params{step}"], r1[f"params{step}"]
        assert p0 == p1, f"step {step}: differ across ranks: {[k for k in p0 if p0[k] != p1[k]][:4]}"
        assert r0[f"rng{step - 1}"] != r1[f"rng{step - 1}"]  # each rank its own cameras and noise
    lora = [k for k in r0["params3"] if k.startswith("lora_params.") and "lora_B" in k]
    assert lora and any(r0["params1"][k] != r0["params3"][k] for k in lora)  # and the LoRA trained
    assert (tmp_path / "run" / "ckpts" / "lora.safetensors").is_file()


@pytest.mark.parametrize("args,expect", [
    (["trainer.strategy=ddp_spawn"], "trainer.strategy=ddp_spawn: not supported"),
    (["-m", *DDP], "cannot run in a sweep (-m)"),
])
def test_ddp_settings_that_cannot_work_are_refused_with_the_fix(tiny_pixel_model, tmp_path, args, expect):
    code, out = text23d(*args, *smoke(tiny_pixel_model, tmp_path), cwd=tmp_path)
    assert code != 0 and expect in out and "Fix:" in out, out[-3000:]
    assert "Starting with 2 processes" not in out  # refused before any rank started
    assert not list(tmp_path.rglob("train_ddp_process_*.log")) and not list(tmp_path.rglob("ckpts"))
    assert len(list((tmp_path / "multirun").glob("*"))) <= 1  # a rank 1 would re-run the sweep elsewhere
