"""DeepFloyd IF stage I: a tiny IF-shaped folder (IF's real config keys, T5 + sentencepiece) through the
ordinary loader, and DreamFusion (SDS) and ProlificDreamer (VSD) runs on it end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from helpers import compose_cfg
from text23d.errors import PriorLoadError
from text23d.prior.loading import load_prior
from text23d.run import run
from text23d.testing import build_tiny_if_model


@pytest.fixture(scope="module")
def tiny_if_model(tmp_path_factory):
    return build_tiny_if_model(tmp_path_factory.mktemp("tiny_if"))


def test_if_folder_has_ifs_layout(tiny_if_model):
    index = json.loads((tiny_if_model / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline" and "vae" not in index
    assert index["safety_checker"] == ["deepfloyd_if", "IFSafetyChecker"]  # skipped by the loader
    assert sorted(p.name for p in (tiny_if_model / "tokenizer").iterdir()) == [
        "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]  # no tokenizer.json, as IF
    unet = json.loads((tiny_if_model / "unet" / "config.json").read_text())
    assert (unet["addition_embed_type"], unet["resnet_time_scale_shift"], unet["out_channels"]) == ("text", "scale_shift", 6)
    scheduler = json.loads((tiny_if_model / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["variance_type"], scheduler["sample_max_value"]) == (
        "squaredcos_cap_v2", "learned_range", 1.5)


def test_tiny_if_model_is_deterministic(tiny_if_model, tmp_path):
    again = build_tiny_if_model(tmp_path / "again")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(tiny_if_model / part)), load_file(str(again / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (tiny_if_model / "tokenizer/spiece.model").read_bytes() == (again / "tokenizer/spiece.model").read_bytes()


def test_load_if(tiny_if_model):
    prior = load_prior(str(tiny_if_model), latent="auto")
    assert not prior.latent and prior.vae is None
    assert (prior.resolution, prior.channels, prior.prediction_type) == (16, 3, "epsilon")
    assert prior.unet.config.out_channels == 6 and prior.unet.config.addition_embed_type == "text"
    # The cosine schedule: ᾱ falls from ~1 to ~0 (SD's scaled-linear schedule ends at 0.0047).
    assert prior.alphas_cumprod[0] > 0.999 and prior.alphas_cumprod[-1] < 1e-4
    emb = prior.encode_text(["a red cube, front view", ""])  # (2, 77, 32): IF's 77 T5 tokens
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    tokenizer, encoder = prior._tokenizer, prior._text_encoder
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red cube front view").input_ids) == [
        "▁a", "▁red", "▁cube", "▁front", "▁view", "</s>"]
    # T5 is run with its padding mask: the padded positions do not change the real ones.
    batch = tokenizer(["a red cube, front view"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        masked = encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
        unmasked = encoder(batch.input_ids)[0]
    assert torch.equal(emb[0], masked[0]) and not torch.allclose(emb[0], unmasked[0])
    # ε is the first 3 of the 6 output channels (the other 3 are the learned variance).
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([20, 700])
    with torch.no_grad():
        full = prior.unet(x_t, t, encoder_hidden_states=emb).sample
        eps = prior.predict_noise(x_t, t, emb)
    assert full.shape == (2, 6, 16, 16) and torch.equal(eps, full[:, :3])


def test_sdxl_style_conditioning_still_refused(tmp_path, tiny_pixel_model):
    folder = shutil.copytree(tiny_pixel_model, tmp_path / "model")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(  # SDXL's extra inputs: pooled text embeddings and image-size ids
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ).save_pretrained(folder / "unet")
    with pytest.raises(PriorLoadError, match="addition_embed_type='text_time'.*allowed: \\(None, 'text'\\)"):
        load_prior(str(folder))


# --- end to end: the real run() with debug=smoke, as tests/test_run.py and tests/test_vsd_run.py --------


def if_cfg(model, out, *extra):
    return compose_cfg(["prompt=a red cube", "prior=deepfloyd_if", f"prior.pretrained_model_name_or_path={model}",
                        "prior.resolution=null", "guidance.guidance_scale=20", "debug=smoke", f"output_dir={out}",
                        "trainer.enable_progress_bar=false", *extra])


def test_dreamfusion_on_if_from_the_command_line(tiny_if_model, tmp_path):
    text23d = str(Path(sys.executable).parent / "text23d")
    args = [text23d, "prompt=a red cube", "system=dreamfusion", "prior=deepfloyd_if",
            f"prior.pretrained_model_name_or_path={tiny_if_model}", "prior.resolution=null",
            "guidance.guidance_scale=20", "debug=smoke", "geometry=grid", "geometry.resolution=16",
            f"output_root={tmp_path}", "trainer.enable_progress_bar=false"]
    p = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    [out] = list((tmp_path / "dreamfusion").iterdir())
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and s["system"] == "dreamfusion" and s["final_loss"] is not None
    assert Path(s["artifacts"]["video"]).is_file() and Path(s["artifacts"]["mesh_obj"]).is_file()
    state = torch.load(out / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    assert torch.isfinite(state["stages.0.particles.0.geometry.density_grid"]).all()
    # The run log says what precision the prior was loaded in, and why.
    log = (out / "text23d.log").read_text()
    assert f"prior {tiny_if_model}: float32 weights (prior.dtype=auto on cpu" in log


def test_prolificdreamer_on_if(tiny_if_model, tmp_path):
    before = load_file(str(tiny_if_model / "unet" / "diffusion_pytorch_model.safetensors"))
    s = run(if_cfg(tiny_if_model, tmp_path / "run", "system=vsd", "system.stages=[nerf]", "geometry=grid",
                   "geometry.resolution=16", "trainer.max_steps=6", "guidance.lora_lr=1e-2"))
    assert s["steps"] == 6 and s["system"] == "prolificdreamer"
    lora = load_file(s["artifacts"]["lora"])
    # The adapters sit on IF's SimpleCrossAttn attention (to_q/to_k/to_v/to_out.0) and trained; the
    # camera MLP went into the free class-embedding slot next to IF's pooled-text embedding.
    moved = {k for k, v in lora.items() if v.abs().sum() > 0 and ("lora_B" in k or "class_embedding" in k)}
    assert any("attentions.0.to_q.lora_B" in k for k in moved), sorted(lora)[:5]
    assert any("mid_block.attentions.0" in k for k in moved) and any("class_embedding" in k for k in moved)
    after = load_file(str(tiny_if_model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the prior on disk is untouched
