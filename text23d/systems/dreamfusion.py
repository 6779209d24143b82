"""DreamFusion (Poole et al. 2022): a NeRF optimised with Score Distillation Sampling.

The training step is BaseSystem's: render, score with the stage's guidance (SDS by default,
guidance/sds.py), add the regularisers."""
from __future__ import annotations

from text23d.systems.base import BaseSystem


class DreamFusion(BaseSystem):
    pass
