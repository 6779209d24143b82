"""`text23d`: a Hydra app around `text23d.run.run`.

Before Hydra reads the command line, `rewrite_argv` does what Hydra cannot:
- Prompts are user text, taken literally: `prompt=` and `negative_prompt=` take the rest of the
  argument as typed (commas, quotes, backslashes, emoji, `${...}`), handed to Hydra quoted
  (text23d.overrides). In a multirun (`-m`), commas separate prompts (`-m prompt="a cat","a dog"`:
  two jobs; a quoted piece keeps its commas), and `prompt_file=prompts.txt` gives one job a line.
- `resume=<run dir or ckpt>` and `export=<run dir or ckpt>` write into the run folder they name
  (hydra.run.dir) instead of a new one (`export=X` is shorthand for `export.ckpt=X`).
Then `text23d.launch.preflight` composes and checks every job once, before anything is written or
loaded, and Hydra's own @hydra.main runs them. A user error (text23d.errors.Text23dError) is one
line, `text23d: error: ...`, and exit code 2 (a stopped run: its own code), never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from text23d import config as _config  # noqa: F401  (registers the ${slug:} resolver)
from text23d.errors import ConfigError, Text23dError
from text23d.faults import Interrupted
from text23d.launch import is_multirun, preflight, record_failure, sweep_failure
from text23d.overrides import literal, split_prompts
from text23d.runfolder import check_new_run_folder, discard_refused_run

log = logging.getLogger("text23d")
FREE_TEXT_KEYS = ("prompt", "negative_prompt")  # their values are literal text, never config syntax
_ORIGINAL_ARGV: list[str] = []


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-blank line, as typed (surrounding whitespace dropped)."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt_file={path!r} does not exist. Fix: pass a text file with one prompt "
                          "a line, e.g. prompt_file=prompts.txt") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={path!r} cannot be read as UTF-8 text ({e}). "
                          "Fix: save it as a UTF-8 text file, one prompt a line") from None
    for n, line in enumerate(lines, 1):
        _config.check_printable(line.strip(), f"prompt_file={path!r} line {n}")
    if not any(line.strip() for line in lines):
        raise ConfigError(f"prompt_file={path!r} holds no prompt (only blank lines). Fix: write one prompt a line")
    return [line.strip() for line in lines if line.strip()]


def rewrite_argv(argv: list[str]) -> tuple[list[str], int]:
    """The arguments Hydra gets, and how many prompts they name (more than 1 only in a multirun)."""
    multirun = is_multirun(argv)
    out, extra, prompt_file, n_prompts = [], [], None, 1
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in FREE_TEXT_KEYS:
            texts = split_prompts(value) if multirun else [value]
            n_prompts = len(texts) if key.lstrip("+") == "prompt" else n_prompts
            out.append(f"{key}={','.join(literal(t) for t in texts)}")
        elif sep and key == "prompt_file":
            prompt_file = value
        elif sep and key == "init_from" and value:
            out.append(f"init_from={literal(value)}")
        elif sep and key in ("resume", "export") and value:
            from text23d.checkpoint import find_checkpoint, run_dir_of  # torch and Lightning: only here

            out.append(f"resume={literal(value)}" if key == "resume" else f"export.ckpt={literal(value)}")
            extra = [f"hydra.run.dir={literal(str(run_dir_of(find_checkpoint(value))))}", "hydra.output_subdir=null"]
        else:
            out.append(arg)
    if prompt_file is not None:
        if any(a.partition("=")[0].lstrip("+") == "prompt" for a in out):
            raise ConfigError("prompt= and prompt_file= were both given. Fix: pass one of them")
        prompts = read_prompt_file(prompt_file)
        if len(prompts) > 1 and not multirun:
            raise ConfigError(f"prompt_file={prompt_file!r} holds {len(prompts)} prompts; a single run takes "
                              "one. Fix: sweep them with -m (text23d -m prompt_file=...), one job each")
        out.append(f"prompt={','.join(literal(p) for p in prompts)}")
        n_prompts = len(prompts)
    return out + extra, n_prompts


@hydra.main(version_base="1.3", config_path="pkg://text23d.conf", config_name="config")
def _hydra_main(cfg: DictConfig):
    # Processes started again from sys.argv (Lightning's DDP launcher) must see what the user
    # typed, and rewrite it themselves, not the quoted form made for this process's Hydra.
    if _ORIGINAL_ARGV:
        sys.argv = list(_ORIGINAL_ARGV)
    hc = HydraConfig.get()
    sweep, given_dir = hc.mode.name == "MULTIRUN", cfg.get("output_dir")
    cfg.output_dir = given_dir or hc.runtime.output_dir
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
    from text23d.faults import requeued, submitit_job

    if not cfg.get("resume") and requeued(cfg.output_dir) and Path(cfg.output_dir, "ckpts", "last.ckpt").is_file():
        # Pre-empted or timed out, and started again by submitit with the same overrides: go on.
        log.warning("submitit job %s was requeued: resuming %s from its last checkpoint", submitit_job(), cfg.output_dir)
        cfg.resume, overrides = str(cfg.output_dir), []
    new = not cfg.get("resume") and not cfg.export.get("ckpt")
    try:
        if new and not given_dir and not any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra):
            check_new_run_folder(cfg.output_dir, None)  # named by Hydra as the job started: unknown to the pre-flight
        from text23d.run import run

        # Unresolved: reading the list item by item would resolve the escaped `\${` of a prompt.
        return run(cfg, overrides=overrides, checked=True)  # the pre-flight checked this very config
    except Text23dError as e:  # a refusal, or a stop with the state saved (faults.RunStopped)
        log.error("%s", e)
        if sweep and not isinstance(e, Interrupted):  # a signal ends the whole sweep, other errors one job
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise  # the user's: Hydra shows it in full at the sweep's end
            return record_failure(hc.runtime.output_dir, e)  # the other jobs go on; main() reports it
        if new and not given_dir and not sweep:
            discard_refused_run(Path(cfg.output_dir))
        raise SystemExit(getattr(e, "exit_code", 2)) from None


def main() -> None:
    _ORIGINAL_ARGV[:] = sys.argv
    # A log file that cannot be written (a full disk) must not print a traceback per message:
    # the error that matters is reported on its own (faults.DiskFull).
    logging.raiseExceptions = False
    try:
        argv, n_prompts = rewrite_argv(sys.argv[1:])
        if n_prompts > 1:  # never silent: a prompt with a comma would otherwise split unnoticed
            print(f"text23d: sweeping {n_prompts} prompts (in -m, commas separate prompts; quote one to keep "
                  "its commas, or use prompt_file=)", file=sys.stderr)
        sweep_dir = preflight(argv)
    except Text23dError as e:
        print(f"text23d: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # A multirun's folder as the pre-flight resolved and checked it, where its jobs record failures.
    sys.argv = [sys.argv[0], *argv, *([f"hydra.sweep.dir={literal(sweep_dir)}"] if sweep_dir else [])]
    _hydra_main()
    failed = sweep_failure(sweep_dir) if sweep_dir else None
    if failed:
        print(f"text23d: error: {failed[0]}", file=sys.stderr)
        raise SystemExit(failed[1])


if __name__ == "__main__":
    main()
