"""`text23d`: a Hydra app around `text23d.run.run`.

Before Hydra parses the command line, `rewrite_argv` does three things:
- Prompts are user text, taken literally. `prompt=` and `negative_prompt=` take the rest of the
  argument as typed (commas, quotes, backslashes, emoji, `${...}`) and hand Hydra a quoted,
  escaped value, so nothing in a prompt is parsed as override syntax or interpolated. In a
  multirun (`-m`), commas separate prompts (`-m prompt="a cat","a dog"`: two jobs; a quoted piece
  keeps its commas), and `prompt_file=prompts.txt` gives one job per line.
- `resume=<run dir or ckpt>` and `export=<run dir or ckpt>` write into the run folder they name,
  instead of creating a new one (`export=X` is shorthand for `export.ckpt=X`).
- user errors (text23d.errors.Text23dError) print one clear line and exit 2, no traceback.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from text23d import config as _config  # noqa: F401  (registers the ${slug:} resolver)
from text23d.config import escape_interpolations
from text23d.errors import ConfigError, Text23dError

log = logging.getLogger("text23d")
FREE_TEXT_KEYS = ("prompt", "negative_prompt")  # their values are literal text, never config syntax
_ORIGINAL_ARGV: list[str] = []


def hydra_quote(text: str) -> str:
    """A Hydra override value that parses back to exactly `text`: single-quoted, with quotes
    escaped and the backslashes that precede a quote (or the closing quote) doubled; Hydra keeps
    every other backslash as it is."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def literal(text: str) -> str:
    """Hydra override syntax for the literal string `text` (no interpolation, no parsing)."""
    return hydra_quote(escape_interpolations(text))


def split_prompts(value: str) -> list[str]:
    """A multirun prompt list: pieces separated by commas outside quotes. A piece wrapped in
    quotes is unquoted with Hydra's own rules (so it keeps its commas); other pieces are taken
    as typed, without the spaces around them."""
    pieces, start, quote, i = [], 0, None, 0
    while i < len(value):
        c = value[i]
        if quote:
            if c == "\\":
                i += 1  # an escaped character cannot close the quote
            elif c == quote:
                quote = None
        elif c in "'\"" and not value[start:i].strip():
            quote = c  # a quote opens only at the start of a piece
        elif c == ",":
            pieces.append(value[start:i])
            start = i + 1
        i += 1
    if quote:
        raise ConfigError(f"prompt={value!r}: a quote ({quote}) is not closed. Fix: close it, or drop "
                          "the quotes (in -m, quotes only keep a prompt's commas together)")
    pieces.append(value[start:])
    return [_unquote(p.strip()) for p in pieces]


def _unquote(piece: str) -> str:
    if len(piece) >= 2 and piece[0] == piece[-1] and piece[0] in "'\"":
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return str(OverridesParser.create().parse_override(f"x={piece}").value())
    return piece


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
    if not prompts:
        raise ConfigError(f"prompt_file={path!r} holds no prompt (only blank lines). "
                          "Fix: write one prompt a line")
    return prompts


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)


def rewrite_argv(argv: list[str]) -> tuple[list[str], int]:
    """The arguments Hydra gets, and how many prompts they name (more than 1 only in a multirun)."""
    from text23d.checkpoint import find_checkpoint, run_dir_of

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
    from text23d.run import run

    # Processes started again from sys.argv (Lightning's DDP launcher) must see what the user
    # typed, and rewrite it themselves, not the quoted form made for this process's Hydra.
    if _ORIGINAL_ARGV:
        sys.argv = list(_ORIGINAL_ARGV)
    hc = HydraConfig.get()
    if not cfg.get("output_dir"):
        cfg.output_dir = hc.runtime.output_dir
    try:
        # Unresolved: reading the list item by item would resolve the escaped `\${` of a prompt.
        return run(cfg, overrides=OmegaConf.to_container(hc.overrides.task, resolve=False))
    except Text23dError as e:
        log.error("%s", e)
        if hc.mode.name == "MULTIRUN":
            raise  # the sweep records the failed job; other jobs go on
        raise SystemExit(2) from None


def main() -> None:
    _ORIGINAL_ARGV[:] = sys.argv
    try:
        rewritten, n_prompts = rewrite_argv(sys.argv[1:])
    except Text23dError as e:
        print(f"text23d: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if n_prompts > 1:  # never silent: a prompt with a comma would otherwise split unnoticed
        print(f"text23d: sweeping {n_prompts} prompts (in -m, commas separate prompts; quote one to keep "
              "its commas, or use prompt_file=)", file=sys.stderr)
    sys.argv = [sys.argv[0], *rewritten]
    _hydra_main()


if __name__ == "__main__":
    main()
