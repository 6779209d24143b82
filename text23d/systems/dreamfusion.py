"""DreamFusion (Poole et al. 2022): a NeRF optimised with Score Distillation Sampling."""
from __future__ import annotations

from text23d.systems.base import BaseSystem


class DreamFusion(BaseSystem):
    def guide(self, stage, rgb, cond, uncond, cams, step: int) -> dict:
        return stage.guidance(self.prior, rgb, cond, uncond, step=step, max_steps=stage.steps,
                              text_plain=self.plain_text(stage, len(cond)))
