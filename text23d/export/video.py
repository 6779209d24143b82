"""Turntable videos (mp4), PNG images and labelled image grids, all written atomically."""

from __future__ import annotations

import math
import os
from typing import Sequence

import imageio.v2 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from text23d.fileio import atomic_output


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Image data as uint8: floats are read as [0, 1] (clipped), integers as [0, 255]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if np.issubdtype(x.dtype, np.floating):
        # +0.5 rounds instead of truncating, so 1.0 -> 255 and 0.5 -> 128.
        return (np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(x, 0, 255).astype(np.uint8)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column so H and W are even.  # (N, H, W, 3) -> (N, H', W', 3)

    yuv420p stores colour at half resolution, so libx264 rejects odd sizes. Padding by one
    edge pixel keeps every rendered pixel, where imageio's default would rescale to a multiple
    of 16 and blur the frame.
    """
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def save_video(
    frames: np.ndarray | torch.Tensor | Sequence[np.ndarray], path: str, fps: int = 30
) -> str:
    """Write frames (N, H, W, 3), uint8 or float in [0, 1], as an H.264/yuv420p mp4.

    Odd H or W gain one replicated edge row/column. Returns the absolute path.
    """
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        frames = np.stack([to_uint8(f) for f in frames])
    frames = to_uint8(frames)  # (N, H, W, 3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            f"save_video needs frames of shape (N, H, W, 3) with N >= 1, got {frames.shape}. "
            "Fix: stack the rendered RGB frames along a new first axis."
        )
    frames = _pad_to_even(frames)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp:
        # macro_block_size=2: sizes are already even, so imageio must not rescale to 16-multiples.
        # quality=8 of 10: frames are small, so sharp ones cost only kilobytes.
        # +faststart puts the index first so browsers play the file before it fully loads.
        with iio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=2,
            quality=8,
            output_params=["-movflags", "+faststart"],
        ) as writer:
            for frame in frames:
                writer.append_data(frame)
        _check_complete(tmp, len(frames))  # before it replaces a good video
    return path


def _check_complete(path: str, n: int) -> None:
    """ffmpeg may fail to write (a full disk) and still exit 0: count the frames it wrote."""
    import errno
    import resource
    import shutil

    from imageio_ffmpeg import count_frames_and_secs

    try:
        written = count_frames_and_secs(path)[0]
    except (RuntimeError, OSError):
        written = 0
    if written == n:
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if limit != resource.RLIM_INFINITY and size >= limit:
        raise OSError(errno.EFBIG, f"File too large: ffmpeg wrote {written} of {n} frames")
    if shutil.disk_usage(os.path.dirname(path)).free < 64 * 2**20:
        raise OSError(errno.ENOSPC, f"No space left on device: ffmpeg wrote {written} of {n} frames")
    raise RuntimeError(f"ffmpeg wrote {written} of {n} frames to {path}; the previous video is kept")


def save_image(img: np.ndarray | torch.Tensor, path: str) -> str:
    """Write an (H, W, 3) image, uint8 or float in [0, 1], as PNG. Returns the absolute path."""
    img = to_uint8(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"save_image needs an (H, W, 3) image, got shape {img.shape}.")
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path


def _font(tile_w: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font, scaled so labels stay legible on large tiles."""
    try:
        return ImageFont.load_default(size=max(10, tile_w // 32))
    except (ImportError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; words too long are cut; extra lines end in '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while font.getlength(word) > width:  # cut an over-long word (e.g. a long override)
            n = max(1, int(len(word) * width / font.getlength(word)))
            while n > 1 and font.getlength(word[:n]) > width:
                n -= 1
            lines.append(word[:n])
            word = word[n:]
        if word:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def make_grid(
    images: Sequence[np.ndarray],
    ncol: int,
    pad: int = 2,
    labels: Sequence[str] | None = None,
    bg: int = 255,
) -> np.ndarray:
    """Tile images row by row into one (H_grid, W_grid, 3) uint8 image.

    Every tile takes the first image's size (others are resized). Columns = min(ncol, len),
    rows = ceil(len / columns); with labels, each tile gets a text band underneath, as tall as
    the longest wrapped label (at most 3 lines). Grid size:
      W_grid = cols·W + (cols + 1)·pad,   H_grid = rows·(H + band) + (rows + 1)·pad.
    """
    if len(images) == 0 or ncol < 1:
        raise ValueError(f"make_grid needs >= 1 image and ncol >= 1, got {len(images)} and {ncol}.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid got {len(labels)} labels for {len(images)} images.")
    tiles = [Image.fromarray(to_uint8(im)).convert("RGB") for im in images]
    w, h = tiles[0].size
    tiles = [t if t.size == (w, h) else t.resize((w, h), Image.BILINEAR) for t in tiles]

    font = _font(w)
    wrapped = [_wrap(str(s), font, w) for s in labels] if labels is not None else None
    line_h = font.getbbox("Ag|")[3] + 2 if wrapped else 0
    band = line_h * max(map(len, wrapped)) + pad if wrapped else 0

    cols = min(ncol, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    size = (cols * w + (cols + 1) * pad, rows * (h + band) + (rows + 1) * pad)  # (W_grid, H_grid)
    canvas = Image.new("RGB", size, (bg,) * 3)
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if bg > 127 else (255, 255, 255)
    for n, tile in enumerate(tiles):
        x = pad + (n % cols) * (w + pad)
        y = pad + (n // cols) * (h + band + pad)
        canvas.paste(tile, (x, y))
        for k, line in enumerate(wrapped[n] if wrapped else []):
            draw.text((x, y + h + pad // 2 + k * line_h), line, fill=ink, font=font)
    return np.asarray(canvas)  # (H_grid, W_grid, 3)
