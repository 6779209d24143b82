"""Train the built-in prior from scratch: a 32×32 pixel-space text-to-image diffusion model.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_prior.py --out text23d/builtin/model --steps N
    .venv/bin/python scripts/train_prior.py --quick       # ~1-minute smoke run into a temp folder

Renders the procedural data set (text23d.builtin.data: "a red cone, side view" and friends), trains a
CLIP-style text encoder and a conditional UNet jointly with the DDPM ε-loss (Ho et al. 2020, eq. 14),
and writes a diffusers folder that text23d.prior.loading.load_prior reads like any other model:
model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, plus a model card (README.md) and a
sample grid (samples.png). Everything is seeded; the data are identical on CPU and CUDA.
"""

from __future__ import annotations

import os

# Must precede the first torch import (libgomp reads it once). With the default (spinning) policy a
# 2-thread step took 4–20 s instead of ~1.6 s whenever another process held one of the two cores;
# PASSIVE threads sleep at barriers: ~2.9 s under that load, no slower on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402  (imports after the environment setting above)
import copy
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from text23d.builtin.data import (COLOURS, DIRECTIONS, HELD_OUT, ROTATION_RANGE, SHAPES, SUFFIX_PROBABILITY, caption,
                                  make_dataset, vocabulary, write_vocabulary)
from text23d.builtin.tokenizer import write_word_tokenizer

RESOLUTION = 32
MAX_TOKENS = 16  # "a yellow cylinder, overhead view" is 8 tokens with start/end
PAIRS = [(s, c) for s in SHAPES for c in COLOURS]  # rows of samples.png: shapes; columns: colours
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "text23d" / "builtin" / "model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help=f"model folder to write (default {DEFAULT_OUT}; a temp folder with --quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=64000, help="training images to render")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps (reproducible weights; the shipped model's count is in its card)")
    p.add_argument("--minutes", type=float, default=None,
                   help="or: train for this many wall-clock minutes (data rendering not included)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant after warm-up: the first k steps of any run are the run of k steps, so "
                        "a probe (--probe-every) is exactly what --steps k reproduces")
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction",
                   help="v (Salimans & Ho 2022) stays well-conditioned at every noise level of the cosine "
                        "schedule; ε-prediction's x0 estimate blows up near t = T, where sampling starts")
    p.add_argument("--snr-gamma", type=float, default=0.0,
                   help="Min-SNR-γ loss weighting (Hang et al. 2023); 0: off. Off by default: with v-prediction it "
                        "weighs the noisiest steps, where only the caption says what to draw, by SNR ≈ 0, and a prior "
                        "trained so ignored its view words (measured), which score distillation depends on")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every N steps, sample with the EMA weights, judge the samples and save them beside --out")
    p.add_argument("--eval-samples", type=int, default=4, help="DDIM samples per (shape, colour) pair judged at the end")
    p.add_argument("--judge-only", type=Path, default=None, metavar="FOLDER",
                   help="train nothing: sample an existing model folder, judge the samples, print the rates")
    p.add_argument("--from-probe", type=Path, default=None, metavar="FOLDER",
                   help="finish from a probe of a run made with these same flags (its weights at step k are those of "
                        "--steps k): judge, write the samples and the card, and swap it into --out, without retraining")
    p.add_argument("--log", type=Path, default=None,
                   help="with --from-probe: that run's printed log, for the card's loss history and times")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help='fraction of captions replaced by "" (the unconditional branch of CFG)')
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for samples.png")
    p.add_argument("--guidance-scale", type=float, default=1.5,
                   help="CFG scale of the judged samples and samples.png (a small model's samples degrade at high CFG)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256 images, 20 steps, batch 8, 5 sampling steps")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.batch_size, args.warmup = 256, 20, 8, 5
        args.sample_steps, args.log_every, args.eval_samples = 5, 5, 1
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="text23d_prior_quick_"))
    args.out = Path(args.out or DEFAULT_OUT)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps={args.steps}: must be >= 1")
    if args.judge_only is not None:
        return args
    if args.from_probe is not None:
        if not (args.from_probe / "unet").is_dir():
            p.error(f"--from-probe={args.from_probe}: not a probe folder (no unet/); probes are written to "
                    f"<out>.probes/stepNNNNNN by --probe-every")
        args.steps = int(args.from_probe.name.removeprefix("step"))
        args.minutes = None
        return args
    if (args.steps is None) == (args.minutes is None):
        p.error("pass exactly one of --steps N (reproducible) and --minutes M")
    if args.minutes is not None and not args.minutes > 0:
        p.error(f"--minutes={args.minutes}: must be > 0")
    if args.images < args.batch_size:
        p.error(f"--images={args.images} is smaller than --batch-size={args.batch_size}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


# --- the model ----------------------------------------------------------------------------------


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 96),  # 32² → 16² → 8²
        # One ResNet per level: at 2 the UNet has 3.6 M parameters and each CPU step is ~30% slower;
        # on a 32-minute CPU budget more steps beat more depth.
        layers_per_block=1,
        # Cross-attention only at 8×8 and in the mid block: at 16×16 it costs 4× the step time.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers reads this as the number of heads (a historical naming quirk)
        norm_num_groups=32,
    )


def build_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    # The cosine schedule (Nichol & Dhariwal 2021) keeps more steps at useful noise levels than the
    # linear one at 32×32, where linear destroys the image too early.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=True)


class EMA:
    """Exponential moving average of parameters; its copy of the model is what gets saved."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # Warm-up (1+n)/(10+n): a short run would otherwise average mostly the random initialisation
        # (decay 0.999 has a 1000-step memory); early on this keeps ~the last 10% of steps.
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.module.parameters(), module.parameters()):
            ema.lerp_(p, 1 - decay)


# --- training -------------------------------------------------------------------------------------


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warm-up, then constant, or cosine decay to 5% over `progress` ∈ [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if args.lr_schedule == "constant":
        return args.lr * warm
    return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor,
                   prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """MSE to the v or ε target, per sample weighted by Min-SNR-γ: with SNR = ᾱ/(1 − ᾱ), the
    weight min(SNR, γ)/(SNR + 1) for v (min(SNR, γ)/SNR for ε) keeps the nearly clean timesteps
    from dominating the gradient (Hang et al. 2023, eq. 9 and its v form)."""
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
    mse = ((pred.float() - target) ** 2).mean((1, 2, 3))  # (B,)
    if snr_gamma <= 0:
        return mse.mean()
    snr = (a / (1 - a)).view(-1)
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    return (weight * mse).mean()


def encode_captions(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (N, MAX_TOKENS), padded exactly as Prior.encode_text pads them at inference."""
    unique = sorted(set(captions) | {""})
    ids = tokenizer(unique, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    row = {text: i for i, text in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])]


def draw_batch(data: torch.Tensor, token_ids: torch.Tensor, uncond_ids: torch.Tensor, b: int,
               dropout: float, num_timesteps: int, gen: torch.Generator):
    """One batch drawn on the CPU from `gen`: x0 (B, 3, 32, 32) in [-1, 1], ids (B, L), t (B,), ε like x0."""
    idx = torch.randint(len(data), (b,), generator=gen)
    x0 = data[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
    # No horizontal flips: mirroring maps azimuth a to −a, which turns a "front right" view into a
    # "front left" one, so the caption would no longer be true.
    ids = token_ids[idx].clone()
    ids[torch.rand(b, generator=gen) < dropout] = uncond_ids  # "" trains the unconditional branch
    t = torch.randint(0, num_timesteps, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, ids, t, noise


def train(args, images: np.ndarray, token_ids: torch.Tensor, uncond_ids: torch.Tensor,
          unet, text_encoder, scheduler, device, probe=None) -> dict:
    """The training loop. Returns the EMA modules and a summary (steps, losses, times).
    `probe(step, ema_unet, ema_text)` is called every --probe-every steps."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, args.ema_decay), EMA(text_encoder, args.ema_decay)
    alphas = scheduler.alphas_cumprod.to(device)  # ᾱ_t (T,)
    data = torch.from_numpy(images)  # (N, 32, 32, 3) uint8, kept on the CPU
    # One CPU generator for every training draw: the same batches on CPU and CUDA.
    gen = torch.Generator().manual_seed(args.seed + 1)
    budget = None if args.steps is not None else args.minutes * 60.0
    smooth, history, start, step = 0.0, [], time.time(), 0
    unet.train(), text_encoder.train()
    while True:
        elapsed = time.time() - start
        if (args.steps is not None and step >= args.steps) or (budget is not None and elapsed >= budget):
            break
        # --minutes: the schedule follows the wall clock, so the run ends on time even when the
        # machine is shared and the step rate changes; --steps N makes it step-based and repeatable.
        progress = step / args.steps if args.steps is not None else elapsed / budget
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = draw_batch(data, token_ids, uncond_ids, args.batch_size, args.caption_dropout,
                           scheduler.config.num_train_timesteps, gen)
        x0, ids, t, noise = (v.to(device) for v in batch)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # forward process q(x_t | x_0)
        emb = text_encoder(ids)[0]  # (B, L, 64)
        pred = unet(x_t, t, encoder_hidden_states=emb).sample
        loss = diffusion_loss(pred, x0, noise, a, args.prediction_type, args.snr_gamma)
        if not torch.isfinite(loss):
            raise SystemExit(f"loss became {loss.item()} at step {step}; lower --lr (now {args.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)

        step += 1
        value = loss.item()
        smooth = 0.98 * smooth + 0.02 * value
        smoothed = smooth / (1 - 0.98**step)  # bias-corrected, as Adam does, so early values are fair
        if step % args.log_every == 0 or step == 1:
            elapsed = time.time() - start
            history.append((step, smoothed))
            print(f"step {step:6d}  loss {value:.4f}  smoothed {smoothed:.4f}  lr {lr:.2e}  "
                  f"{elapsed / step:.2f} s/step  {elapsed / 60:.1f} min", flush=True)
        if probe is not None and args.probe_every and step % args.probe_every == 0:
            probe(step, ema_unet.module, ema_text.module)
            unet.train(), text_encoder.train()
    wall = time.time() - start
    return {"unet": ema_unet.module, "text_encoder": ema_text.module, "steps": step,
            "final_loss": smooth / (1 - 0.98**max(step, 1)), "train_seconds": wall, "history": history}


# --- samples and the model card -------------------------------------------------------------------


@torch.no_grad()
def sample(unet, text_encoder, tokenizer, scheduler, device, captions: list[str], steps: int,
           guidance: float, seed: int, batch: int = 192) -> np.ndarray:
    """DDIM samples with classifier-free guidance, one per caption: uint8 (N, 32, 32, 3)."""
    unet.eval(), text_encoder.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)  # same betas and prediction type
    ddim.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), 3, RESOLUTION, RESOLUTION, generator=gen)
    out = []
    for start in range(0, len(captions), batch):
        ids = encode_captions(tokenizer, captions[start:start + batch] + [""]).to(device)
        emb = text_encoder(ids)[0]  # (b+1, L, D)
        cond, uncond = emb[:-1], emb[-1:].expand(len(ids) - 1, -1, -1)
        x = noise[start:start + batch].to(device)
        for t in ddim.timesteps:
            pred_u, pred_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])
                                  ).sample.chunk(2)
            x = ddim.step(pred_u + guidance * (pred_c - pred_u), t, x).prev_sample  # CFG, then a DDIM step
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def eval_captions(pairs: list[tuple[str, str]]) -> list[str]:
    """Captions as the training data and score distillation use them: with a view, the i-th sample
    of the list seen from the i-th of the 8 azimuth sectors (so each pair is seen from several)."""
    views = [d for d in DIRECTIONS if d != "overhead"]
    return [caption(s, c, views[i % len(views)]) for i, (s, c) in enumerate(pairs)]


def judge_samples(images: np.ndarray, pairs: list[tuple[str, str]], judge) -> dict:
    """Fraction of samples whose shape, colour, and both, the 2D judge reads as their caption's;
    over all pairs, the held-out ones and the seen ones."""
    shapes, colours = judge.predict(images)
    held = set(HELD_OUT)
    rows = [(s == ps, c == pc, (s, c) in held) for (s, c), ps, pc in zip(pairs, shapes, colours)]

    def rate(sel):
        sel = [r for r in rows if sel(r)]
        return {"n": len(sel), "shape": round(float(np.mean([r[0] for r in sel])), 3),
                "colour": round(float(np.mean([r[1] for r in sel])), 3),
                "both": round(float(np.mean([r[0] and r[1] for r in sel])), 3)} if sel else {}

    return {"all": rate(lambda r: True), "held_out": rate(lambda r: r[2]), "seen": rate(lambda r: not r[2])}


@torch.no_grad()
def view_sensitivity(unet, text_encoder, tokenizer, scheduler, device, n: int = 48) -> dict:
    """Does the prior use its view words? Cubes and pyramids seen face-on (azimuth 0° ± 10°) and
    corner-on (45° ± 10°), noised to t = 0.85-0.95·T, where little of the pose survives in x_t:
    the x0 error with the right view caption against the error with the other one. Score
    distillation relies on this to tell a cube from a barrel. Returns the relative reduction."""
    from text23d.builtin.data import render_primitives
    from text23d.cameras.sampler import Cameras, look_at, spherical_to_position

    unet.eval(), text_encoder.eval()
    gen = torch.Generator().manual_seed(7)
    out = {}
    for shape, colour in (("cube", "blue"), ("pyramid", "red")):
        errors = {}
        for view, centre in (("front", 0.0), ("front right", 45.0)):
            az = centre + (torch.rand(n, generator=gen) - 0.5) * 20
            el, dist = torch.full((n,), 15.0), torch.full((n,), 1.75)
            pos = spherical_to_position(el, az, dist)
            cams = Cameras(look_at(pos), torch.full((n,), math.radians(55.0)), el, az, dist, pos * 0.7)
            x0 = render_primitives([shape] * n, torch.tensor([COLOURS[colour]] * n), cams, 0.52, 0.0, RESOLUTION)
            x0 = (x0.permute(0, 3, 1, 2) * 2 - 1).to(device)
            for said in ("front", "front right"):
                emb = text_encoder(encode_captions(tokenizer, [caption(shape, colour, said)] * n).to(device))[0]
                err = 0.0
                for t in (850, 900, 950):
                    a = scheduler.alphas_cumprod[t].to(device)
                    noise = torch.randn(x0.shape, generator=gen).to(device)
                    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    pred = unet(x_t, torch.full((n,), t, device=device), encoder_hidden_states=emb).sample
                    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * pred if scheduler.config.prediction_type == "v_prediction" \
                        else (x_t - (1 - a).sqrt() * pred) / a.sqrt()
                    err += float(((x0_hat.clamp(-1, 1) - x0) ** 2).mean())
                errors[(view, said)] = err / 3
        right = errors[("front", "front")] + errors[("front right", "front right")]
        wrong = errors[("front", "front right")] + errors[("front right", "front")]
        out[shape] = round((wrong - right) / wrong, 4)
    return out


def sample_grid(tiles: np.ndarray) -> Image.Image:
    """The first sample of each (shape, colour) pair: rows are shapes, columns colours."""
    return _grid_image(PAIRS, tiles)


def _grid_image(pairs, tiles: np.ndarray) -> Image.Image:
    cell, pad, left, top = 64, 6, 64, 18
    cols, rows = len(COLOURS), len(SHAPES)
    grid = Image.new("RGB", (left + cols * (cell + pad), top + rows * (cell + pad) + 14), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for j, colour in enumerate(COLOURS):
        draw.text((left + j * (cell + pad), 2), colour, fill="black", font=font)
    held = set(HELD_OUT)
    for k, ((shape, colour), tile) in enumerate(zip(pairs, tiles)):
        i, j = divmod(k, cols)
        x, y = left + j * (cell + pad), top + i * (cell + pad)
        if j == 0:
            draw.text((2, y + cell // 2 - 6), shape, fill="black", font=font)
        grid.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (x, y))
        if (shape, colour) in held:
            draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=(220, 0, 0), width=3)
    draw.text((2, grid.height - 13), "red frame: held out of training", fill=(220, 0, 0), font=font)
    return grid


def reproducing_argv(args) -> list[str]:
    """This command line, or for --from-probe the training run that makes the same weights: the
    same flags with --steps k in place of --from-probe/--log/--minutes/--steps."""
    if args.from_probe is None:
        return sys.argv
    argv, skip = [], False
    for a in sys.argv:
        if skip:
            skip = False
            continue
        name = a.split("=")[0]
        if name in ("--from-probe", "--log", "--minutes", "--steps", "--probe-every"):
            skip = "=" not in a
            continue
        argv.append(a)
    return argv + ["--steps", str(args.steps)]


def history_from_log(log: Path | None, steps: int) -> tuple[list, float, float, float]:
    """(history [(step, smoothed loss)], final smoothed loss, training seconds, data seconds) up to
    `steps`, read back from a run's printed log (the lines `train` and `main` print)."""
    history, train_s, data_s = [], float("nan"), float("nan")
    for line in (log.read_text().splitlines() if log else []):
        w = line.split()
        if line.startswith("data:") and "in" in w:
            data_s = float(w[w.index("in") + 1])
        elif len(w) >= 12 and w[0] == "step" and w[1].isdigit() and int(w[1]) <= steps:
            history.append((int(w[1]), float(w[5])))  # step N loss L smoothed S lr X T s/step M min
            train_s = float(w[10]) * 60
    return history, (history[-1][1] if history else float("nan")), train_s, data_s


def write_card(folder: Path, args, summary: dict, device, data_seconds: float, n_params: dict, rates: dict) -> None:
    held = ", ".join(f"{c} {s}" for s, c in HELD_OUT)
    history = "\n".join(f"| {s} | {l:.4f} |" for s, l in summary["history"])
    command = "HF_HUB_OFFLINE=1 python " + " ".join(shlex.quote(a) for a in reproducing_argv(args))
    rotation = ("no rotation about z (objects face the front)" if ROTATION_RANGE[0] == ROTATION_RANGE[1] else
                f"rotation about z U[{ROTATION_RANGE[0]:g}°, {ROTATION_RANGE[1]:g}°]")
    weighting = f"Min-SNR-γ weighting with γ = {args.snr_gamma:g}" if args.snr_gamma > 0 else "no Min-SNR weighting"
    card = f"""# text23d built-in prior

A 32×32 pixel-space text-to-image diffusion model trained from scratch by `scripts/train_prior.py`
on procedurally rendered primitives, so that text-to-3D works offline on a CPU and tests can check
that the pipeline makes what was asked. It knows only captions of the form `a {{colour}} {{shape}}`,
optionally followed by a view: `, front view`, `, front right view`, … (8 sectors of 45° of azimuth)
or `, overhead view`.

- Shapes: {", ".join(SHAPES)}
- Colours: {", ".join(COLOURS)}
- Vocabulary (one token per word): {" ".join(vocabulary())}
- Held out of training (never rendered; generating them tests composition): {held}

## Model

| component | details | parameters |
|---|---|---|
| unet | UNet2DConditionModel, 3×32×32, channels (32, 64, 96), 1 ResNet per level, cross-attention at 8×8 and mid | {n_params["unet"]:,} |
| text_encoder | CLIPTextModel, 2 layers, width 64, 4 heads, 16 positions | {n_params["text_encoder"]:,} |
| scheduler | DDPM, 1000 steps, squaredcos_cap_v2, {args.prediction_type} | – |

Weights are the EMA (decay {args.ema_decay}, with warm-up) of both networks, fp32 safetensors.

## Training

- Data: {args.images:,} images rendered in {data_seconds:.0f} s (seed {args.seed}); cameras from
  `RandomCameraSampler` defaults (the SDS training distribution), scale U[0.45, 0.6], {rotation}, the view suffix (8 sectors of 45°:
  "front", "front right", "right", …) on {SUFFIX_PROBABILITY:.0%} of captions; no flips (they would swap left and right).
- Steps: {summary["steps"]:,} at batch {args.batch_size} (AdamW, lr {args.lr:g}, {args.warmup} warm-up
  steps, {args.lr_schedule} schedule; {args.caption_dropout:.0%} caption dropout for classifier-free
  guidance; {args.prediction_type} target, {weighting})
- Final loss (smoothed, weighted): {summary["final_loss"]:.4f}
- Wall time: {summary["train_seconds"] / 60:.1f} min training + {data_seconds / 60:.1f} min data
- Device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, diffusers {diffusers.__version__}
- Command: `{command}`
- Same weights again: `--steps {summary["steps"]}` with the same seed (with the constant schedule the
  first k steps of a longer run are the run of k steps; `--minutes` ends wherever the clock says).

| step | smoothed loss |
|---|---|
{history}

## Samples: can it generate?

`samples.png`: DDIM {args.sample_steps} steps, CFG {args.guidance_scale}, one sample per pair
(rows: shapes, columns: colours), each caption with a view ("a red cube, front right view", the
views cycling through the 8 sectors); held-out pairs framed in red.

{args.eval_samples} samples of each of the 48 captions were judged by `text23d.builtin.judge2d`, a
nearest-neighbour classifier over 4,800 true renders of the data world (shape by object-mask IoU,
colour by mean object colour). On fresh true renders that judge reads the shape right
{rates["judge_on_true_renders"]["shape_accuracy"]:.1%} and the colour {rates["judge_on_true_renders"]["colour_accuracy"]:.1%} of the time.
Fraction of samples it reads as their caption (`samples.json`):

| captions | samples | shape | colour | both |
|---|---|---|---|---|
| all 48 | {rates["all"]["n"]} | {rates["all"]["shape"]:.1%} | {rates["all"]["colour"]:.1%} | {rates["all"]["both"]:.1%} |
| 42 seen | {rates["seen"]["n"]} | {rates["seen"]["shape"]:.1%} | {rates["seen"]["colour"]:.1%} | {rates["seen"]["both"]:.1%} |
| 6 held out | {rates["held_out"]["n"]} | {rates["held_out"]["shape"]:.1%} | {rates["held_out"]["colour"]:.1%} | {rates["held_out"]["both"]:.1%} |

Chance is 1/6 for the shape, 1/8 for the colour.

Does it use its view words? Cubes and pyramids seen face-on and corner-on, noised to t = 0.85–0.95·T,
are denoised with the right and with the wrong view caption (`view_sensitivity` in the script): the
right one lowers the x0 error by {rates["view_sensitivity"]["cube"]:.1%} for cubes and
{rates["view_sensitivity"]["pyramid"]:.1%} for pyramids. Score distillation relies on this to tell a
cube from a barrel.

## Evaluation

(filled in by scripts/eval_prior.py)
"""
    (folder / "README.md").write_text(card, encoding="utf-8")


def save_folder(folder: Path, unet, text_encoder, scheduler) -> None:
    """The diffusers layout load_prior reads; the tokenizer/ files are already in `folder`."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "Text23dPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def replace_folder(staging: Path, out: Path) -> None:
    """Swap the finished folder in, so nobody ever loads a half-written model from `out`."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _progress_printer(t0: float):
    last = [0.0]

    def report(done: int, n: int) -> None:
        if done == n or time.time() - last[0] > 15:  # a line every ~15 s, and at the end
            last[0] = time.time()
            print(f"rendered {done}/{n} images ({time.time() - t0:.0f} s)", flush=True)
    return report


def evaluator(args, tokenizer, scheduler, device):
    """evaluate(unet, text_encoder, per_pair) -> (samples, rates): DDIM samples of every pair,
    per_pair times (the first len(PAIRS) are one of each), judged by the 2D judge."""
    from text23d.builtin.judge2d import ImageJudge

    judge = ImageJudge()

    def evaluate(unet_, text_, per_pair: int) -> tuple[np.ndarray, dict]:
        wanted = PAIRS * per_pair
        images_ = sample(unet_, text_, tokenizer, scheduler, device, eval_captions(wanted),
                         args.sample_steps, args.guidance_scale, seed=args.seed)
        return images_, judge_samples(images_, wanted, judge)
    return evaluate


def load_folder(folder: Path, device):
    """(unet, text encoder, tokenizer, scheduler) of a model folder this script wrote, for sampling."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).eval()
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return unet, text, tokenizer, scheduler


def judge_folder(args, device) -> dict:
    """Sample a saved model folder (this script's or an older one) and judge the samples."""
    folder = args.judge_only
    unet, text, tokenizer, scheduler = load_folder(folder, device)
    _, rates = evaluator(args, tokenizer, scheduler, device)(unet, text, args.eval_samples)
    rates["view_sensitivity"] = view_sensitivity(unet, text, tokenizer, scheduler, device)
    print(json.dumps({"folder": str(folder), "cfg": args.guidance_scale, **rates}), flush=True)
    return rates


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.judge_only is not None:
        judge_folder(args, device)
        return args.judge_only
    if args.from_probe is not None:
        return finish_from_probe(args, device)
    torch.manual_seed(args.seed)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    print(f"device {device}, {torch.get_num_threads()} threads; writing {out}", flush=True)

    # Rendered on the CPU whatever the device: the same bytes everywhere, and it takes ~1 minute.
    t0 = time.time()
    images, captions, _ = make_dataset(args.images, seed=args.seed, held_out=HELD_OUT,
                                       progress=_progress_printer(t0))
    data_seconds = time.time() - t0
    print(f"data: {len(images)} images in {data_seconds:.1f} s ({len(images) / data_seconds:.0f} images/s)",
          flush=True)

    write_word_tokenizer(staging / "tokenizer", vocabulary(), model_max_length=MAX_TOKENS)
    write_vocabulary(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
    token_ids = encode_captions(tokenizer, captions)
    uncond_ids = encode_captions(tokenizer, [""])[0]
    torch.manual_seed(args.seed)  # the initial weights depend on the seed only
    text_encoder, unet = build_text_encoder(tokenizer).to(device), build_unet().to(device)
    scheduler = build_scheduler(args.prediction_type)
    n_params = {name: sum(p.numel() for p in m.parameters())
                for name, m in (("unet", unet), ("text_encoder", text_encoder))}
    print(f"parameters: unet {n_params['unet']:,}, text encoder {n_params['text_encoder']:,}", flush=True)

    evaluate = evaluator(args, tokenizer, scheduler, device)

    def probe(step: int, unet_, text_) -> None:
        """Judge 2 samples a pair and keep the weights, so a good step count can be chosen later."""
        t = time.time()
        folder = out.with_name(out.name + ".probes") / f"step{step:06d}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(staging / "tokenizer", folder / "tokenizer")
        write_vocabulary(folder)
        save_folder(folder, unet_, text_, scheduler)
        images_, rates = evaluate(unet_, text_, 2)
        rates["view_sensitivity"] = view_sensitivity(unet_, text_, tokenizer, scheduler, device)
        sample_grid(images_[:len(PAIRS)]).save(folder / "samples.png")
        (folder / "samples.json").write_text(json.dumps(rates, indent=2))
        print(f"probe step {step}: {json.dumps(rates)} ({time.time() - t:.0f} s)", flush=True)

    summary = train(args, images, token_ids, uncond_ids, unet, text_encoder, scheduler, device, probe)
    print(f"trained {summary['steps']} steps in {summary['train_seconds'] / 60:.1f} min, "
          f"final smoothed loss {summary['final_loss']:.4f}", flush=True)

    save_folder(staging, summary["unet"], summary["text_encoder"], scheduler)
    return finish(args, staging, out, summary, device, data_seconds, n_params, tokenizer, scheduler, evaluate)


def finish(args, staging: Path, out: Path, summary: dict, device, data_seconds: float, n_params: dict,
           tokenizer, scheduler, evaluate) -> Path:
    """Judge the saved model's samples, write samples.png/json and the card, swap it into `out`."""
    from text23d.builtin.judge2d import ImageJudge

    images_, rates = evaluate(summary["unet"], summary["text_encoder"], args.eval_samples)
    rates["judge_on_true_renders"] = ImageJudge().self_test()
    rates["view_sensitivity"] = view_sensitivity(summary["unet"], summary["text_encoder"], tokenizer, scheduler, device)
    print(f"samples: {json.dumps(rates)}", flush=True)
    sample_grid(images_[:len(PAIRS)]).save(staging / "samples.png")
    (staging / "samples.json").write_text(json.dumps(rates, indent=2) + "\n")
    write_card(staging, args, summary, device, data_seconds, n_params, rates)
    replace_folder(staging, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)", flush=True)
    return out


def finish_from_probe(args, device) -> Path:
    """--from-probe: the probe's weights are the run of --steps k (constant schedule after
    warm-up), so judging them and writing the card gives the folder that run would have written."""
    out = args.out.resolve()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(args.from_probe, staging, ignore=shutil.ignore_patterns("samples.*"))
    unet, text, tokenizer, scheduler = load_folder(staging, device)
    history, final_loss, train_s, data_s = history_from_log(args.log, args.steps)
    summary = {"unet": unet, "text_encoder": text, "steps": args.steps, "final_loss": final_loss,
               "train_seconds": train_s, "history": history}
    n_params = {"unet": sum(p.numel() for p in unet.parameters()),
                "text_encoder": sum(p.numel() for p in text.parameters())}
    evaluate = evaluator(args, tokenizer, scheduler, device)
    print(f"finishing {args.from_probe} (step {args.steps}) into {out}", flush=True)
    return finish(args, staging, out, summary, device, data_s, n_params, tokenizer, scheduler, evaluate)

if __name__ == "__main__":
    main()
