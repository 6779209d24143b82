"""The build phase of a run: the system (every stage's parts) and the Lightning trainer around it."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text23d.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
from text23d.errors import ConfigError, Text23dError

log = logging.getLogger("text23d")


def build_system(cfg: DictConfig):
    try:
        return get_class(cfg.system._target_)(cfg)
    except (InstantiationException, TypeError, ImportError, OmegaConfBaseException) as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, Text23dError):
            cause = cause.__cause__
        if cause is not None:  # a part refused its settings (instantiate wraps it): its own line says why
            raise cause from None
        raise ConfigError(f"cannot build system '{cfg.system.name}': {str(e).splitlines()[0]}. "
                          "Check the keys you overrode (text23d --cfg job shows the config).") from None


def lightning_logs_once() -> None:
    """A quiet console: Lightning's lines once, and only those a user can act on.

    Lightning gives its loggers console handlers of their own when it is imported before logging is
    set up (text23d imports it before Hydra sets up the console and text23d.log), so each INFO line
    printed twice: where the root logger has handlers, Lightning's go and its records propagate,
    printed once in the run's format and kept in the log file. Its start-up INFO (GPU/TPU
    available, an advertisement for its cloud logger, "fit stopped: max_steps reached") is dropped:
    text23d's own summary line says where the run trains; warnings still show. So is torch's
    deprecation warning about Lightning's own use of LeafSpec, which no user can act on."""
    import warnings

    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list, start_step: int, total_steps: int) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    lightning_logs_once()

    from text23d.progress import StepProgressBar

    ckpt = PeriodicCheckpoint(out_dir / "ckpts" / "last.ckpt", cfg.checkpoint.every_n_train_steps)
    bar = [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    # A resumed run logs CSV into a new version folder: the CSV logger rewrites its file.
    loggers = [TensorBoardLogger(out_dir / "logs", name="tensorboard", version=""),
               CSVLogger(out_dir / "logs", name="csv", version=f"resumed-{start_step}" if start_step else "")]
    options = {**OmegaConf.to_container(cfg.trainer, resolve=True), "max_steps": total_steps}  # all stages
    options["strategy"] = ddp_strategy(cfg)
    options["precision"] = trainer_precision(options)
    options.setdefault("enable_model_summary", False)  # its table counts FLOPs 0: text23d prints its own summary
    trainer = L.Trainer(**options, deterministic=cfg.deterministic,
                        default_root_dir=out_dir, logger=loggers, callbacks=[ckpt, *bar, *callbacks],
                        plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1,
                        use_distributed_sampler=False)  # every DDP rank runs every step
    check_ddp_outside_sweeps(trainer, cfg.trainer)
    return trainer


def trainer_precision(options: dict) -> str:
    """`trainer.precision` as this machine runs it. 16-mixed (fp16 autocast with a GradScaler,
    threestudio's for DreamFusion and Magic3D, the default) needs CUDA: on a CPU Lightning would
    switch to bf16-mixed by itself, whose results differ from float32's in every step and which most
    CPUs run no faster, so a CPU run uses 32-true (tests and scripts run SD-shaped models on CPU)."""
    precision, accelerator = str(options.get("precision", "32-true")), options.get("accelerator", "auto")
    if precision not in ("16-mixed", "16"):
        return precision
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    gpu = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    if accelerator == "cpu" or (accelerator in ("auto", "gpu") and not gpu):
        log.info("trainer.precision=%s runs fp16 autocast on CUDA only; this run is on the CPU, so it uses 32-true "
                 "(Lightning would pick bf16-mixed, which changes the results and is rarely faster on a CPU)",
                 precision)
        return "32-true"
    return precision


def ddp_strategy(cfg: DictConfig) -> str:
    """`trainer.strategy` as the system needs it: DDP with `find_unused_parameters`. Each rank draws
    its own views and shading, so in a step some parameters get no gradient on one rank and do on
    another (a textureless render leaves the colour field out; a hash grid's analytic normals only
    on lit renders); a step trains one stage, so the other stages' parameters get none, nor does
    VSD's LoRA (it has its own optimizer and syncs its own gradients). Plain DDP would then wait in
    a collective the other rank never joins. (`auto` on several devices is Lightning's `ddp`.)"""
    strategy, devices = cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1)
    several = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    if not (strategy == "ddp" or (strategy == "auto" and several)):
        return strategy
    return "ddp_find_unused_parameters_true"


def check_ddp_outside_sweeps(trainer: L.Trainer, asked: DictConfig) -> None:
    """Lightning starts the other ranks of `ddp` by running the command line again: inside a Hydra
    sweep (-m) each would re-run the whole sweep into another folder (Lightning #11300)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    if (isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
            and not trainer.strategy.cluster_environment.creates_processes_externally
            and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        raise ConfigError(
            f"trainer.strategy={asked.get('strategy')} on trainer.devices={asked.get('devices')} cannot run in a "
            "sweep (-m): Lightning starts the other devices' processes by re-running the command, which would re-run "
            "the whole sweep. Fix: run each job on its own without -m (e.g. a shell loop over text23d prompt=...), "
            "or sweep with trainer.devices=1")
