"""Before Hydra runs anything: every job of the command line composed and checked, once.

`preflight` composes each job with Hydra's compose API, from the config module, search path and
overrides @hydra.main will use (a single run is one job; a multirun one per combination of its
swept values, as text23d.sweep.sweep_jobs expands them), and checks it as a run is checked before
anything heavy loads: its interpolations resolve, its values (config.validate), its stages'
guidance settings, and the folders it writes (writable; a new run's chosen folder holds no other
run). A bad value in job 7 of a sweep is refused before job 0 trains, and a refused run leaves no
folder behind: Hydra has made none yet. The job itself (cli._hydra_main) checks only what cannot
be known here: the name of text23d's own timestamped folder, which Hydra fixes as the job starts.

Hydra's errors are told in one line from their types and attributes (`describe_hydra_error`), never
from their wording, which any Hydra release may change. HYDRA_FULL_ERROR=1 (the user's to set, never
text23d's) leaves them to Hydra, which then shows them in full.

A multirun's job that fails as it runs writes `failed.json` into its folder and the sweep goes on;
`sweep_failure` reads them back for the command's last line. Jobs may run in other processes or on
other machines (joblib, submitit), so a file in the sweep folder is what they share with this one.
"""
from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from text23d import config as tconfig
from text23d.errors import ConfigError, Text23dError
from text23d.overrides import hydra_quote
from text23d.runfolder import check_new_run_folder

FAILED = "failed.json"  # a sweep job's refusal: its message and exit code
HELP = "text23d --help lists the groups and their options; text23d ... --cfg job prints the config"


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)


def preflight(argv: list[str]) -> str | None:
    """Check every job the command line `argv` (as Hydra will get it) would run: ConfigError for the
    first problem. Returns a multirun's sweep folder, resolved now (its default holds the time) so
    that Hydra is told it and its failed jobs are found afterwards; None otherwise."""
    from hydra import compose, initialize
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main reads argv with
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    flags = [a.partition("=")[0] for a in argv if a.startswith("-")]
    printing = [f for f in flags if f in ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")]
    if is_multirun(argv) and printing:  # before argparse, which may take an override for --info's value
        raise ConfigError(f"-m with {printing[0]}: a sweep cannot also print its config or info. Fix: drop -m and "
                          f"give one value per key to print one job's, or drop {printing[0]} to run the sweep")
    if printing or set(flags) & {"--help", "-h", "--hydra-help", "--experimental-rerun"}:
        return None  # Hydra prints, or reruns a job it composed before
    args = get_args_parser().parse_args(argv)  # as @hydra.main reads it (an unknown flag: argparse's usage)
    sweep = args.multirun or is_multirun(args.overrides)
    overrides, extra = list(args.overrides), []
    if args.config_dir:  # @hydra.main adds it to the search path; the compose API reads it from the config
        folder = os.path.abspath(args.config_dir)
        if not os.path.isdir(folder):
            raise ConfigError(f"--config-dir={args.config_dir}: no such folder. Fix: a folder of YAML configs")
        extra = [f"hydra.searchpath=[{hydra_quote('file://' + folder)}]"]
    try:
        with initialize(config_path=args.config_path or "pkg://text23d.conf", version_base="1.3"):
            return check_jobs(lambda job: compose(args.config_name or "config", job + extra, return_hydra_config=True),
                              overrides, sweep)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return None  # Hydra composes the same config and raises the same error, in full
        raise ConfigError(describe_hydra_error(e, overrides)) from None


def check_jobs(compose, overrides: list[str], sweep: bool) -> str | None:
    """Every job's values and chosen folder first, then the guidance (it imports torch), then the
    folders' writing (it makes them): a refused command leaves nothing behind."""
    from text23d.fileio import check_writable

    jobs, swept = [overrides], set()
    if sweep:  # Hydra's own settings are the same in every job (Hydra refuses to sweep them)
        from text23d.sweep import sweep_jobs

        jobs, swept = sweep_jobs(overrides)
        jobs = [job + [o for o in overrides if o.lstrip("+~").startswith("hydra")] for job in jobs]
    configs, writes, chosen = [], {}, {}
    for k, job in enumerate(jobs):
        with job_label(k, job, swept, len(jobs)) if sweep else nullcontext():
            cfg, hydra = detach_hydra(compose(job))
            configs.append(cfg)
            writes.update(check_job(cfg, hydra, {o.partition("=")[0].lstrip("+~") for o in job}, sweep, chosen, k))
    for k, (job, cfg) in enumerate(zip(jobs, configs)):
        with job_label(k, job, swept, len(jobs)) if sweep else nullcontext():
            if is_new(cfg):
                check_guidance(cfg)
    sweep_dir = None
    if sweep:  # Hydra's sweep folder, from what every job shares
        sweep_dir = OmegaConf.select(compose([o for o in jobs[0] if o.partition("=")[0] not in swept]), "hydra.sweep.dir")
        writes[sweep_dir] = "hydra.sweep.dir"
    for folder, key in writes.items():
        check_writable(os.path.expanduser(folder), key)
    return sweep_dir


def detach_hydra(full: DictConfig) -> tuple[DictConfig, dict]:
    """The run's config, and what the pre-flight needs of Hydra's node (resolved while both are one)."""
    hydra = {"run_dir": OmegaConf.select(full, "hydra.run.dir", throw_on_resolution_failure=False),
             "launcher": OmegaConf.select(full, "hydra.runtime.choices")["hydra/launcher"]}
    with open_dict(full):
        del full["hydra"]
    return full, hydra


def is_new(cfg: DictConfig) -> bool:
    """A new run: its config is the composed one (resume= and export= read theirs from the checkpoint)."""
    return not cfg.get("resume") and not cfg.export.get("ckpt")


def check_job(cfg: DictConfig, hydra: dict, typed: set, sweep: bool, chosen: dict, k: int) -> dict:
    """One job's values and the folder the user chose for it. Returns the folders it writes into
    ({path: key}), to be checked for writing once every job passed."""
    new = is_new(cfg)
    if new:
        tconfig.check_resolves(cfg)
        # A SLURM job's GPUs are its node's, not this machine's.
        tconfig.validate(cfg, on_this_machine=not (sweep and hydra["launcher"] == "submitit_slurm"))
    run_dir = "hydra.run.dir" in typed and not sweep
    key = "output_dir" if cfg.get("output_dir") else "hydra.run.dir" if run_dir else None
    folder = str(cfg.output_dir) if key == "output_dir" else hydra["run_dir"]
    if key and new:
        check_new_run_folder(folder, key)
        other = chosen.setdefault(os.path.abspath(os.path.expanduser(folder)), k)
        if other != k:
            raise ConfigError(f"{key}={folder}: job {other} writes into it too, and a run never shares its folder. "
                              f"Fix: sweep {key} as well ({key}=a,b,...), or leave it unset")
    writes = {} if run_dir else {str(cfg.output_root): "output_root"}
    return {**writes, folder: key} if key else writes


def check_guidance(cfg: DictConfig) -> None:
    """Each stage's guidance built from its settings: its own checks, which a run would otherwise
    meet only after torch and the model loaded."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from text23d.systems.stages import stage_configs

    for stage in stage_configs(cfg):
        try:
            instantiate(stage.guidance)
        except InstantiationException as e:  # Hydra wraps the guidance's own refusal
            if isinstance(e.__cause__, Text23dError):
                raise e.__cause__ from None
            # Anything else the run reports where it builds the system (run.build_system).


@contextmanager
def job_label(k: int, job: list[str], swept: set, n: int):
    """A sweep's refusal names the job and its swept values, and says that no job started."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error = ConfigError(describe_hydra_error(e, job))
    except Text23dError as e:
        error = e
    else:
        return
    values = [o for o in job if o.partition("=")[0] in swept] or job
    raise type(error)(f"job {k} of {n} ({' '.join(values)}): {error} (no job was started)") from None


# --- a sweep's failed jobs --------------------------------------------------------------------------

def record_failure(job_dir: str, error: Text23dError) -> None:
    """A sweep job's refusal, written into its folder for the sweep's last line (`sweep_failure`)."""
    from text23d.fileio import write_text_atomic

    write_text_atomic(Path(job_dir, FAILED), json.dumps({"error": str(error), "exit_code": getattr(error, "exit_code", 2)}))


def sweep_failure(sweep_dir: str) -> tuple[str, int] | None:
    """The first failed job's error, how many failed and where every job's status is, and its exit
    code; None when no job failed."""
    from text23d.jobs import SUMMARY_NAME, find_job_dirs

    jobs = find_job_dirs(os.path.abspath(sweep_dir))
    failed = [json.loads(Path(d, FAILED).read_text()) for d in jobs
              if Path(d, FAILED).is_file() and not Path(d, SUMMARY_NAME).is_file()]
    if not failed:
        return None
    others = "; the others ran" if len(failed) < len(jobs) else ""
    return (f"{failed[0]['error']} ({len(failed)} of {len(jobs)} jobs of the sweep failed{others}. Every job's status: "
            f"{Path(os.path.abspath(sweep_dir), 'sweep_summary.md')})", failed[0]["exit_code"])


# --- Hydra's own errors, in one line ------------------------------------------------------------------

def describe_hydra_error(e: BaseException, overrides: list[str]) -> str:
    """One line for an error Hydra raised reading the overrides or composing the config: the bad
    override, what is allowed, the fix. From the exception's type and attributes and the overrides
    as typed; Hydra's own words are only quoted, where nothing else says what is wrong."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from text23d.schema import describe

    cause = e.__cause__
    said = describe(cause) if isinstance(cause, ValidationError) else None  # a schema field's own rule
    if said:
        return said
    if isinstance(e, MissingConfigException) and e.options is not None and "/" in (e.missing_cfg_file or ""):
        group, _, option = e.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(option, e.options, n=1)
        fix = f"did you mean {group}={close[0]}?" if close else f"one of them, e.g. {group}={(e.options or ['...'])[0]}"
        return (f"{group}={option}: no such option. Available options in '{group}': {', '.join(e.options)}. "
                f"Fix: {fix} (text23d --help lists every group)")
    if isinstance(e, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for arg in overrides:
            try:
                OverridesParser.create().parse_overrides([arg])
            except OverrideParseException as alone:
                why = str(alone).splitlines()[0] if str(alone) else "not override syntax"
                return (f"cannot read the override {arg!r} ({why}). Fix: key=value, with quotes around a value that "
                        "holds spaces, commas, brackets or quotes: key='a, b'")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return no_such_key(cause, typed(cause.full_key, overrides))
    if isinstance(cause, ValidationError) and cause.full_key:  # not a schema field: OmegaConf's words, quoted
        return f"{typed(cause.full_key, overrides)}: {str(cause.msg).splitlines()[0]}. Fix: {HELP}"
    if isinstance(e, MissingConfigException):
        return f"the config {e.missing_cfg_file!r} is not there. Fix: check --config-name and --config-dir"
    words = " ".join(line.strip() for line in (str(e) or str(cause)).splitlines() if line.strip())
    return f"{words}. Fix: check the overrides ({HELP})"


def typed(key: str, overrides: list[str]) -> str:
    """The override of `key` as the user typed it (key=value), without +, ++ or ~."""
    return next((o.lstrip("+~") for o in overrides if o.partition("=")[0].lstrip("+~") == key), f"{key}=...")


def no_such_key(cause, override: str) -> str:
    key, value = cause.full_key, override.partition("=")[2]
    parent = cause.parent_node
    known = [str(k) for k in (parent.keys() if isinstance(parent, DictConfig) else []) if k != "hydra"]
    close = difflib.get_close_matches(str(cause.key), known, n=1)
    parent_key = key.rsplit(".", 1)[0] if "." in key else ""
    where = f"{parent_key} has" if parent_key else "the config has"
    meant = f"{parent_key + '.' if parent_key else ''}{close[0]}={value}" if close else ""
    # A key may be added (+key=…) only where its block takes keys it does not list: a part's settings
    # are its schema's fields (text23d/schema/), so adding one there would only be refused next.
    schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
    open_block = not is_dataclass(schema) or getattr(schema, "extra_keys_ok", False)
    known = [k for k in known if k != "_target_"]
    if not open_block:
        fix = f"did you mean {meant}?" if close else "one of the keys above (docs/config.md lists them all)"
        return f"{override}: no such key ({where}: {', '.join(known)}). Fix: {fix}"
    fix = f"did you mean {meant}? Or" if close else "correct the key (text23d ... --cfg job prints the config), or"
    return f"{override}: no such key ({where}: {', '.join(known)}). Fix: {fix} +{override} to add a new one"

