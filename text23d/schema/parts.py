"""The settings of the interchangeable parts: geometries, renderers, guidances, cameras, the prior.

Each dataclass is the schema of one YAML file (conf/<group>/<option>.yaml); its `_target_` names the
class Hydra builds with these fields as keyword arguments. No torch here: a bad value is refused
before anything heavy loads.
"""
from dataclasses import dataclass
from typing import Any, Optional

from text23d.errors import ConfigError
from text23d.schema.core import as_list, is_ramp, number_or_ramp, option, value_range

# --- geometry ----------------------------------------------------------------------------------------


@dataclass
class GeometryConfig:
    """What every density-and-albedo field shares (geometry/base.py)."""

    _target_: str = option("", "the geometry's class")
    radius: float = option(1.0, "the scene lives in the sphere of this radius", gt=0)
    blob_density: float = option(10.0, "initial density at the centre (Magic3D's blob) …")
    blob_radius: float = option(0.5, "… falling to zero at this radius", gt=0)
    normal_eps: float = option(0.01, "finite-difference step for normals (world units)", gt=0)


@dataclass
class HashGridConfig(GeometryConfig):
    """Instant-NGP's multiresolution hash grid, density and albedo MLPs (geometry/hashgrid.py)."""

    _target_: str = option("text23d.geometry.hashgrid.HashGrid", "the geometry's class")
    n_levels: int = option(16, "resolution levels", ge=1)
    n_features: int = option(2, "features per level", ge=1)
    log2_table: int = option(19, "log2 of the entries per level", ge=4, le=24)
    base_resolution: int = option(16, "the coarsest level's cells per axis", ge=1)
    per_level_scale: float = option(1.447269, "growth per level (2^(8/15): the finest is 4096)", gt=1)
    hidden: int = option(64, "MLP width", ge=1)
    implementation: str = option("auto", "tinycudann when it imports (with CUDA), else torch, announced once",
                                 choices=("auto", "torch", "tinycudann"))
    normals: str = option("analytic", "autograd of the density, or 4 density lookups (no double backward)",
                          choices=("analytic", "finite_difference"))


@dataclass
class NeRFConfig(GeometryConfig):
    """An MLP with positional encoding (geometry/nerf.py)."""

    _target_: str = option("text23d.geometry.nerf.NeRFMLP", "the geometry's class")
    n_freqs: int = option(6, "positional-encoding frequencies", ge=0)
    hidden: int = option(64, "MLP width", ge=1)
    layers: int = option(3, "MLP layers", ge=1)


@dataclass
class GridConfig(GeometryConfig):
    """Dense voxels of density and albedo, sampled trilinearly: fast on CPU (geometry/grid.py)."""

    _target_: str = option("text23d.geometry.grid.DenseGrid", "the geometry's class")
    resolution: int = option(64, "cells per axis", ge=2)


@dataclass
class DMTetConfig:
    """A deformable tetrahedral grid and marching tetrahedra (geometry/dmtet.py)."""

    _target_: str = option("text23d.geometry.dmtet.DMTet", "the geometry's class")
    radius: float = option(1.0, "the scene lives in the sphere of this radius", gt=0)
    resolution: int = option(64, "cubes per axis (64: 275k vertices, 1.6 M tets)", ge=2)
    sphere_radius: float = option(0.5, "the sphere a first stage starts from", gt=0)
    max_deform: float = option(0.5, "a vertex moves at most this fraction of a cell", ge=0)
    color: Any = option(None, "the colour field (a geometry's settings); null: the previous stage's", part=True,
                        allowed="a geometry's settings (e.g. {_target_: text23d.geometry.grid.DenseGrid}), or null")


# --- renderers ---------------------------------------------------------------------------------------


@dataclass
class OccupancyConfig:
    """Empty-space skipping as threestudio's nerfacc estimator (renderers/occupancy.py)."""

    resolution: int = option(32, "cells per axis", ge=2)
    threshold: float = option(0.01, "on σ·δ: a cell below it cannot make a sample visible", ge=0)
    decay: float = option(0.95, "density EMA per probe", gt=0, lt=1)
    update_every: int = option(16, "steps between probes", ge=1)
    warmup_steps: int = option(256, "every cell probed until then", ge=0)


@dataclass
class RendererConfig:
    """What both renderers share: the shading of lambertian and textureless renders."""

    _target_: str = option("", "the renderer's class")
    radius: float = option(1.0, "the scene's radius (the geometry's)", gt=0)
    ambient: float = option(0.1, "shading: ambient + diffuse·max(0, n·l)", ge=0)
    diffuse: float = option(0.9, "shading: ambient + diffuse·max(0, n·l)", ge=0)


@dataclass
class VolumeConfig(RendererConfig):
    """Volume rendering: stratified samples in the bounding sphere, alpha compositing (renderers/volume.py)."""

    _target_: str = option("text23d.renderers.volume.VolumeRenderer", "the renderer's class")
    num_samples: int = option(512, "samples per ray", ge=1)
    skip_weight: float = option(1e-4, "colour and normals only where a sample's weight reaches this (0: everywhere)",
                                ge=0, lt=1)
    occupancy: Optional[OccupancyConfig] = option(OccupancyConfig(), "empty-space skipping; null: off")


@dataclass
class RasterizeConfig(RendererConfig):
    """Mesh rasterisation with a silhouette that blends across edges (renderers/mesh.py)."""

    _target_: str = option("text23d.renderers.mesh.MeshRenderer", "the renderer's class")
    implementation: str = option("auto", "nvdiffrast (CUDA) when installed, else torch, announced once",
                                 choices=("auto", "torch", "nvdiffrast"))
    band: float = option(1.0, "pixels over which the silhouette blends", gt=0)


# --- guidance ----------------------------------------------------------------------------------------


def max_step_rule(value, key: str) -> None:
    number_or_ramp(value, key, "a number", examples=("0.98", "[5000,0.98,0.5,5001]"))


@dataclass
class GuidanceConfig:
    """What every score distillation shares: timesteps, their schedule, w(t), CFG (guidance/base.py)."""

    _target_: str = option("", "the guidance's class")
    guidance_scale: float = option(100.0, "classifier-free guidance scale", ge=0,
                                   fix="{key}=100 (SDS on Stable Diffusion; 20 on DeepFloyd IF; 7.5 on the built-in "
                                       "prior, and for VSD)")
    min_step_percent: float = option(0.02, "t ~ U[min, max]·T", gt=0, lt=1)
    max_step_percent: Any = option(0.98, "the top of t's range", rule=max_step_rule,
                                   allowed="a number in (min_step_percent, 1], or a ramp [start_step, start_value, "
                                           "end_value, end_step] (stage-local steps)")
    weighting: str = option("sds", "w(t): sds = 1 − ᾱ_t, or uniform", choices=("sds", "uniform"))
    grad_clip: Optional[float] = option(None, "clamp each gradient element to ±grad_clip; null: never", gt=0)
    anneal_max_step_percent: Optional[float] = option(None, "max t drops to this … (null: never)", le=1)
    anneal_at_fraction: float = option(0.5, "… after this fraction of the stage's steps", ge=0, le=1)
    view_guidance_scale: Optional[float] = option(None, "the view words' own CFG scale (null: guidance_scale)", ge=0)

    @staticmethod
    def check(node, where: str) -> None:
        low, top = node.get("min_step_percent", 0.02), node.get("max_step_percent", 0.98)
        ramp = as_list(top)
        for value in (ramp[1:3] if ramp and is_ramp(ramp) else [top]):
            if not 0 < low < value <= 1:
                raise ConfigError(f"timestep range min_step_percent={low}, max_step_percent={ramp or value} is invalid: "
                                  "need 0 < min < max <= 1. Fix: e.g. min_step_percent=0.02, max_step_percent=0.98")
        anneal = node.get("anneal_max_step_percent")
        if ramp is not None and anneal is not None:
            raise ConfigError(f"{where}.max_step_percent={ramp} is a ramp and anneal_max_step_percent={anneal} an anneal: "
                              f"use one. Fix: {where}.anneal_max_step_percent=null")
        if anneal is not None and not 0 < low < anneal <= 1:
            raise ConfigError(f"{where}.anneal_max_step_percent={anneal} must lie in (min_step_percent={low}, 1], or be "
                              f"null (no anneal). Fix: e.g. {where}.anneal_max_step_percent=0.5")


@dataclass
class SDSConfig(GuidanceConfig):
    """Score distillation sampling (DreamFusion eq. 3): grad = w(t)·(ε̂(x_t; y, t) − ε) (guidance/sds.py)."""

    _target_: str = option("text23d.guidance.sds.SDSGuidance", "the guidance's class")


@dataclass
class VSDConfig(GuidanceConfig):
    """Variational score distillation with a camera-conditioned LoRA (ProlificDreamer eq. 9; guidance/vsd.py)."""

    _target_: str = option("text23d.guidance.vsd.VSDGuidance", "the guidance's class")
    guidance_scale: float = option(7.5, "CFG of the pretrained term: VSD works at a normal scale", ge=0,
                                   fix="{key}=7.5")
    lora_guidance_scale: float = option(1.0, "CFG of the LoRA term (1.0: conditional only)", ge=0)
    anneal_at_fraction: float = option(0.2, "… after this fraction of the stage's steps", ge=0, le=1)
    lora_rank: int = option(4, "LoRA rank on to_q/to_k/to_v/to_out.0 (4-16 is usual)", ge=1)
    lora_lr: float = option(1e-4, "the LoRA's AdamW learning rate", gt=0, fix="{key}=1e-4")
    lora_steps: int = option(1, "LoRA updates per 3D step", ge=1)
    camera_drop_prob: float = option(0.1, "the camera is zeroed this often while training the LoRA", ge=0, le=1)
    lora_pretrained_model_name_or_path: Optional[str] = option(
        None, "the LoRA's base model; null: a copy of the prior")


# --- cameras and the prior ---------------------------------------------------------------------------


@dataclass
class CameraConfig:
    """Random training cameras and the evaluation orbit (cameras/sampler.py)."""

    _target_: str = option("text23d.cameras.sampler.RandomCameraSampler", "the sampler's class")
    elevation_range: Any = option([-10.0, 45.0], "degrees", rule=value_range(-90, 90), allowed="[min, max] in [-90, 90]")
    azimuth_range: Any = option([-180.0, 180.0], "degrees; 0 = front", rule=value_range(-180, 180),
                                allowed="[min, max] in [-180, 180]")
    distance_range: Any = option([1.5, 2.0], "from the centre; the scene's radius is 1", rule=value_range(1e-3, 1e3),
                                 allowed="[min, max] in [0.001, 1000]")
    fovy_range: Any = option([40.0, 70.0], "degrees", rule=value_range(1, 179), allowed="[min, max] in [1, 179]")
    batch_uniform_azimuth: bool = option(True, "a batch's views spread evenly around the object")
    light_distance_range: Any = option([0.8, 1.5], "the light's distance", rule=value_range(0, 1e3),
                                       allowed="[min, max] in [0, 1000]")
    light_perturb: float = option(1.0, "noise on the light's direction", ge=0)
    eval_elevation: float = option(15.0, "the orbit's elevation (validation, video, mesh checks)", ge=-90, le=90)
    eval_distance: float = option(1.75, "the orbit's distance", gt=0)
    eval_fovy: float = option(55.0, "the orbit's field of view (degrees)", gt=0, lt=180)


@dataclass
class PriorConfig:
    """The 2D diffusion model distilled (prior/loading.py): a hub id or a diffusers folder."""

    pretrained_model_name_or_path: str = option("stabilityai/stable-diffusion-2-1-base",
                                                "a hub id or a local diffusers folder")
    dtype: str = option("auto", "auto: float16 on CUDA (bfloat16 with bf16-mixed), float32 on CPU",
                        choices=("auto", "float32", "float16", "bfloat16"))
    latent: Any = option("auto", "auto: latent if the folder has a vae/", choices=("auto", True, False))
    resolution: Optional[int] = option(None, "pixels a side; null: the model's own", ge=1)


GEOMETRIES = {"hashgrid": HashGridConfig, "nerf": NeRFConfig, "grid": GridConfig, "dmtet": DMTetConfig}
RENDERERS = {"volume": VolumeConfig, "rasterize": RasterizeConfig}
GUIDANCES = {"sds": SDSConfig, "vsd": VSDConfig}


# --- what a system holds besides its parts -----------------------------------------------------------


def thresholds_ok(node, where: str) -> None:
    front, back = node.get("front_threshold", 45.0), node.get("back_threshold", 45.0)
    if not front + back <= 180:
        raise ConfigError(f"{where}: front_threshold={front}, back_threshold={back} are invalid: each must be >= 0 and "
                          f"their sum <= 180 degrees. Fix: {where}.front_threshold=45 {where}.back_threshold=45")


@dataclass
class PromptProcessorConfig:
    """View-dependent prompts: ', front view' / ', side view' / … by camera angle (prompts/processor.py)."""

    _target_: str = option("text23d.prompts.processor.PromptProcessor", "the processor's class")
    view_dependent: bool = option(True, "append the view's words to the prompt")
    front_threshold: float = option(45.0, "|azimuth| ≤ this: front", ge=0, le=180)
    back_threshold: float = option(45.0, "|azimuth| ≥ 180 − this: back", ge=0, le=180)
    overhead_threshold: float = option(60.0, "elevation above this: overhead", ge=0, le=90)
    view_sectors: int = option(4, "4: front/side/back (DreamFusion's); 8: a word per 45° of azimuth", choices=(4, 8))
    cache_dir: Optional[str] = option(None, "where text embeddings are cached; null: none")

    check = staticmethod(thresholds_ok)


def color_rule(value, key: str) -> None:
    items = as_list(value)
    if items is None or len(items) != 3 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in items):
        raise ConfigError(f"{key}={value!r}: an RGB colour, three numbers in [0, 1]. Fix: e.g. {key}=[1.0,1.0,1.0]")


@dataclass
class BackgroundConfig:
    """What a ray that misses the object sees (renderers/background.py)."""

    _target_: str = option("text23d.renderers.background.Background", "the background's class")
    mode: str = option("learned", "learned (an MLP of the view direction) or solid", choices=("learned", "solid"))
    color: Any = option([1.0, 1.0, 1.0], "the solid colour, and the learned one's start", rule=color_rule,
                        allowed="[r, g, b] in [0, 1]")
    n_freqs: int = option(2, "the learned background's encoding frequencies", ge=0)
    hidden: int = option(16, "the learned background's MLP width", ge=1)


OTHERS = (CameraConfig, PromptProcessorConfig, BackgroundConfig)
