"""Optional CUDA accelerators: imported at most once, never required.

`tinycudann` (hash grids) and `nvdiffrast` (rasterisation) speed up CUDA runs, but they do not
install from the package registries and have no CPU path. Each part asks here with
`implementation: auto | <accelerator> | torch`: auto uses the accelerator when it imports and CUDA
is present, and otherwise the pure-torch path, saying so once (with how to install the fast one
only where it would run: on a machine with CUDA).
"""
from __future__ import annotations

import importlib
import logging

import torch

from text23d.errors import ConfigError

log = logging.getLogger("text23d")
HOW_TO = {
    "tinycudann": "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
    "nvdiffrast": "pip install git+https://github.com/NVlabs/nvdiffrast",
}
MODULES = {"tinycudann": "tinycudann", "nvdiffrast": "nvdiffrast.torch"}
_found: dict[str, object] = {}
_warned: set[str] = set()


def load(name: str):
    """The accelerator's module, or None (the reason is remembered; the import is tried once)."""
    if name not in _found:
        try:
            _found[name] = importlib.import_module(MODULES[name]) if torch.cuda.is_available() else None
        except Exception as err:  # ImportError, or a build for another CUDA / torch version
            log.debug("%s unavailable: %s", name, err)
            _found[name] = None
    return _found[name]


def choose(part: str, implementation: str, accelerator: str) -> str:
    """'accelerator' or 'torch' for `implementation` in auto | <accelerator> | torch."""
    allowed = ("auto", accelerator, "torch")
    if implementation not in allowed:
        raise ConfigError(f"{part}.implementation={implementation!r}: allowed are {list(allowed)}. "
                          f"Fix: {part}.implementation=auto")
    if implementation == "torch":
        return "torch"
    module = load(accelerator)
    if module is not None:
        return accelerator
    why = "CUDA is not available" if not torch.cuda.is_available() else f"{accelerator} is not installed"
    if implementation == accelerator:
        raise ConfigError(f"{part}.implementation={accelerator} but {why}. Fix: {part}.implementation=auto "
                          f"(the torch path), or install it: {HOW_TO[accelerator]}")
    if accelerator not in _warned:
        _warned.add(accelerator)
        if torch.cuda.is_available():  # a GPU without the accelerator: worth installing
            log.warning("%s: %s, using the pure-torch path (same results, slower). For the fast path: %s",
                        part, why, HOW_TO[accelerator])
        else:  # it needs CUDA: nothing to install on this machine
            log.info("%s: the pure-torch path (%s needs CUDA, which this machine does not have)", part, accelerator)
    return "torch"
