"""On a real prior (sd21base, sd15, deepfloyd_if) every system's composed config equals threestudio's
(configs/*.yaml at HEAD 28d9d80: dreamfusion-sd/-if, magic3d-coarse-sd/-if, magic3d-refine-sd,
prolificdreamer, -geometry, -texture; DESIGN §10) on every key compared here, stage by stage, except
the differences named in DIFFERENCES, which docs/defaults.md lists in the same words.

What is compared is what a run uses: each stage as systems/stages.py merges it, its steps as
allocate_steps splits them, a null render size as the prior's own, and the learning rate of each
kind of parameter as Stage.optimizer assigns it (longest param_groups prefix, else the base rate)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from helpers import compose_cfg
from text23d.systems.losses import always_zero
from text23d.systems.stages import allocate_steps, group_of, stage_configs

ROOT = Path(__file__).resolve().parents[1]
FAMILY = {"dreamfusion": "dreamfusion", "sds": "dreamfusion", "magic3d": "magic3d",
          "prolificdreamer": "prolificdreamer", "vsd": "prolificdreamer"}  # option -> threestudio's configs
PRIORS = ("sd21base", "sd15", "deepfloyd_if")
NATIVE = {"sd21base": 512, "sd15": 512, "deepfloyd_if": 64}  # the prior's own size: what width: null renders
SD21 = "stabilityai/stable-diffusion-2-1"

# --- threestudio, key by key ----------------------------------------------------------------------
# Equivalences built into the names: renderer.occupancy ≙ nerfacc's occupancy-grid estimator; our
# DMTet of N cubes a side ≙ threestudio's Quartet grid "2N" (about the same vertex and tet count,
# DESIGN §5); precision 32-true ≙ threestudio's 32; prior.dtype auto ≙ its fp16 weights on CUDA.
HASH_GRID = ("hash grid", 16, 2, 19, 16, 1.4473)  # levels, features, log2 table, base resolution, scale
BLOB = (10.0, 0.5)  # blob_magic3d: 10·(1 − |x|/0.5) before the softplus
ADAM, ADAMW = ("Adam", (0.9, 0.99), 1e-15), ("AdamW", (0.9, 0.99), 1e-15)
T_RAMP = (0.02, (5000, 0.98, 0.5, 5001))  # min t, max t: 0.98, then 0.5 after 5,000 steps

DREAMFUSION = {
    "steps": 10000, "render": ((64,), ()), "camera": ((1.5, 2.0), (40.0, 70.0), (-10.0, 45.0)), "radius": 2.0,
    "geometry": (HASH_GRID, "analytic", BLOB), "samples": (512, "occupancy grid"),
    "material": ("diffuse + point light", 2001), "background": "neural environment map",
    "guidance": ("sds", 100.0), "weighting": "sds", "t": (0.02, 0.98),
    "losses": {"distillation": 1.0, "orient": (0, 10.0, 1000.0, 5000), "sparsity": 1.0},
    "optimizer": ADAM + ({"encoding": 0.01, "density MLP": 0.01, "feature MLP": 0.01, "background": 0.001},),
    "precision": "16-mixed", "weights": "float16 on CUDA", "views": (45.0, 45.0),
}
MAGIC3D_FINE = {
    **DREAMFUSION, "steps": 5000, "render": ((512,), ()), "camera": ((1.5, 2.0), (30.0, 45.0), (-10.0, 45.0)),
    "geometry": ("dmtet", 128, "deformable"), "colour field": "carried", "samples": "rasteriser",
    "material": ("diffuse + point light", 0), "t": (0.02, 0.5),
    "losses": {"distillation": 1.0, "normal_consistency": 10000.0},
    "optimizer": ADAM + ({"sdf": 0.01, "deformation": 0.01, "encoding": 0.01, "feature MLP": 0.01,
                          "background": 0.01},),  # magic3d-refine: one group
}
PD_CAMERA = ((1.0, 1.5), (40.0, 70.0), (-10.0, 45.0))
PROLIFICDREAMER_NERF = {
    "steps": 25000, "render": ((64, 512), (5000,)), "camera": PD_CAMERA, "radius": 1.0,
    "geometry": (HASH_GRID, None, BLOB),  # normal_type null: no normals in training
    "samples": (512, "occupancy grid"), "material": "albedo", "background": "neural environment map",
    "guidance": ("vsd", 7.5), "weighting": "sds",  # its VSD gradient is weighted by 1 − ᾱ_t too
    "t": T_RAMP, "losses": {"distillation": 1.0, "sparsity": 10.0, "opaque": (10000, 0.0, 1000.0, 10001)},
    "optimizer": ADAMW + ({"encoding": 0.01, "density MLP": 0.001, "feature MLP": 0.001, "background": 0.001,
                           "LoRA": 1e-4},),
    "precision": "32-true", "weights": "float16 on CUDA", "lora base": SD21, "views": (30.0, 30.0),
}
PROLIFICDREAMER_GEOMETRY = {
    "steps": 15000, "render": ((512,), ()), "camera": PD_CAMERA, "radius": 1.0, "geometry": ("dmtet", 128, "deformable"),
    "samples": "rasteriser", "material": "normal map",
    "background": ("solid", (0.0, 0.0, 0.0)),  # unused: the rasteriser lerps the normal map from zeros
    "guidance": ("sds", 100.0), "weighting": "sds", "t": T_RAMP,
    "losses": {"distillation": 1.0, "normal_consistency": 10000.0, "laplacian": 10000.0},
    "optimizer": ADAM + ({"sdf": 0.005, "deformation": 0.005},),
    "precision": "32-true", "weights": "float16 on CUDA", "views": (45.0, 45.0),
}
PROLIFICDREAMER_TEXTURE = {
    **PROLIFICDREAMER_NERF, "steps": 30000, "render": ((512,), ()), "geometry": ("dmtet", 128, "deformable"),
    "colour field": "new hash grid", "samples": "rasteriser", "losses": {"distillation": 1.0},
    "optimizer": ADAMW + ({"sdf": "frozen", "deformation": "frozen", "encoding": 0.01, "feature MLP": 0.001,
                           "background": 0.001, "LoRA": 1e-4},),
}
IF_SDS = {"guidance": ("sds", 20.0), "camera elevation": (-10.0, 90.0)}  # dreamfusion-if, magic3d-coarse-if


def threestudio(family: str, stage: str, prior: str) -> dict:
    table = {("dreamfusion", "main"): DREAMFUSION,
             ("magic3d", "coarse"): {**DREAMFUSION, "weighting": "uniform"}, ("magic3d", "fine"): MAGIC3D_FINE,
             ("prolificdreamer", "nerf"): PROLIFICDREAMER_NERF,
             ("prolificdreamer", "geometry"): PROLIFICDREAMER_GEOMETRY,
             ("prolificdreamer", "texture"): PROLIFICDREAMER_TEXTURE}
    expected = dict(table[family, stage])
    if prior == "deepfloyd_if" and family in ("dreamfusion", "magic3d"):  # magic3d fine keeps the coarse -if's
        expected["guidance"] = IF_SDS["guidance"]
        distance, fovy, _ = expected["camera"]
        expected["camera"] = (distance, fovy, IF_SDS["camera elevation"])
    return expected


# --- the differences we keep (docs/defaults.md, "Differences", in the same words) -----------------
@dataclass(frozen=True)
class Difference:
    key: str
    where: str  # as the table in docs/defaults.md says it
    scope: frozenset  # (family, stage, prior) it applies to
    ours: object
    theirs: object
    why: str


def _scope(stages, priors=PRIORS) -> frozenset:
    return frozenset((family, stage, prior) for family, stage in stages for prior in priors)


DIFFERENCES = [
    Difference("radius", "dreamfusion; magic3d, both stages", _scope([("dreamfusion", "main"), ("magic3d", "coarse"),
                                                                       ("magic3d", "fine")]), 1.0, 2.0,
               "The cameras (distance 1.5-2.0) and the density blob are the same in world units, so are the views; "
               "radius 1 keeps density out of the space around the cameras, which sit inside threestudio's "
               "radius-2 sphere, and puts the samples, occupancy cells, export grid and hash levels on the object."),
    Difference("render", "magic3d fine; prolificdreamer geometry, texture; on deepfloyd_if",
               _scope([("magic3d", "fine"), ("prolificdreamer", "geometry"), ("prolificdreamer", "texture")],
                      ["deepfloyd_if"]), ((64,), ()), ((512,), ()),
               "width: null is the prior's own size; IF stage I sees 64² images, so 512² renders would be resized "
               "to 64² after costing 64× the pixels. threestudio's configs for these stages are SD's."),
    Difference("render", "prolificdreamer nerf; on deepfloyd_if", _scope([("prolificdreamer", "nerf")], ["deepfloyd_if"]),
               ((64,), ()), ((64, 512), (5000,)),
               "As the later stages (conf/pair/deepfloyd_if_vsd.yaml): 512² volume renders resized to IF's 64²."),
    Difference("lora base", "prolificdreamer nerf, texture; on sd15, deepfloyd_if",
               _scope([("prolificdreamer", "nerf"), ("prolificdreamer", "texture")], ["sd15", "deepfloyd_if"]),
               None, SD21,
               "The LoRA scores the prior's x_t under the prior's text embeddings: SD 2.1 expects 1024-wide CLIP "
               "embeddings in SD's latent space; SD 1.5's are 768 wide and IF's T5 ones 4096 in pixel space. "
               "null trains the LoRA on a copy of the prior."),
    Difference("colour field", "prolificdreamer texture", _scope([("prolificdreamer", "texture")]), "carried",
               "new hash grid",
               "One command runs the three stages: the texture stage starts from the colour field that made the "
               "stage-1 renders (carried through stage 2), which the carried LoRA has learnt, instead of from noise."),
]


def difference_for(family: str, stage: str, prior: str, key: str) -> Difference | None:
    hits = [d for d in DIFFERENCES if d.key == key and (family, stage, prior) in d.scope]
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


# --- ours: the values a run uses --------------------------------------------------------------------
ROLES = {  # a parameter of each kind, by the stage's geometry
    "HashGrid": {"encoding": "geometry.encoding.params", "density MLP": "geometry.density_net.0.weight",
                 "feature MLP": "geometry.feature_net.0.weight"},
    "DMTet": {"sdf": "geometry.sdf", "deformation": "geometry.deform",
              "encoding": "geometry.color.encoding.params", "feature MLP": "geometry.color.feature_net.0.weight"},
}


def plain(value):
    if isinstance(value, (ListConfig, list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def effective(cfg: DictConfig, st: DictConfig, steps: int, native: int) -> dict:
    geo, ren, g, sh, loss = st.geometry, st.renderer, st.guidance, st.shading, st.loss
    kind = geo._target_.rsplit(".", 1)[1]
    mesh = ren._target_.endswith("MeshRenderer")
    vsd = g._target_.endswith("VSDGuidance")

    def sizes(v):
        return tuple(s or native for s in v) if isinstance(v, ListConfig) else (v or native,)

    assert sizes(st.width) == sizes(st.height), st.name
    if sh.get("normal_prob", 0.0) >= 1:
        material = "normal map"
    elif sh.albedo_prob >= 1:
        material = "albedo"
    else:
        material = ("diffuse + point light", sh.ambient_only_steps)
    orient = not always_zero(loss.get("lambda_orient", 0.0))
    out = {
        "steps": steps,
        "render": (sizes(st.width), plain(st.resolution_milestones) if isinstance(st.width, ListConfig) else ()),
        "camera": (plain(st.camera.distance_range), plain(st.camera.fovy_range), plain(st.camera.elevation_range)),
        "radius": geo.radius,
        "samples": "rasteriser" if mesh else (ren.num_samples, "occupancy grid" if ren.occupancy else "every sample"),
        "material": material,
        "background": ("neural environment map" if st.background.mode == "learned"
                       else ("solid", plain(st.background.color))),
        "guidance": ("vsd" if vsd else "sds", float(g.guidance_scale)),
        "weighting": g.weighting,
        "t": (g.min_step_percent, plain(g.max_step_percent)),
        "losses": {"distillation": float(loss.get("lambda_vsd" if vsd else "lambda_sds", loss.get("lambda_sds", 1.0))),
                   **{k.removeprefix("lambda_"): plain(v) for k, v in loss.items()
                      if k not in ("lambda_sds", "lambda_vsd") and not always_zero(v)}},
        "precision": cfg.trainer.precision,
        "weights": {"auto": "float16 on CUDA"}.get(cfg.prior.dtype, cfg.prior.dtype),
        "views": (st.prompt_processor.front_threshold, st.prompt_processor.back_threshold),
    }
    if kind == "HashGrid":
        used = orient or material not in ("albedo", "normal map")  # normals computed in training at all
        out["geometry"] = (("hash grid", geo.n_levels, geo.n_features, geo.log2_table, geo.base_resolution,
                            round(geo.per_level_scale, 4)), geo.normals if used else None,
                           (geo.blob_density, geo.blob_radius))
    else:
        out["geometry"] = (kind.lower(), 2 * geo.resolution, "deformable" if geo.max_deform > 0 else "fixed")
    if mesh and material != "normal map":  # a stage that trains colours on a mesh
        out["colour field"] = "carried" if geo.get("color") is None else "new " + geo.color._target_.rsplit(".", 1)[1]
    roles = dict(ROLES[kind])
    if material == "normal map":  # only the shape is trained
        roles = {r: p for r, p in roles.items() if r in ("sdf", "deformation")}
    if st.background.mode == "learned":
        roles["background"] = "background.mlp.0.weight"
    opt, groups = st.optimizer, st.optimizer.get("param_groups") or {}
    frozen = [p for p in st.get("freeze") or []]

    def lr(name):
        if any(name == p or name.startswith(p + ".") for p in frozen):
            return "frozen"
        group = group_of(name, groups)
        return groups[group].get("lr", opt.lr) if group is not None else opt.lr

    lrs = {role: lr(name) for role, name in roles.items()}
    if vsd:
        lrs["LoRA"] = g.lora_lr  # AdamW, its own optimizer (guidance/vsd.py)
        out["lora base"] = g.lora_pretrained_model_name_or_path
    out["optimizer"] = (opt._target_.rsplit(".", 1)[1], plain(opt.betas), opt.eps, lrs)
    return out


def ours(system: str, prior: str) -> dict[str, dict]:
    cfg = compose_cfg(["prompt=x", f"system={system}", f"prior={prior}"])
    stages = stage_configs(cfg)
    return {st.name: effective(cfg, st, n, NATIVE[prior]) for st, n in zip(stages, allocate_steps(cfg, stages))}


# --- the tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("system", list(FAMILY))
def test_every_stage_is_threestudios_but_for_the_named_differences(system, prior):
    family, mismatches = FAMILY[system], []
    for stage, values in ours(system, prior).items():
        expected = threestudio(family, stage, prior)
        assert values.keys() == expected.keys(), (stage, values.keys() ^ expected.keys())
        for key, value in values.items():
            named = difference_for(family, stage, prior, key)
            if named is not None:  # the named difference itself is what we have, and what they have
                assert (value, expected[key]) == (named.ours, named.theirs), (stage, key, value, expected[key])
            elif value != expected[key]:
                mismatches.append(f"{stage}.{key}: ours {value!r}, threestudio {expected[key]!r}")
    assert not mismatches, "\n".join(mismatches)


def test_every_named_difference_applies_and_is_in_the_docs():
    docs = (ROOT / "docs" / "defaults.md").read_text()
    section = docs.split("## Differences", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in section.split("\n\n") if block.startswith("| key"))
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(DIFFERENCES), rows
    for d in DIFFERENCES:
        assert any(row.startswith(f"| `{d.key}` | {d.where} |") for row in rows), f"docs/defaults.md lacks {d.key} ({d.where})"
        for family, stage, prior in d.scope:
            system = next(s for s, f in FAMILY.items() if f == family)
            assert stage in ours(system, prior), (d.key, family, stage)
    assert "docs/defaults.md" in (ROOT / "README.md").read_text()


def test_no_built_in_prior_setting_reaches_a_real_prior(tmp_path):
    """Without conf/tuned/* and conf/prior/builtin.yaml the real priors compose to the same configs:
    nothing of the built-in prior's CPU tunings is in them."""
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    for path in [*(conf / "tuned").glob("*.yaml"), conf / "prior" / "builtin.yaml", conf / "experiment" / "demo.yaml"]:
        path.unlink()
    combos = [(system, prior) for system in FAMILY for prior in PRIORS]
    with initialize_config_dir(str(conf), version_base="1.3"):
        bare = {c: OmegaConf.to_yaml(compose("config", overrides=["prompt=x", f"system={c[0]}", f"prior={c[1]}"]))
                for c in combos}
    for (system, prior), text in bare.items():
        cfg = compose_cfg(["prompt=x", f"system={system}", f"prior={prior}"])
        assert OmegaConf.to_yaml(cfg) == text, (system, prior)
        assert cfg.system.prompt_processor.get("view_sectors", 4) == 4 and cfg.guidance.view_guidance_scale is None


def test_16_mixed_runs_in_32_true_on_a_cpu_and_says_why(caplog):
    from text23d.run import trainer_precision

    with caplog.at_level(logging.INFO, logger="text23d"):
        assert trainer_precision({"precision": "16-mixed", "accelerator": "cpu"}) == "32-true"
    assert "16-mixed runs fp16 autocast on CUDA only" in caplog.text and "32-true" in caplog.text
    assert trainer_precision({"precision": "bf16-mixed", "accelerator": "cpu"}) == "bf16-mixed"  # asked for
    assert trainer_precision({"precision": "32-true", "accelerator": "cpu"}) == "32-true"
    import torch

    if not torch.cuda.is_available():
        assert trainer_precision({"precision": "16-mixed", "accelerator": "auto"}) == "32-true"
