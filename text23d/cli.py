"""`text23d`: a Hydra app around `text23d.run.run`.

Two conveniences before Hydra parses the command line:
- `resume=<run dir or ckpt>` and `export=<run dir or ckpt>` write into the run folder they name,
  instead of creating a new one (`export=X` is shorthand for `export.ckpt=X`).
- user errors (text23d.errors.Text23dError) print one clear line and exit 2, no traceback.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from text23d import config as _config  # noqa: F401  (registers the ${slug:} resolver)
from text23d.errors import Text23dError

log = logging.getLogger("text23d")


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def rewrite_argv(argv: list[str]) -> list[str]:
    from text23d.checkpoint import find_checkpoint, run_dir_of

    out, extra = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in ("resume", "export") and value:
            out.append(f"resume={_quote(value)}" if key == "resume" else f"export.ckpt={_quote(value)}")
            run_dir = run_dir_of(find_checkpoint(value))
            extra = [f"hydra.run.dir={_quote(run_dir)}", "hydra.output_subdir=null"]
        else:
            out.append(arg)
    return out + extra


@hydra.main(version_base="1.3", config_path="pkg://text23d.conf", config_name="config")
def _hydra_main(cfg: DictConfig):
    from text23d.run import run

    hc = HydraConfig.get()
    if not cfg.get("output_dir"):
        cfg.output_dir = hc.runtime.output_dir
    try:
        return run(cfg, overrides=list(hc.overrides.task))
    except Text23dError as e:
        log.error("%s", e)
        if hc.mode.name == "MULTIRUN":
            raise  # the sweep records the failed job; other jobs go on
        raise SystemExit(2) from None


def main() -> None:
    try:
        sys.argv = [sys.argv[0], *rewrite_argv(sys.argv[1:])]
    except Text23dError as e:
        print(f"text23d: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _hydra_main()


if __name__ == "__main__":
    main()
