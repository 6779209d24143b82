import math

import pytest
import torch

from text23d.cameras.sampler import RandomCameraSampler, get_rays, look_at, spherical_to_position
from text23d.errors import ConfigError

from tests.helpers import check_settings


def test_random_cameras_stay_in_their_ranges():
    torch.manual_seed(0)
    s = RandomCameraSampler(elevation_range=(-10, 45), distance_range=(1.5, 2.0), fovy_range=(40, 70))
    cams = s.sample(4096)
    assert cams.elevation.min() >= -10 and cams.elevation.max() <= 45
    assert cams.distance.min() >= 1.5 and cams.distance.max() <= 2.0
    fov = torch.rad2deg(cams.fovy)
    assert fov.min() >= 40 - 1e-4 and fov.max() <= 70 + 1e-4
    assert cams.azimuth.min() >= -180 and cams.azimuth.max() < 180
    # the whole range is used, not a corner of it
    assert cams.elevation.max() - cams.elevation.min() > 50
    # camera positions agree with (elevation, azimuth, distance)
    pos = cams.c2w[:, :3, 3]
    assert torch.allclose(pos.norm(dim=-1), cams.distance, atol=1e-5)
    assert torch.allclose(torch.rad2deg(torch.asin(pos[:, 2] / cams.distance)), cams.elevation, atol=1e-3)


def test_batch_azimuths_are_spread_uniformly():
    torch.manual_seed(1)
    cams = RandomCameraSampler().sample(4)
    az = torch.sort((cams.azimuth + 360) % 360).values
    gaps = torch.diff(torch.cat([az, az[:1] + 360]))
    assert torch.allclose(gaps, torch.full((4,), 90.0), atol=1e-3)


def test_cameras_look_at_the_origin():
    pos = spherical_to_position(torch.tensor([30.0]), torch.tensor([60.0]), torch.tensor([2.0]))
    c2w = look_at(pos)
    forward = -c2w[0, :3, 2]
    assert torch.allclose(forward, -pos[0] / pos[0].norm(), atol=1e-6)
    assert c2w[0, 2, 1] > 0  # camera up has a +z component (z-up world)
    rays_o, rays_d = get_rays(type("C", (), {"c2w": c2w, "fovy": torch.tensor([0.8])})(), 5, 5)
    centre = rays_d[0, 2, 2]
    assert torch.allclose(centre, forward, atol=1e-6)
    # top-left ray is at half the fov from the centre, vertically
    top = rays_d[0, 0, 2]
    angle = torch.acos((top * centre).sum())
    assert math.isclose(angle.item(), math.atan(math.tan(0.4) * 4 / 5), rel_tol=1e-4)


def test_orbit_starts_at_front_and_goes_round():
    s = RandomCameraSampler(eval_elevation=15, eval_distance=1.75)
    cams = s.orbit(8)
    assert cams.azimuth[0] == 0
    assert torch.allclose(cams.elevation, torch.full((8,), 15.0))
    assert len(set(cams.azimuth.tolist())) == 8


def test_bad_ranges_are_rejected_with_the_key_name():
    with pytest.raises(ConfigError, match="elevation_range"):
        check_settings(RandomCameraSampler, elevation_range=(50, 10))
    with pytest.raises(ConfigError, match="fovy_range"):
        check_settings(RandomCameraSampler, fovy_range=(0, 200))
