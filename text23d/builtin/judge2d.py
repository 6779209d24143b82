"""A 2D judge of the built-in prior's world: what shape and colour does an image show?

Used to measure whether the prior can *generate* (the fraction of its DDIM samples that show the
caption's shape and colour). It is a nearest-neighbour classifier over a bank of true renders
with known labels, from the training data's own distribution (random cameras, scales, rotations,
every one of the 48 pairs), so it needs no training and no weights:
- shape: the bank image whose object mask (pixels far from the white background) has the highest
  IoU with the image's mask;
- colour: the bank colour nearest to the mean object colour, shading included (a shaded gray and
  a shaded black differ in brightness, not hue).
Its own accuracy on fresh true renders is measured by `self_test` and reported beside its verdicts.
"""
from __future__ import annotations

import numpy as np
import torch

from text23d.builtin.data import COLOURS, SHAPES, make_dataset

FOREGROUND = 0.25  # 1 − min(r, g, b) above this: not the white background


def object_masks(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, H·W) bool: pixels clearly darker than white in some channel."""
    x = images.astype(np.float32) / 255.0
    return (1.0 - x.min(-1) > FOREGROUND).reshape(len(images), -1)


def mean_colours(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, 3) mean colour of the object pixels (white where an image shows no object)."""
    x = images.astype(np.float32).reshape(len(images), -1, 3) / 255.0
    count = masks.sum(1, keepdims=True)
    return np.where(count > 0, (x * masks[..., None]).sum(1) / np.maximum(count, 1), 1.0)


class ImageJudge:
    def __init__(self, n_bank: int = 4800, seed: int = 12345, resolution: int = 32):
        images, _, meta = make_dataset(n_bank, seed=seed, held_out=(), resolution=resolution)
        self.shape = np.array([SHAPES.index(s) for s in meta["shape"]])
        self.colour = np.array([list(COLOURS).index(c) for c in meta["colour"]])
        self.masks = torch.from_numpy(object_masks(images)).float()  # (N, P)
        self.colours = mean_colours(images, object_masks(images))

    def predict(self, images: np.ndarray) -> tuple[list[str], list[str]]:
        """Shape and colour names for images (N, H, W, 3) uint8."""
        masks = object_masks(images)
        m = torch.from_numpy(masks).float()
        inter = m @ self.masks.T
        union = m.sum(1, keepdim=True) + self.masks.sum(1)[None] - inter
        shape_idx = self.shape[(inter / union.clamp_min(1)).argmax(1).numpy()]
        colours = mean_colours(images, masks)
        dist = ((colours[:, None] - self.colours[None]) ** 2).sum(-1)
        colour_idx = self.colour[dist.argmin(1)]
        return [SHAPES[i] for i in shape_idx], [list(COLOURS)[i] for i in colour_idx]

    def self_test(self, n: int = 960, seed: int = 777) -> dict:
        """Accuracy on fresh true renders (another seed than the bank)."""
        images, _, meta = make_dataset(n, seed=seed, held_out=())
        shapes, colours = self.predict(images)
        return {"n": n, "shape_accuracy": float(np.mean([a == b for a, b in zip(shapes, meta["shape"])])),
                "colour_accuracy": float(np.mean([a == b for a, b in zip(colours, meta["colour"])]))}
