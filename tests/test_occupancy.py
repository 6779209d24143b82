"""The occupancy grid skips empty space without changing the image or the gradient."""
import torch

from text23d.cameras.sampler import RandomCameraSampler
from text23d.geometry.grid import DenseGrid
from text23d.renderers.background import Background
from text23d.renderers.occupancy import OccupancyGrid
from text23d.renderers.volume import VolumeRenderer


class Counting(DenseGrid):
    def density(self, points):
        self.evaluated = getattr(self, "evaluated", 0) + len(points)
        return super().density(points)


def field():
    torch.manual_seed(0)
    g = Counting(resolution=24, blob_density=20.0, blob_radius=0.4)
    with torch.no_grad():
        g.density_grid.normal_(0, 1)  # lumpy, but empty far from the blob (softplus of a negative bias)
        g.albedo_grid.normal_()
    return g


def test_skipping_empty_cells_changes_neither_image_nor_gradient():
    g, cams = field(), RandomCameraSampler().sample(3)
    renderer = VolumeRenderer(num_samples=64, occupancy={"resolution": 16})
    grid = renderer.make_occupancy()
    assert grid.update(g.density, step=0, sample_spacing=renderer.sample_spacing)
    assert 0.05 < grid.occupied.float().mean() < 0.6  # the blob and its shell, not the corners
    outs, grads, evaluated = [], [], []
    for occ in (None, grid):
        g.zero_grad()
        g.evaluated = 0
        out = renderer(g, Background("solid"), cams, 20, 20, shading="lambertian", occupancy=occ)
        (out["comp_rgb"] * torch.linspace(0.2, 1, 3)).sum().backward()
        outs.append(out["comp_rgb"].detach())
        grads.append(torch.cat([g.density_grid.grad, g.albedo_grid.grad.flatten()]))
        evaluated.append(g.evaluated)
    assert evaluated[1] < 0.7 * evaluated[0]
    # Each skipped sample had σ·δ below 0.01 at the last probe: its alpha was below 1 %.
    assert (outs[0] - outs[1]).abs().max() < 2e-2
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_updates_follow_the_schedule_and_keep_what_is_occupied():
    g = field()
    grid = OccupancyGrid(resolution=8, update_every=4, warmup_steps=8)
    assert grid.lookup(torch.zeros(1, 3)).all()  # before any probe: everything counts as occupied
    assert not grid.update(g.density, step=1, sample_spacing=0.03)
    assert grid.update(g.density, step=4, sample_spacing=0.03)
    before = grid.occupied.clone()
    assert grid.lookup(torch.zeros(1, 3)).all() and not grid.lookup(torch.tensor([[0.95, 0.95, 0.95]])).any()
    assert grid.update(g.density, step=8, sample_spacing=0.03)  # after the warm-up: a subset of cells
    # the EMA decays slowly (0.95 per probe): what held density still counts as occupied
    assert (grid.occupied & before).sum() >= 0.9 * before.sum()
