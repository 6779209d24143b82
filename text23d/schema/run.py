"""The settings of a run around its parts: the trainer, checkpoints, validation, export, the system
and its stages, and the top level (prompt, seed, folders). Schemas of conf/config.yaml's blocks."""
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from text23d.errors import ConfigError
from text23d.schema.core import as_list, nested, number_or_ramp, option
from text23d.schema.parts import (GEOMETRIES, GUIDANCES, RENDERERS, BackgroundConfig, CameraConfig, PriorConfig,
                                   PromptProcessorConfig)

SEED_MAX = 2**32 - 1
MESH_FORMATS = ("obj", "glb")  # the one list: export/mesh.py writes these
RENDER_MAX = 4096  # pixels a side of a training render (the priors work at 32-1024)
TEXT_WHITESPACE = "\t\n"  # the only control characters a prompt may hold
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


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


def text_rule(value, key: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not text but {type(value).__name__}. Fix: quote it in YAML ({key}: "
                          f'"..."); on the command line every {key}= is text')
    check_printable(value, key, key)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(value, key: str, minimum: int) -> None:
    if not _int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer ≥ {minimum}. Fix: e.g. {key}={max(minimum, 100)}")


def size_rule(minimum: int):
    """A render width, height: an integer ≥ minimum, or a list of them (one per span of
    resolution_milestones)."""
    def rule(value, key: str) -> None:
        sizes = as_list(value)
        if sizes is None:
            _at_least(value, key, minimum)
            return
        if not sizes:
            raise ConfigError(f"{key}=[]: give a size, or one per span of resolution_milestones. "
                              f"Fix: e.g. {key}=64 or {key}=[64,512]")
        for i, size in enumerate(sizes):
            _at_least(size, f"{key}[{i}]", minimum)
    return rule


def check_render_size(node, where: str) -> None:
    """Not so large that one view cannot be held in memory."""
    w, h = (max(as_list(v)) if as_list(v) else v for v in (node.get("width"), node.get("height")))
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
    steps = as_list(milestones) if milestones is not None else []
    if steps is None or not all(_int(m) and m >= 1 for m in steps) or steps != sorted(set(steps)):
        raise ConfigError(f"{where}.resolution_milestones={milestones!r}: stage-local steps at which the render size "
                          "moves to the next entry of width and height, integers ≥ 1 in increasing order. Fix: e.g. "
                          f"{where}.resolution_milestones=[5000] with {where}.width=[64,512] {where}.height=[64,512]")
    for key in ("width", "height"):
        sizes = as_list(node.get(key))
        if sizes is not None and len(sizes) != len(steps) + 1:
            raise ConfigError(f"{where}.{key}={sizes} with resolution_milestones={steps}: a list of sizes needs "
                              f"{len(steps) + 1} (one before the first milestone and one after each), not {len(sizes)}. "
                              f"Fix: e.g. {where}.{key}=[64,512] {where}.resolution_milestones=[5000], or one size: "
                              f"{where}.{key}={sizes[-1]}")


def optimizer_rule(opt, key: str) -> None:
    """Every learning rate: a finite number > 0 (0 trains nothing, a negative one climbs the loss)."""
    if not isinstance(opt, dict):
        raise ConfigError(f"{key}={opt!r}: an optimizer's settings, e.g. {{_target_: torch.optim.Adam, lr: 0.01}}")
    rates = [(f"{key}.lr", opt.get("lr"))]
    rates += [(f"{key}.param_groups.{g}.lr", (v or {}).get("lr")) for g, v in (opt.get("param_groups") or {}).items()]
    for name, lr in rates:
        ok = isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
        if lr is not None and not ok:
            raise ConfigError(f"{name}={lr!r}: a learning rate must be a finite number > 0 (0 would train nothing, "
                              f"a negative one would climb the loss). Fix: e.g. {name}=0.01")


def loss_rule(loss, key: str) -> None:
    """Loss weights: each a finite number or a ramp [start_step, start_value, end_value, end_step]."""
    for name, value in (loss or {}).items():
        number_or_ramp(value, f"{key}.{name}", "a loss weight is a finite number")


def shading_rule(shading, key: str) -> None:
    for name, value in (shading or {}).items():
        low, high = (0, None) if name == "ambient_only_steps" else (0, 1)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low and \
            (high is None or value <= high)
        if name not in ("ambient_only_steps", "albedo_prob", "textureless_prob", "normal_prob") or not ok:
            raise ConfigError(f"{key}.{name}={value!r}: the shading keys are ambient_only_steps (steps ≥ 0), albedo_prob, "
                              f"textureless_prob and normal_prob (probabilities in [0, 1]). Fix: e.g. {key}.albedo_prob=0.2")


def precision_rule(value, key: str) -> None:
    if str(value) not in PRECISIONS:
        raise ConfigError(f"{key}={value}: allowed are {list(PRECISIONS)}. Fix: {key}=32-true (16-mixed on a GPU)")


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer as keyword arguments (+trainer.<key> adds any other of its arguments)."""

    extra_keys_ok = True  # not a field: any other lightning.Trainer argument, checked in `check`

    accelerator: str = option("auto", "a GPU when there is one, else the CPU", choices=ACCELERATORS)
    devices: Any = option(1, "a count ≥ 1, -1 (all), auto, or a list of device indices",
                          allowed="a count ≥ 1, -1 (all), auto, or a list of device indices")
    strategy: Any = option("auto", "auto, or ddp across devices", allowed="auto, ddp, or another Lightning strategy "
                           "that runs the command on each device (not ddp_spawn/ddp_fork/ddp_notebook)")
    precision: Any = option("16-mixed", "threestudio's; a CPU run uses 32-true and says so", rule=precision_rule,
                            allowed=f"one of {list(PRECISIONS)}")
    max_steps: Optional[int] = option(10000, "steps of the whole run (null: the sum of the stages' own steps)", ge=1)
    log_every_n_steps: int = option(10, "steps between logged scalars", ge=1)
    enable_progress_bar: bool = option(True, "the step progress bar")

    @staticmethod
    def check(node, where: str) -> None:
        devices = node.get("devices", 1)
        listed = as_list(devices)
        ok = devices == "auto" or (_int(devices) and (devices >= 1 or devices == -1)) \
            or (listed is not None and len(listed) > 0 and all(_int(d) and d >= 0 for d in listed))
        if not ok:
            raise ConfigError(f"trainer.devices={devices!r}: a count ≥ 1, -1 (all), auto, or a list of device indices. "
                              "Fix: trainer.devices=1")
        strategy = node.get("strategy")
        if isinstance(strategy, str) and strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
            raise ConfigError(f"trainer.strategy={strategy}: not supported: it trains in child processes that hand back "
                              "only the weights, not the step count, stage log and random state that the export, the "
                              "summary and resume= need. Fix: trainer.strategy=ddp (each device runs the command itself)")
        extra = sorted(k for k in node if k not in TrainerConfig.__dataclass_fields__)
        if extra:
            import inspect

            import lightning as L

            allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "plugins",
                                                                                 "default_root_dir", "max_epochs"}
            unknown = [k for k in extra if k not in allowed]
            if unknown:
                raise ConfigError(f"+trainer.{unknown[0]}: not an argument of lightning.Trainer (or one text23d sets "
                                  f"itself). Fix: drop it, or one of {sorted(allowed)[:6]} ... (see lightning.Trainer)")


def check_machine(trainer, on_this_machine: bool = True) -> None:
    """A GPU asked for is on this machine (a job a cluster launcher runs elsewhere is not checked)."""
    accelerator = trainer.get("accelerator", "auto")
    if accelerator not in ("gpu", "cuda", "mps") or not on_this_machine:
        return
    import torch  # only when a GPU is asked for: --help and other refusals stay fast

    found = torch.backends.mps.is_available() if accelerator == "mps" else torch.cuda.is_available()
    count = 1 if accelerator == "mps" else torch.cuda.device_count()
    if not found:
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no "
                          f"{'Apple MPS' if accelerator == 'mps' else 'CUDA'} device (torch sees none). "
                          "Fix: trainer.accelerator=cpu, or auto")
    devices = trainer.get("devices", 1)
    if _int(devices) and devices > count:
        raise ConfigError(f"trainer.devices={devices}: this machine has {count} {accelerator} device(s). "
                          f"Fix: trainer.devices={count}")


@dataclass
class CheckpointConfig:
    """ckpts/last.ckpt is rewritten atomically this often."""

    every_n_train_steps: int = option(500, "steps between checkpoints; 0: only at the end", ge=0)


@dataclass
class GuardConfig:
    """Non-finite steps are skipped and counted; this many in a row stop the run, with a checkpoint."""

    max_nonfinite_steps: int = option(20, "NaN/Inf steps in a row before the run stops", ge=1)


@dataclass
class FaultsConfig:
    """Fault injection, for tests and drills (docs/robustness.md)."""

    nan_at_steps: list = option([], "these optimisation steps get a NaN loss")
    oom_at_step: Optional[int] = option(None, "this step raises torch.OutOfMemoryError, as CUDA would", ge=0)
    raise_at_step: Optional[int] = option(None, "this step raises RuntimeError('injected fault')", ge=0)
    rank: Optional[int] = option(None, "only on this DDP rank (null: every rank)", ge=0)


@dataclass
class ValidationConfig:
    """save/it<N>-val.png: rgb / normals / opacity of a few views."""

    every_n_steps: int = option(500, "steps between validation images; 0: never", ge=0)
    views: int = option(4, "views per image", ge=1, le=64)
    resolution: int = option(64, "pixels a side", ge=8, le=2048)


def formats_rule(value, key: str) -> None:
    bad = [f for f in ([value] if isinstance(value, str) else as_list(value) or [value]) if f not in MESH_FORMATS]
    if bad:
        raise ConfigError(f"{key}={bad}: allowed are {list(MESH_FORMATS)}, e.g. {key}=glb or {key}=[obj,glb]")


def threshold_rule(value, key: str) -> None:
    if not (value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)):
        raise ConfigError(f"{key}={value!r}: use 'auto' or a density > 0 (e.g. 10.0)")


@dataclass
class ExportConfig:
    """What a finished run writes: meshes, the texture, the turntable video (export/)."""

    ckpt: Optional[str] = option(None, "`text23d export=<run dir or ckpt>`: only export, no training")
    format: Any = option(["obj", "glb"], "mesh formats; GLB is rotated to glTF's y-up", rule=formats_rule,
                         allowed=f"one of {list(MESH_FORMATS)} or a list of them")
    texture: bool = option(True, "UV atlas (xatlas) + albedo baked into a PNG; false: vertex colours")
    texture_size: int = option(1024, "texels a side", ge=16, le=8192)
    target_faces: Optional[int] = option(50000, "decimate larger meshes to this before unwrapping; null: never", ge=100)
    resolution: int = option(128, "marching-cubes grid per axis", ge=2, le=1024)
    isosurface_threshold: Any = option("auto", "auto: the level whose silhouettes match the renders; or a density",
                                       rule=threshold_rule, allowed="auto, or a density > 0")
    video: bool = option(True, "the turntable mp4 (imageio-ffmpeg's ffmpeg); false: none")
    video_views: int = option(120, "turntable frames", ge=1, le=3600)
    video_resolution: int = option(128, "pixels a side", ge=8, le=4096)
    fps: int = option(30, "video frame rate", ge=1, le=240)


@dataclass
class StageConfig:
    """What one stage of a system changes from the system's settings (systems/stages.py). A key left
    out is the system's; which keys a stage may set is this list."""

    steps: Optional[int] = option(None, "this stage's steps (null: its share of trainer.max_steps)", ge=0)
    geometry: Any = option(None, "its own geometry (a geometry's settings); null: the top-level one")
    renderer: Any = option(None, "its own renderer; null: the top-level one")
    guidance: Any = option(None, "changes to the guidance, or another kind of guidance with its own settings")
    camera: Any = option(None, "changes to the camera ranges")
    width: Any = option(None, "render width (null: the prior's resolution)", rule=size_rule(4),
                        allowed="an integer ≥ 4, a list of them (one per span of resolution_milestones), or null")
    height: Any = option(None, "render height", rule=size_rule(4), allowed="as width")
    resolution_milestones: Any = option([], "stage-local steps where the size moves to the next entry",
                                        allowed="increasing integers ≥ 1")
    batch_size: int = option(1, "cameras per step", ge=1)
    optimizer: Any = option(None, "changes to the optimizer; its param_groups replace the system's", rule=optimizer_rule,
                            allowed="{_target_, lr, param_groups: {<prefix>: {lr}}, …}")
    loss: Any = option(None, "changes to the loss weights", rule=loss_rule, allowed="{lambda_<term>: number or ramp}")
    shading: Any = option(None, "changes to the shading schedule", rule=shading_rule,
                          allowed="{ambient_only_steps, albedo_prob, textureless_prob, normal_prob}")
    background: Any = option(None, "its own background")
    prompt_processor: Any = option(None, "its own view thresholds", allowed="{front_threshold, back_threshold, "
                                   "overhead_threshold}")
    init: str = option("previous", "blob: the geometry's own start; previous: from the stage before",
                       choices=("blob", "previous"))
    freeze: list = option([], "parameter-name prefixes this stage keeps as they are")
    lora: str = option("carry", "VSD: carry the LoRA on, or reset it to its initial weights", choices=("carry", "reset"))
    done: bool = option(False, "made elsewhere (init_from): 0 steps here")


@dataclass
class SystemConfig:
    """A system: its stages, render sizes, prompt handling, shading, optimizer and losses (systems/)."""

    _target_: str = option("text23d.systems.dreamfusion.DreamFusion", "the system's class")
    name: str = option("dreamfusion", "the name in run folders")
    batch_size: int = option(1, "cameras per step", ge=1)
    width: Any = option(64, "training render width", rule=size_rule(4),
                        allowed="an integer ≥ 4, or a list of them (one per span of resolution_milestones)")
    height: Any = option(64, "training render height", rule=size_rule(4), allowed="as width")
    resolution_milestones: Any = option([], "stage-local steps where the render size moves to the list's next entry",
                                        allowed="increasing integers ≥ 1")
    prompt_processor: PromptProcessorConfig = nested(PromptProcessorConfig, "view-dependent prompts")
    background: BackgroundConfig = nested(BackgroundConfig, "learned (an MLP of the view direction) or a solid colour")
    shading: Any = option(None, "albedo-only steps, then albedo / textureless / lambertian at random", rule=shading_rule,
                          allowed="{ambient_only_steps, albedo_prob, textureless_prob, normal_prob}")
    optimizer: Any = option(None, "torch optimizer and per-prefix param_groups", rule=optimizer_rule,
                            allowed="{_target_, lr, param_groups: {<prefix>: {lr}}, …}")
    loss: Any = option(None, "loss weights: a number or a ramp each", rule=loss_rule,
                       allowed="{lambda_<term>: number or ramp}")
    stages: list = option(["main"], "the stages to run, in order")
    stage: Any = option({"main": {}}, "by name, what each stage changes (StageConfig)")
    num_particles: int = option(1, "VSD: particles, each through every stage, exported on its own", ge=1)

    @staticmethod
    def check(node, where: str) -> None:
        check_render_size(node, where)
        check_render_schedule(node, where)  # a stage's own: when it is merged (schema.check_stages)


def group(name: str, kinds: dict, default: str):
    """A field chosen as a YAML group (`geometry=grid`): each option has its own schema."""
    return field(default=MISSING, metadata={"help": f"the {name}, chosen as a group: {name}=<option>; default {default}",
                                            "allowed": ", ".join(kinds)})


@dataclass
class RunConfig:
    """A run: what to generate, with which parts, and where (conf/config.yaml)."""

    prompt: Any = option("", "what to generate (required)", rule=text_rule, allowed="text")
    negative_prompt: Any = option("", "steers away from this", rule=text_rule, allowed="text")
    seed: int = option(0, "numpy's and torch's seed", ge=0, le=SEED_MAX)
    deterministic: bool = option(False, "deterministic kernels; CPU runs then resume bit-identically")
    output_root: str = option("outputs", "runs go to <output_root>/<system>/<prompt slug>@<time>/")
    output_dir: Optional[str] = option(None, "the run folder (set by the CLI)")
    resume: Optional[str] = option(None, "a run folder or .ckpt to continue")
    resume_overrides_ok: bool = option(False, "a resumed run may change what it makes")
    init_from: Optional[str] = option(None, "a run whose result starts this system's later stages")
    checkpoint: CheckpointConfig = nested(CheckpointConfig, "checkpoints")
    guard: GuardConfig = nested(GuardConfig, "non-finite steps")
    faults: FaultsConfig = nested(FaultsConfig, "fault injection")
    validation: ValidationConfig = nested(ValidationConfig, "validation images")
    export: ExportConfig = nested(ExportConfig, "exported files")
    geometry: Any = group("geometry", GEOMETRIES, "hashgrid (a system may choose another)")
    renderer: Any = group("renderer", RENDERERS, "volume")
    guidance: Any = group("guidance", GUIDANCES, "sds (system=vsd: vsd)")
    camera: CameraConfig = nested(CameraConfig, "training cameras and the evaluation orbit")
    trainer: TrainerConfig = nested(TrainerConfig, "lightning.Trainer's arguments")
    system: SystemConfig = nested(SystemConfig, "the system and its stages")
    prior: PriorConfig = nested(PriorConfig, "the 2D diffusion model distilled")

    @staticmethod
    def check(node, where: str) -> None:
        prompt = node.get("prompt")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ConfigError(f"prompt is empty (prompt={prompt!r}): it says what to generate. "
                              'Fix: pass one, e.g. text23d prompt="a hamburger"')
