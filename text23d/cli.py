"""`text23d`: a Hydra app around `text23d.run.run`.

Before Hydra parses the command line, `rewrite_argv` does three things:
- Prompts are user text, taken literally. `prompt=` and `negative_prompt=` take the rest of the
  argument as typed (commas, quotes, backslashes, emoji, `${...}`) and hand Hydra a quoted,
  escaped value, so nothing in a prompt is parsed as override syntax or interpolated. In a
  multirun (`-m`), commas separate prompts (`-m prompt="a cat","a dog"`: two jobs; a quoted piece
  keeps its commas), and `prompt_file=prompts.txt` gives one job per line (text23d.overrides).
- `resume=<run dir or ckpt>` and `export=<run dir or ckpt>` write into the run folder they name,
  instead of creating a new one (`export=X` is shorthand for `export.ckpt=X`).
- user errors (text23d.errors.Text23dError) print one clear line and exit 2, no traceback; so do
  Hydra's own errors (an unknown key or option, override syntax), told in one line with the fix.

A new run is checked before anything expensive loads (config.validate, then its folder: a run never
starts in a folder that holds another run, see text23d.runfolder).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text23d import config as _config  # noqa: F401  (registers the ${slug:} resolver)
from text23d.errors import ConfigError, Text23dError
from text23d.faults import Interrupted, RunStopped
from text23d.overrides import literal, split_prompts, unquote
from text23d.runfolder import check_new_run_folder, discard_refused_run

log = logging.getLogger("text23d")
FREE_TEXT_KEYS = ("prompt", "negative_prompt")  # their values are literal text, never config syntax
_ORIGINAL_ARGV: list[str] = []
_TASK_STARTED = False  # Hydra has composed the config and called _hydra_main
PRINT_ONLY = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


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
    prompts = [line.strip() for line in lines if line.strip()]
    for n, line in enumerate(lines, 1):
        _config.check_printable(line.strip(), f"prompt_file={path!r} line {n}")
    if not prompts:
        raise ConfigError(f"prompt_file={path!r} holds no prompt (only blank lines). "
                          "Fix: write one prompt a line")
    return prompts


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)


def rewrite_argv(argv: list[str]) -> tuple[list[str], int]:
    """The arguments Hydra gets, and how many prompts they name (more than 1 only in a multirun)."""
    multirun = _is_multirun(argv)
    out, extra, prompt_file, n_prompts = [], [], None, 1
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if sep and bare in FREE_TEXT_KEYS:
            texts = split_prompts(value) if multirun else [value]
            n_prompts = len(texts) if bare == "prompt" else n_prompts
            out.append(f"{key}={','.join(literal(t) for t in texts)}")
        elif sep and key == "prompt_file":
            prompt_file = value
        elif sep and key == "init_from" and value:
            out.append(f"init_from={literal(value)}")
        elif sep and key in ("resume", "export") and value:
            from text23d.checkpoint import find_checkpoint, run_dir_of  # torch and Lightning: only here

            out.append(f"resume={literal(value)}" if key == "resume" else f"export.ckpt={literal(value)}")
            run_dir = run_dir_of(find_checkpoint(value))
            extra = [f"hydra.run.dir={literal(str(run_dir))}", "hydra.output_subdir=null"]
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
    global _TASK_STARTED
    _TASK_STARTED = True
    # Processes started again from sys.argv (Lightning's DDP launcher) must see what the user
    # typed, and rewrite it themselves, not the quoted form made for this process's Hydra.
    if _ORIGINAL_ARGV:
        sys.argv = list(_ORIGINAL_ARGV)
    hc = HydraConfig.get()
    given_dir = cfg.get("output_dir")
    if not given_dir:
        cfg.output_dir = hc.runtime.output_dir
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
    from text23d.faults import requeued, submitit_job

    if not cfg.get("resume") and requeued(cfg.output_dir) and Path(cfg.output_dir, "ckpts", "last.ckpt").is_file():
        # Pre-empted or timed out, and started again by submitit with the same overrides: go on.
        log.warning("submitit job %s was requeued: resuming %s from its last checkpoint", submitit_job(), cfg.output_dir)
        cfg.resume, overrides = str(cfg.output_dir), []
    try:
        if not cfg.get("resume") and not cfg.export.get("ckpt"):  # a new run: fail fast, before torch loads
            _config.check_resolves(cfg)
            _config.validate(cfg)
            chosen = given_dir or any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra)
            key = ("output_dir" if given_dir else "hydra.run.dir") if chosen else None
            check_new_run_folder(cfg.output_dir, key)
        from text23d.run import run

        # Unresolved: reading the list item by item would resolve the escaped `\${` of a prompt.
        return run(cfg, overrides=overrides)
    except RunStopped as e:  # state saved; a signal ends a whole sweep, a NaN/OOM stop only its job
        log.error("%s", e)
        if hc.mode.name == "MULTIRUN" and not isinstance(e, Interrupted):
            raise
        raise SystemExit(e.exit_code) from None
    except Text23dError as e:
        log.error("%s", e)
        # A folder text23d named, of a single run (a sweep's failed job keeps its folder: its gallery card)
        if not cfg.get("resume") and not cfg.export.get("ckpt") and not given_dir and hc.mode.name != "MULTIRUN":
            discard_refused_run(Path(cfg.output_dir))
        if hc.mode.name == "MULTIRUN":
            e.sweep_dir = str(Path(hc.runtime.cwd, hc.sweep.dir))  # for main's last line
            raise  # the sweep records the failed job; other jobs go on
        raise SystemExit(2) from None


def main() -> None:
    _ORIGINAL_ARGV[:] = sys.argv
    # A log file that cannot be written (a full disk) must not print a traceback per message:
    # the error that matters is reported on its own (faults.DiskFull).
    logging.raiseExceptions = False
    try:
        rewritten, n_prompts = rewrite_argv(sys.argv[1:])
    except Text23dError as e:
        print(f"text23d: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if n_prompts > 1:  # never silent: a prompt with a comma would otherwise split unnoticed
        print(f"text23d: sweeping {n_prompts} prompts (in -m, commas separate prompts; quote one to keep "
              "its commas, or use prompt_file=)", file=sys.stderr)
    sys.argv = [sys.argv[0], *rewritten]
    try:
        check_one_mode(sys.argv[1:])
        check_output_folders(sys.argv[1:])
        check_not_reused(sys.argv[1:])
        if _is_multirun(sys.argv[1:]) and not any(a.split("=")[0] in PRINT_ONLY for a in sys.argv[1:]):
            from text23d.sweep import check_sweep_jobs

            check_sweep_jobs(sys.argv[1:])
    except Text23dError as e:
        print(f"text23d: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # Hydra raises its errors to us instead of printing them; the user's own HYDRA_FULL_ERROR (kept
    # for the processes this one starts: DDP ranks) still shows them in full.
    user = "1" if os.environ.get("HYDRA_FULL_ERROR") else "0"
    debugging = os.environ.setdefault("TEXT23D_USER_HYDRA_FULL_ERROR", user) == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Text23dError as e:  # a failed job of a multirun (a single run exits in _hydra_main)
        if debugging:
            raise
        print(f"text23d: error: {e}{_sweep_note(e)}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    except (HydraException, OmegaConfBaseException) as e:
        if debugging or _TASK_STARTED:  # raised by text23d's own code: a bug, shown in full
            raise
        print(f"text23d: error: {describe_hydra_error(e, sys.argv[1:])}", file=sys.stderr)
        raise SystemExit(2) from None


def check_one_mode(argv: list[str]) -> None:
    """Hydra runs one mode at a time: a sweep (-m) cannot also print its config or info."""
    printing = [a.split("=")[0] for a in argv if a.split("=")[0] in ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")]
    if _is_multirun(argv) and printing:
        raise ConfigError(f"-m with {printing[0]}: a sweep cannot also print its config or info. Fix: drop -m and "
                          f"give one value per key to print one job's, or drop {printing[0]} to run the sweep")


def check_output_folders(argv: list[str]) -> None:
    """Hydra makes the run folder before text23d runs: check that it can, and say so plainly."""
    from text23d.fileio import check_writable

    if any(a in ("--help", "-h", "--cfg", "-c", "--info", "-i") or a.startswith(("--cfg", "--info", "-sc", "--shell"))
           for a in argv):
        return
    given = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    folders = {} if "hydra.run.dir" in given else {"output_root": given.get("output_root", "outputs")}
    folders.update({k: given[k] for k in ("output_dir", "hydra.run.dir", "hydra.sweep.dir") if k in given})
    for key, value in folders.items():
        value = value.strip("'\"")
        if value and "${" not in value and value != "null":
            check_writable(os.path.expanduser(value), key)


def check_not_reused(argv: list[str]) -> None:
    """Before Hydra writes its record (.hydra/) into a hydra.run.dir typed on the command line, and
    before torch loads for an output_dir: the folder of a new run must not hold another run. The
    job checks again the folder it got (`_hydra_main`)."""
    if _is_multirun(argv) or any(a.split("=")[0] in PRINT_ONLY for a in argv):
        return
    given = dict(a.partition("=")[::2] for a in argv if "=" in a and not a.startswith("-"))
    if given.get("resume", "null") not in ("", "null") or given.get("export.ckpt", "null") not in ("", "null"):
        return  # resume= and export= write into the run they name, on purpose
    for key in ("hydra.run.dir", "output_dir"):
        value = given.get(key, "")
        if value and "${" not in value and value != "null":
            check_new_run_folder(unquote(value), key)


# --- Hydra's own errors, in one line ----------------------------------------------------------------

def describe_hydra_error(e: BaseException, argv: list[str]) -> str:
    """One line for an error Hydra raised while reading the command line or composing the config:
    the bad override, what is allowed, the fix."""
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException

    from text23d.schema import describe

    said = describe(e.__cause__)  # a value of the wrong type for its schema field, worded from its rule
    if said is not None:
        return said
    text = str(e)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if isinstance(e, MissingConfigException) and missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        close = difflib.get_close_matches(option, options, n=1)
        fix = f"did you mean {group}={close[0]}?" if close else f"one of them, e.g. {group}={(options or ['...'])[0]}"
        return (f"{group}={option}: no such option. Available options in '{group}': {', '.join(options)}. "
                f"Fix: {fix} (text23d --help lists every group)")
    cause = e.__cause__
    if getattr(cause, "full_key", None) and text.startswith("Could not override"):
        key = cause.full_key
        typed = re.search(r"use \+(\S+)", text)
        typed = typed.group(1) if typed else f"{key}=..."
        parent = getattr(cause, "parent_node", None)
        known = [k for k in (parent.keys() if parent is not None else []) if k != "hydra"]
        close = difflib.get_close_matches(str(cause.key), known, n=1)
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        where = f"{parent_key} has" if parent_key else "the config has"
        meant = f"{parent_key + '.' if parent_key else ''}{close[0]}={typed.partition('=')[2]}" if close else ""
        fix = f"did you mean {meant}? Or" if close else "correct the key (text23d ... --cfg job prints the config), or"
        return f"{typed}: no such key ({where}: {', '.join(known)}). Fix: {fix} +{typed} to add a new one"
    if isinstance(e, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in (a for a in argv if "=" in a and not a.startswith("-")):
            try:
                parser.parse_overrides([arg])
            except OverrideParseException:
                return (f"cannot read the override {arg!r} ({text.splitlines()[0]}). Fix: key=value, with quotes "
                        "around a value that holds spaces, commas, brackets or quotes: key='a, b'")
    lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines() if ln.strip()]
    return (f"{' '.join(lines)}. Fix: check the overrides (text23d --help lists the groups and their options; "
            "text23d ... --cfg job prints the config)")


def _sweep_note(e: BaseException) -> str:
    """Where a multirun's summary is, when a job of it failed (the sweep goes on past a failed job)."""
    sweep = getattr(e, "sweep_dir", None)
    return f" (a job of the sweep failed; the others ran. Every job's status: {Path(sweep, 'sweep_summary.md')})" \
        if sweep else ""


if __name__ == "__main__":
    main()
