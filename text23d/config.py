"""Config helpers: the prompt slug used in folder names, and checks with fix-it messages."""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata

from omegaconf import DictConfig, ListConfig, OmegaConf

from text23d.errors import ConfigError

SLUG_MAX = 48
SEED_MAX = 2**32 - 1
MESH_FORMATS = ("obj", "glb")  # the one list: export/mesh.py writes these
RENDER_MAX = 4096  # pixels a side of a training render (the priors work at 32-1024)
TEXT_WHITESPACE = "\t\n"  # the only control characters a prompt may hold


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """A safe, short folder name for user text: ASCII letters, digits, '_' and '-' only, so no
    path separators, '..', emoji or control characters reach the file system. A hash is appended
    whenever information was lost, so different long prompts still get different folders."""
    text = str(text)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9-]+", "_", ascii_text).strip("_-")
    lossy = slug.replace("_", " ") != text.strip() or len(slug) > max_len
    slug = slug[:max_len].rstrip("_-") or "untitled"
    if lossy and text.strip():
        slug = f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return slug


def escape_interpolations(text: str) -> str:
    """`text` as an OmegaConf string that resolves to exactly `text`: every `${` is escaped as
    `\\${`, and the backslashes right before it doubled (OmegaConf reads `\\\\` there as one)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def resolved_yaml(cfg: DictConfig) -> str:
    """The config with every interpolation resolved, as YAML that loads back to the same values:
    what remains of `${` after resolving is literal text (a prompt), so it is escaped again."""
    def escape(node):
        if isinstance(node, dict):
            return {k: escape(v) for k, v in node.items()}
        if isinstance(node, list):
            return [escape(v) for v in node]
        return escape_interpolations(node) if isinstance(node, str) else node

    return OmegaConf.to_yaml(OmegaConf.create(escape(OmegaConf.to_container(cfg, resolve=True))))


def builtin_prior_path() -> str:
    """The built-in prior's folder inside the installed package (see scripts/train_prior.py)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "builtin" / "model")


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slugify)
if not OmegaConf.has_resolver("builtin_prior"):
    OmegaConf.register_new_resolver("builtin_prior", builtin_prior_path)


def _positive_int(value, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r}: must be an integer ≥ {minimum}. Fix: e.g. {name}={max(minimum, 100)}")


PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_trainer(trainer: DictConfig, on_this_machine: bool = True) -> None:
    """Every trainer option, in Lightning's terms but told in one line, before anything loads:
    the accelerator (and, for a job that runs here, that this machine has it), devices, precision,
    the progress bar, and any extra +trainer.<key> (it must be a lightning.Trainer argument)."""
    accelerator = trainer.get("accelerator", "auto")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r}: allowed are {list(ACCELERATORS)}. "
                          "Fix: trainer.accelerator=auto (a GPU when there is one, else the CPU)")
    if accelerator in ("gpu", "cuda", "mps") and on_this_machine:
        import torch  # only when a GPU is asked for: --help and other refusals stay fast

        found = torch.backends.mps.is_available() if accelerator == "mps" else torch.cuda.is_available()
        count = 1 if accelerator == "mps" else torch.cuda.device_count()
        if not found:
            raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no {'Apple MPS' if accelerator == 'mps' else 'CUDA'} "
                              "device (torch sees none). Fix: trainer.accelerator=cpu, or auto")
        devices = trainer.get("devices", 1)
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
            raise ConfigError(f"trainer.devices={devices}: this machine has {count} {accelerator} device(s). "
                              f"Fix: trainer.devices={count}")
    devices = trainer.get("devices", 1)
    listed = OmegaConf.is_list(devices) or isinstance(devices, list)
    ok = devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) \
        or (listed and len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices))
    if not ok:
        raise ConfigError(f"trainer.devices={devices!r}: a count ≥ 1, -1 (all), auto, or a list of device indices. "
                          "Fix: trainer.devices=1")
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: allowed are {list(PRECISIONS)}. "
                          "Fix: trainer.precision=32-true (16-mixed on a GPU)")
    if not isinstance(trainer.get("enable_progress_bar", True), bool):
        raise ConfigError(f"trainer.enable_progress_bar={trainer.get('enable_progress_bar')!r}: must be true or false. "
                          "Fix: trainer.enable_progress_bar=false")
    _positive_int(trainer.get("log_every_n_steps", 1), "trainer.log_every_n_steps")
    known = {"accelerator", "devices", "strategy", "precision", "max_steps", "log_every_n_steps", "enable_progress_bar"}
    extra = sorted(set(trainer.keys()) - known)
    if extra:
        import inspect

        import lightning as L

        allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "plugins",
                                                                             "default_root_dir", "max_epochs"}
        unknown = [k for k in extra if k not in allowed]
        if unknown:
            raise ConfigError(f"+trainer.{unknown[0]}: not an argument of lightning.Trainer (or one text23d sets itself). "
                              f"Fix: drop it, or one of {sorted(allowed)[:6]} ... (see lightning.Trainer)")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_printable(value: str, name: str, key: str = "prompt") -> None:
    """Prompts are user text taken literally, but printable: a NUL or an escape sequence is a
    paste accident that would reach the text encoder, the logs and the terminal unseen. Refused
    (never stripped silently); tabs and newlines are whitespace and allowed."""
    def control(ch: str) -> bool:  # control characters, and the invisible line/paragraph separators
        return unicodedata.category(ch) in ("Cc", "Zl", "Zp") and ch not in TEXT_WHITESPACE

    bad = [(i, c) for i, c in enumerate(value) if control(c)]
    if bad:
        i, c = bad[0]
        names = {0: "NUL", 7: "BEL", 8: "backspace", 13: "carriage return", 27: "ESC", 127: "DEL",
                 0x2028: "line separator", 0x2029: "paragraph separator"}
        what = f"U+{ord(c):04X}" + (f" ({names[ord(c)]})" if ord(c) in names else "")
        clean = "".join(ch for ch in value if not control(ch))
        shown = clean if len(clean) <= 60 else clean[:57] + "..."
        raise ConfigError(f"{name} holds {len(bad)} control character(s), the first {what} at position {i}: a "
                          f"{key} must be printable text (tabs and newlines are allowed). Fix: remove them, e.g. "
                          f"{key}={shown!r}")


def _check_text(cfg: DictConfig, key: str) -> None:
    value = cfg.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not text but {type(value).__name__}. Fix: quote it in YAML ({key}: "
                          f'"..."); on the command line every {key}= is text')
    check_printable(value, key, key)


def _sizes(value) -> list | None:
    """A render width or height as a list: one size per span of resolution_milestones; None: one size."""
    return list(value) if isinstance(value, (ListConfig, list, tuple)) else None


def _check_render_size(node, where: str, required: bool) -> None:
    """Render width and height (and cameras per step): integers, or lists of them (one per span of
    resolution_milestones), and not so large that one view cannot be held in memory."""
    for key, minimum in (("width", 4), ("height", 4), ("batch_size", 1)):
        sizes = _sizes(node.get(key)) if key != "batch_size" else None
        if sizes is not None:
            if not sizes:
                raise ConfigError(f"{where}.{key}=[]: give a size, or one per span of resolution_milestones. "
                                  f"Fix: e.g. {where}.{key}=64 or {where}.{key}=[64,512]")
            for i, size in enumerate(sizes):
                _positive_int(size, f"{where}.{key}[{i}]", minimum)
        elif required or node.get(key) is not None:
            _positive_int(node.get(key), f"{where}.{key}", minimum)
    w, h = (max(_sizes(v)) if _sizes(v) else v for v in (node.get("width"), node.get("height")))
    too_big = [(k, v) for k, v in (("width", w), ("height", h)) if v is not None and v > RENDER_MAX]
    if too_big:
        key, side = too_big[0]
        memory = (f" (a {w}×{h} view is {w * h:,} pixels: its RGB alone takes {w * h * 12 / 2**30:,.1f} GiB in "
                  "float32, rendering it many times that)") if w and h else ""  # null: the prior's resolution
        raise ConfigError(f"{where}.{key}={side}: a training render is at most {RENDER_MAX} pixels a side{memory}. "
                          f"Fix: e.g. {where}.width=64 {where}.height=64 (renders are resized to the prior's resolution)")


def check_render_schedule(node, where: str) -> None:
    """A stage's resolution_milestones (stage-local steps, increasing) and its width and height: each
    a size, or a list of len(milestones) + 1 sizes, one before the first milestone and one after each
    (threestudio's width [64, 512], resolution_milestones [5000]). `node`: a stage's merged settings."""
    milestones = node.get("resolution_milestones")
    steps = _sizes(milestones) if milestones is not None else []
    if steps is None or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in steps) \
            or steps != sorted(set(steps)):
        raise ConfigError(f"{where}.resolution_milestones={milestones!r}: stage-local steps at which the render size "
                          "moves to the next entry of width and height, integers ≥ 1 in increasing order. Fix: e.g. "
                          f"{where}.resolution_milestones=[5000] with {where}.width=[64,512] {where}.height=[64,512]")
    for key in ("width", "height"):
        sizes = _sizes(node.get(key))
        if sizes is not None and len(sizes) != len(steps) + 1:
            raise ConfigError(f"{where}.{key}={sizes} with resolution_milestones={steps}: a list of sizes needs "
                              f"{len(steps) + 1} (one before the first milestone and one after each), not {len(sizes)}. "
                              f"Fix: e.g. {where}.{key}=[64,512] {where}.resolution_milestones=[5000], or one size: "
                              f"{where}.{key}={sizes[-1]}")


def _check_optimizer(opt, where: str) -> None:
    """Every learning rate: a finite number > 0 (0 trains nothing, a negative one climbs the loss)."""
    if opt is None:
        return
    rates = [(f"{where}.lr", opt.get("lr"))]
    rates += [(f"{where}.param_groups.{g}.lr", (v or {}).get("lr")) for g, v in (opt.get("param_groups") or {}).items()]
    for name, lr in rates:
        if lr is not None and not (_finite_number(lr) and lr > 0):
            raise ConfigError(f"{name}={lr!r}: a learning rate must be a finite number > 0 (0 would train nothing, "
                              f"a negative one would climb the loss). Fix: e.g. {name}=0.01")


def _check_loss(loss, where: str) -> None:
    """Loss weights: a finite number, or a ramp [start_step, start_value, end_value, end_step] with
    0 ≤ start_step ≤ end_step (systems/losses.py)."""
    for key, value in (loss or {}).items():
        name = f"{where}.{key}"
        if _finite_number(value):
            continue
        items = list(value) if isinstance(value, (ListConfig, list, tuple)) else None
        if items is None or len(items) != 4 or not all(_finite_number(v) for v in items):
            raise ConfigError(f"{name}={items if items is not None else value!r}: a loss weight is a finite number or a "
                              f"ramp [start_step, start_value, end_value, end_step]. Fix: e.g. {name}=1.0 or "
                              f"{name}=[0,10.0,1000.0,5000]")
        start, v0, v1, end = items
        if start < 0 or end < start:
            fix = f"[{end},{v1},{v0},{start}]" if end >= 0 else "[0,10.0,1000.0,5000]"
            raise ConfigError(f"{name}={items}: a ramp's steps must be in order, 0 ≤ start_step ≤ end_step (here "
                              f"{start} then {end}). Fix: the earlier step first, e.g. {name}={fix}")


def validate(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Check the values every run needs, before anything expensive happens. `on_this_machine`
    False: a job a cluster launcher runs elsewhere (its GPUs are not this machine's)."""
    prompt = cfg.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ConfigError(f"prompt is empty (prompt={prompt!r}): it says what to generate. "
                          'Fix: pass one, e.g. text23d prompt="a hamburger"')
    for key in ("prompt", "negative_prompt"):
        _check_text(cfg, key)
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed!r}: must be an integer in [0, {SEED_MAX}] (numpy's and torch's "
                          "common range). Fix: e.g. seed=0")
    if not isinstance(cfg.get("resume_overrides_ok", False), bool):
        raise ConfigError(f"resume_overrides_ok={cfg.get('resume_overrides_ok')!r}: must be true or false. "
                          "Fix: resume_overrides_ok=true")
    if not isinstance(cfg.get("deterministic"), bool):
        raise ConfigError(f"deterministic={cfg.get('deterministic')!r}: must be true or false. Fix: deterministic=true")
    if cfg.trainer.max_steps is not None:  # null: the sum of the stages' own steps
        _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    check_trainer(cfg.trainer, on_this_machine)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        raise ConfigError(f"trainer.strategy={strategy}: not supported: it trains in child processes that hand back "
                          "only the weights, not the step count, stage log and random state that the export, the "
                          "summary and resume= need. Fix: trainer.strategy=ddp (each device runs the command itself)")
    _positive_int(cfg.checkpoint.every_n_train_steps, "checkpoint.every_n_train_steps", 0)
    _positive_int(cfg.validation.every_n_steps, "validation.every_n_steps", 0)
    _check_render_size(cfg.system, "system", required=True)
    check_render_schedule(cfg.system, "system")  # a stage's own milestones: checked when it is merged (stages.py)
    _check_optimizer(cfg.system.get("optimizer"), "system.optimizer")
    _check_loss(cfg.system.get("loss"), "system.loss")
    for name, stage in (cfg.system.get("stage") or {}).items():
        if isinstance(stage, DictConfig):  # a stage's own changes (unknown keys: systems/stages.py)
            _check_render_size(stage, f"system.stage.{name}", required=False)
            _check_optimizer(stage.get("optimizer"), f"system.stage.{name}.optimizer")
            _check_loss(stage.get("loss"), f"system.stage.{name}.loss")
    for key, low, high in (("views", 1, 64), ("resolution", 8, 2048)):
        _int_in(cfg.validation.get(key), f"validation.{key}", low, high)
    check_export(cfg)


# (key, smallest, largest): beyond these an export allocates more than any machine has.
EXPORT_INTS = (("resolution", 2, 1024), ("video_views", 1, 3600), ("video_resolution", 8, 4096), ("fps", 1, 240))


def _int_in(value, name: str, low: int, high: int) -> None:
    _positive_int(value, name, low)
    if value > high:
        raise ConfigError(f"{name}={value!r}: at most {high}. Fix: e.g. {name}={min(high, max(low, 128))}")


def check_export(cfg: DictConfig) -> None:
    """The export block, before training (and before an export-only run loads anything)."""
    for key, low, high in EXPORT_INTS:
        _int_in(cfg.export.get(key), f"export.{key}", low, high)
    bad = [f for f in export_formats(cfg) if f not in MESH_FORMATS]
    if bad:
        raise ConfigError(f"export.format={bad}: allowed are {list(MESH_FORMATS)}, "
                          "e.g. export.format=glb or export.format=[obj,glb]")
    if not isinstance(cfg.export.get("video", True), bool):
        raise ConfigError(f"export.video={cfg.export.video!r}: must be true (the turntable mp4) or false (no video, "
                          "for a machine without ffmpeg). Fix: export.video=true")
    if not isinstance(cfg.export.get("texture", False), bool):
        raise ConfigError(f"export.texture={cfg.export.texture!r}: must be true (UV atlas + baked PNG) or false "
                          "(vertex colours)")
    size = cfg.export.get("texture_size", 1024)
    _positive_int(size, "export.texture_size", 16)
    if size > 8192:
        raise ConfigError(f"export.texture_size={size}: at most 8192 texels a side (a {size}² float image "
                          f"needs {size * size * 12 / 2**30:.1f} GiB to bake). Fix: e.g. export.texture_size=1024")
    if cfg.export.get("target_faces") is not None:
        _positive_int(cfg.export.target_faces, "export.target_faces", 100)
    thr = cfg.export.isosurface_threshold
    if not (thr == "auto" or (isinstance(thr, (int, float)) and thr > 0)):
        raise ConfigError(f"export.isosurface_threshold={thr!r}: use 'auto' or a density > 0 (e.g. 10.0)")


def export_formats(cfg: DictConfig) -> list[str]:
    f = cfg.export.format
    return [f] if isinstance(f, str) else list(f)


def compose(overrides: list[str]) -> DictConfig:
    """The config the CLI would build for these overrides (for scripts, notebooks and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("text23d.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation of the config resolves (${oc.env:X} of an unset X does not): said in one
    line now, not as a traceback wherever the value is first read. Resolves a copy: a prompt's
    escaped `\\${` stays escaped in `cfg`."""
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, InterpolationToMissingValueError) as e:
        key = getattr(e, "full_key", None) or "?"
        typed = OmegaConf.to_container(cfg, resolve=False)
        for part in (p for p in re.split(r"[.\[\]]", key) if p):
            try:
                typed = typed[int(part) if isinstance(typed, list) else part]
            except (KeyError, IndexError, ValueError, TypeError):
                typed = "?"
                break
        raise ConfigError(f"{key}={typed}: cannot be resolved ({str(e).splitlines()[0]}). Fix: give the value "
                          f"itself, or set what it refers to") from None
