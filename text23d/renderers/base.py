"""What every renderer declares, so a system reads it instead of asking (systems/parts.py)."""
from __future__ import annotations

from torch import nn


class Renderer(nn.Module):
    needs: frozenset = frozenset()  # what it takes from the geometry
    provides: frozenset = frozenset()  # what its output holds
    normals_from_geometry = False  # its normals are the geometry's own (a volume renderer's)
    ignores: dict[str, str] = {}  # loss terms that mean nothing with it: term -> why (said once)
    # forward(geometry, background, cams, height, width, shading=...) and, of the system's other
    # requests (need_normals, jitter, occupancy), only these keywords: what it uses.
    options: frozenset = frozenset()

    def accepted(self, **requests) -> dict:
        """Of what a system asks for (need_normals, jitter, occupancy), what this renderer takes."""
        return {k: v for k, v in requests.items() if k in self.options}

    def make_occupancy(self) -> nn.Module | None:
        """A fresh empty-space-skipping grid for one particle, or None (the renderer uses none)."""
        return None
