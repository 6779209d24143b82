"""The camera-conditioned LoRA score model ε̂_φ(x_t; y, t, c) of ProlificDreamer (Wang et al. 2023,
arXiv:2305.16213, §3.2 and eq. 10).

VSD needs the score of the distribution of the *current renders*, not of natural images. It is
estimated by a copy of the prior's U-Net with small trainable LoRA adapters on its attention
projections plus a camera embedding (the flattened 4×4 camera-to-world matrix → MLP, added to the
timestep embedding), trained with the ordinary diffusion loss on the detached renders (eq. 10).

Three things are guaranteed here, and tested:
  * the prior's own U-Net is never touched: the base is deep-copied, adapters go on the copy;
  * an untrained model equals its base exactly: LoRA's B matrices start at zero (peft default) and
    the camera MLP's last layer starts at zero, so VSD starts from "ε̂_pretrained − ε̂_base";
  * the trainable weights (LoRA + camera MLP) are float32 even when the base is fp16/bf16.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from text23d.errors import CheckpointError, ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "text23d-camera-lora-1"  # written into the safetensors metadata; checked on load


class CameraLoRAUNet(nn.Module):
    """A LoRA + camera-embedding copy of a diffusers UNet2DConditionModel.

    The base weights are frozen; `trainable_parameters()` are the only ones an optimizer should see.
    """

    def __init__(
        self,
        unet,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        rank: int = 4,
        alpha: float | None = None,
        target_modules=DEFAULT_TARGET_MODULES,
        camera_dim: int = 16,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"LoRA base prediction_type={prediction_type!r} is not supported: use one of "
                f"{PREDICTION_TYPES} (from the model's scheduler_config.json)."
            )
        if alpha is not None and not alpha > 0:
            raise ConfigError(f"lora alpha={alpha!r} must be > 0, or null to use the rank (scale 1).")
        if not (isinstance(camera_dim, int) and camera_dim >= 1):
            raise ConfigError(f"camera_dim={camera_dim!r} must be a positive integer (16 for a 4×4 pose).")
        config = unet.config
        if getattr(unet, "class_embedding", None) is not None or config.get("class_embeddings_concat"):
            raise ConfigError(
                f"the LoRA base UNet already uses class conditioning (class_embed_type="
                f"{config.get('class_embed_type')!r}, num_class_embeds={config.get('num_class_embeds')!r}); "
                "the camera embedding needs its free class_embedding slot. Fix: use a text-to-image "
                "UNet without class labels (SD 1.x/2.x, a pixel model) as the LoRA base."
            )
        self.prediction_type = prediction_type
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.target_modules = tuple(target_modules)
        self.camera_dim = camera_dim

        # A private copy: the prior's U-Net keeps its weights, modules and (absent) adapters.
        unet = copy.deepcopy(unet).requires_grad_(False).eval()
        self.base_dtype = unet.dtype
        self.channels = unet.config.in_channels
        device = unet.device
        self._add_lora(unet)
        # Camera embedding c ↦ MLP(c) added to the timestep embedding via the UNet's class-label
        # hook: with config.class_embed_type=None, UNet2DConditionModel.forward computes
        # emb = time_embedding(t) + class_embedding(class_labels).to(sample.dtype). The labels are
        # passed as given (no dtype cast), so the MLP stays float32 and receives float32 poses.
        time_embed_dim = unet.time_embedding.linear_2.out_features
        camera_mlp = nn.Sequential(
            nn.Linear(camera_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        nn.init.zeros_(camera_mlp[2].weight)  # zero output ⇒ the untrained model is the base model
        nn.init.zeros_(camera_mlp[2].bias)
        unet.class_embedding = camera_mlp.to(device=device, dtype=torch.float32)
        self.unet = unet
        alphas_cumprod = alphas_cumprod.detach().to(device, torch.float32)  # ᾱ_t (T,) of the base's schedule
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def _add_lora(self, unet) -> None:
        try:  # imported only when VSD is used: SDS runs without peft
            from peft import LoraConfig
        except ImportError as err:
            raise ConfigError(
                f"VSD's LoRA model needs the 'peft' package ({err}). Fix: pip install 'peft>=0.13'"
            ) from err

        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            init_lora_weights=True,  # A: Kaiming-uniform, B: zeros ⇒ ΔW = BA = 0 at the start
        )
        try:
            unet.add_adapter(config)  # diffusers' PeftAdapterMixin → peft.inject_adapter_in_model
        except ValueError as err:
            raise ConfigError(
                f"LoRA target_modules={list(self.target_modules)} could not be attached to the UNet "
                f"({err}). Fix: use module names of the UNet's attention layers, e.g. "
                f"{list(DEFAULT_TARGET_MODULES)}."
            ) from err
        # peft creates the adapters in the base layer's dtype; keep them float32 so small fp16
        # updates are not rounded away (peft casts the layer input to the adapter's dtype).
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    # --- prediction ---------------------------------------------------------------------------

    def _camera_labels(self, c2w: torch.Tensor, batch: int) -> torch.Tensor:
        labels = c2w.reshape(c2w.shape[0], -1).to(self.alphas_cumprod.device, torch.float32)  # (B, 16)
        if labels.shape != (batch, self.camera_dim):
            raise ValueError(
                f"c2w must hold {self.camera_dim} numbers per view for a batch of {batch} "
                f"((B, 4, 4) camera-to-world), got {tuple(c2w.shape)}"
            )
        return labels

    def forward(self, x_t, t, text_emb, c2w) -> torch.Tensor:
        """Raw UNet output (B, C, h, w) in the base dtype; ε / v / x0 per `prediction_type`.

        x_t (B, C, h, w); t (B,) or scalar integer timesteps; text_emb (B, L, D); c2w (B, 4, 4),
        all zeros for "no camera".
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(batch)
        out = self.unet(
            x_t.to(self.base_dtype),
            t,
            encoder_hidden_states=text_emb.to(self.base_dtype),
            class_labels=self._camera_labels(c2w, batch),
        ).sample
        return out[:, : self.channels]  # learned variance (DeepFloyd IF): keep the prediction half

    def predict_noise(self, x_t, t, text_emb, c2w) -> torch.Tensor:
        """ε̂_φ(x_t; y, t, c) as float32 (B, C, h, w), whatever the base was trained to predict.

        Deliberate copy of the conversion in text23d.prior.prior.Prior.predict_noise: the LoRA base
        may be another model than the prior (SD 2.1 768 is v-prediction), with its own schedule.
        """
        out = self(x_t, t, text_emb, c2w).float()
        if self.prediction_type == "epsilon":
            return out
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # ᾱ_t (B, 1, 1, 1)
        x_t = x_t.float()
        if self.prediction_type == "v_prediction":
            # v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0, x_t = sqrt(ᾱ)x0 + sqrt(1−ᾱ)ε  ⇒  ε = sqrt(ᾱ)v + sqrt(1−ᾱ)x_t
            return alpha.sqrt() * out + (1 - alpha).sqrt() * x_t
        return (x_t - alpha.sqrt() * out) / (1 - alpha).sqrt()  # x0-prediction

    # --- training -----------------------------------------------------------------------------

    def diffusion_loss(self, x0, text_emb, c2w, camera_drop_prob: float = 0.1) -> torch.Tensor:
        """The standard denoising loss on (detached) renders x0 (B, C, h, w) in model space (eq. 10).

        Draws, in this order, from torch's global CPU RNG: t ~ U{0, T−1} (B,), ε ~ N(0, I) like x0,
        u ~ U[0, 1) (B,); a view's camera is replaced by zeros ("no camera") where u < camera_drop_prob,
        so the model also learns the camera-free score used by LoRA classifier-free guidance.
        """
        if not 0 <= camera_drop_prob <= 1:
            raise ConfigError(
                f"camera_drop_prob={camera_drop_prob} must be in [0, 1]. Fix: camera_drop_prob=0.1"
            )
        x0 = x0.detach().float()
        batch, device = x0.shape[0], x0.device
        t = torch.randint(0, self.alphas_cumprod.shape[0], (batch,)).to(device)
        noise = torch.randn(x0.shape).to(device)  # CPU RNG: same draw on every device
        drop = (torch.rand(batch) < camera_drop_prob).to(device)
        c2w = self._camera_labels(c2w, batch)
        c2w = torch.where(drop[:, None], torch.zeros_like(c2w), c2w)
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # ᾱ_t (B, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        else:
            target = x0
        pred = self(x_t, t, text_emb, c2w).float()
        return F.mse_loss(pred, target)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- state --------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA + camera-MLP weights only (a few MB for SD), detached copies; the base is not saved."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"LoRA weights do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Fix: load weights saved for "
                "the same LoRA base model and target_modules."
            )
        for name, param in own.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"LoRA weight {name} has shape {tuple(state[name].shape)}, this model needs "
                    f"{tuple(param.shape)}. Fix: use the same lora_rank and LoRA base model as when saving."
                )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])

    def save_safetensors(self, path, metadata: dict[str, str] | None = None) -> None:
        """Trainable weights + string metadata, written atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        metadata = dict(metadata or {})
        bad = {str(k): type(v).__name__ for k, v in metadata.items()
               if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; not str: {bad}")
        meta = {
            "rank": str(self.rank),
            "alpha": str(self.alpha),
            "target_modules": json.dumps(list(self.target_modules)),
            "camera_dim": str(self.camera_dim),
            "prediction_type": self.prediction_type,
            **metadata,
            "format": FORMAT,  # last: a caller's key of the same name cannot make the file unloadable
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tensors = {k: v.cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)


def load_lora_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on CPU, metadata) of a file written by `CameraLoRAUNet.save_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA weights file '{path}' does not exist. Fix: check the path.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise CheckpointError(
            f"LoRA weights file '{path}' is not a readable safetensors file ({type(err).__name__}: {err}). "
            "Fix: the file is truncated or of another format; save it again."
        ) from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a text23d camera-LoRA file (format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}). Fix: pass a file written by CameraLoRAUNet.save_safetensors."
        )
    return state, metadata
