"""The kernels under a training step, each timed against a reference in the same process (these
machines are noisy; a ratio to a neighbour measured a moment earlier is not): scripts/bench.py's
`hash-encoding*` and `unet-builtin*` rows.

  hash-encoding   the torch hash encoding (tcnn's default grid: 16 levels × 2 features, 2^19 rows)
                  forward + backward on the points of one built-in SDS step (4 views × 32² rays ×
                  48 samples), against a 4-channel 64³ `grid_sample` on the same points (the dense
                  grid's work) and the per-level implementation it replaced (text23d.testing).
  unet-builtin    the built-in prior's U-Net forward on one step's batch (3 guidance branches × 4
                  views), its FLOPs counted by torch's FlopCounterMode, against a square matrix
                  product's FLOP/s measured in the same process and dtype.
On CUDA each also runs in float16 and bfloat16, with torch.compile off and on.
"""
from __future__ import annotations

import time

import torch


def best_of(fn, repeats: int = 5, device: str = "cpu") -> float:
    """The fastest of `repeats` calls after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_seconds(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds and FLOP/s of an n³ matrix product (n = 1024 on the CPU, 8192 on CUDA): the machine's reference."""
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_of(lambda: a @ b, device=device)
    return seconds, 2 * n**3 / seconds


def ray_points(device: str) -> torch.Tensor:
    """u in [0, 1]³ of 4096 rays × 48 samples through a ball, as one built-in SDS step samples."""
    g = torch.Generator().manual_seed(0)
    origin = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=-1) * 2.5
    target = (torch.rand(4, 1024, 3, generator=g) - 0.5) * 0.8
    d = torch.nn.functional.normalize(target - origin[:, None], dim=-1).reshape(-1, 3)
    o = origin.repeat_interleave(1024, 0)
    t = 2.5 + (torch.arange(48) + 0.5) / 48 * 2 - 1  # 48 samples across the unit ball
    x = o[:, None] + d[:, None] * t[None, :, None]
    return ((x.reshape(-1, 3).clamp(-1, 1) + 1) / 2).to(device)


def bench_hash_encoding(device: str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False) -> dict:
    from text23d.geometry.hashgrid import HashEncoding
    from text23d.testing import loop_hash_encoding

    u = ray_points(device).to(dtype)
    enc = HashEncoding().to(device)
    encode = torch.compile(enc) if compiled else enc
    grid = torch.zeros(1, 4, 64, 64, 64, device=device, dtype=dtype, requires_grad=True)

    def batched():
        enc.params.grad = None
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            encode(u).float().sum().backward()

    def per_level():
        enc.params.grad = None
        loop_hash_encoding(enc.params, u.float(), enc.levels, enc.n_features).sum().backward()

    def dense():
        grid.grad = None
        torch.nn.functional.grid_sample(grid, (u * 2 - 1).view(1, 1, 1, -1, 3), align_corners=True).float().sum().backward()

    hashed, sampled = best_of(batched, device=device), best_of(dense, device=device)
    out = {"points": len(u), "levels": len(enc.levels), "features": enc.n_features, "dtype": str(dtype)[6:],
           "compiled": compiled, "encoding_s": round(hashed, 4), "grid_sample_s": round(sampled, 4),
           "ratio_to_grid_sample": round(hashed / sampled, 2)}
    if not compiled and dtype == torch.float32:
        looped = best_of(per_level, repeats=3, device=device)
        out.update(per_level_s=round(looped, 4), speedup_over_per_level=round(looped / hashed, 2))
    return out


def bench_unet(device: str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False) -> dict:
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from text23d.config import compose
    from text23d.prior.loading import load_prior

    cfg = compose(["prompt=a red cube", "prior=builtin", "output_dir=unused"])
    prior = load_prior(**{**OmegaConf.to_container(cfg.prior, resolve=True), "dtype": str(dtype)[6:]}, device=device)
    unet = torch.compile(prior.unet) if compiled else prior.unet
    g = torch.Generator().manual_seed(0)
    batch = 3 * cfg.system.batch_size  # cond, uncond and the prompt without view words, per view
    x = torch.randn(batch, prior.channels, prior.resolution, prior.resolution, generator=g).to(device, dtype)
    t = torch.randint(0, prior.num_train_timesteps, (batch,), generator=g).to(device)
    text = prior.encode_text(["a red cube"]).expand(batch, -1, -1).to(dtype)

    def forward():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    with FlopCounterMode(display=False) as counter:
        prior.unet(x, t, encoder_hidden_states=text)
    flops = counter.get_total_flops()
    seconds, peak = best_of(forward, device=device), matmul_seconds(device, dtype)[1]
    return {"batch": batch, "resolution": prior.resolution, "dtype": str(dtype)[6:], "compiled": compiled,
            "gflop": round(flops / 1e9, 3), "forward_s": round(seconds, 4),
            "gflop_per_s": round(flops / seconds / 1e9, 1), "matmul_gflop_per_s": round(peak / 1e9, 1),
            "fraction_of_matmul": round(flops / seconds / peak, 3)}
