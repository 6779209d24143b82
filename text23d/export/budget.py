"""The memory an export needs, estimated from its settings before anything is allocated (no torch
here: the pre-flight checks it). An export runs on the host: the marching-cubes grid, the texture
bake and the turntable's frames each hold arrays whose size the settings fix.

    mesh     resolution³ voxels: the density grid in float32 and its float64 copy for marching cubes
    texture  texture_size² texels: positions, normals, colours and masks of the bake (float32)
    video    video_views frames of video_resolution²: rgb, normals and opacity (float32) kept for the
             grid and the mp4, plus each frame's uint8 rgb | normals
"""
from __future__ import annotations

from text23d.errors import ConfigError

GiB = 2**30
BYTES_PER_VOXEL = 4 + 8
BYTES_PER_TEXEL = 64
BYTES_PER_FRAME_PIXEL = 3 * 3 * 4 + 2 * 3


def export_bytes(ex) -> dict[str, int]:
    """Bytes by part of an export with settings `ex` (the export block)."""
    frames = ex.get("video_views", 120) if ex.get("video", True) else 8
    return {"mesh": BYTES_PER_VOXEL * ex.get("resolution", 128) ** 3,
            "texture": BYTES_PER_TEXEL * ex.get("texture_size", 1024) ** 2 if ex.get("texture", False) else 0,
            "video": BYTES_PER_FRAME_PIXEL * frames * ex.get("video_resolution", 128) ** 2}


FIX = {"mesh": "export.resolution=128", "texture": "export.texture_size=1024",
       "video": "export.video_views=120 export.video_resolution=128"}


def check_export_memory(ex, where: str = "export") -> int:
    """Refuse an export that needs more memory than this machine has in all (it would fail after
    training, or take the machine down); return the estimate in bytes."""
    import psutil

    parts = export_bytes(ex)
    need, total = sum(parts.values()), psutil.virtual_memory().total
    if need > total:
        biggest = max(parts, key=parts.get)
        said = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if v)
        raise ConfigError(f"{where}: these settings need about {need / GiB:.0f} GiB to export ({said} GiB), more "
                          f"than this machine's {total / GiB:.0f} GiB. Fix: e.g. {FIX[biggest]}")
    return need
