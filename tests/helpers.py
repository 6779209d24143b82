"""Helpers shared by tests."""
import lightning as L

from text23d.config import compose as compose_cfg  # noqa: F401  the config the CLI would build


class Crash(L.Callback):
    """Simulates a crash (power cut, OOM kill) at the start of a given step."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def text_pair(prior, batch):
    """(cond, uncond) text embeddings (batch, L, D) of "a red cube" and ""."""
    emb = prior.encode_text(["a red cube", ""])  # (2, L, D)
    return emb[:1].expand(batch, -1, -1), emb[1:].expand(batch, -1, -1)


def cams_of(c2w):
    """A camera batch with these c2w poses (B, 4, 4); the other fields are placeholders (VSD reads
    only the poses)."""
    import torch

    from text23d.cameras.sampler import Cameras

    n = len(c2w)
    return Cameras(c2w, torch.full((n,), 0.7), torch.zeros(n), torch.zeros(n), torch.full((n,), 2.0), torch.zeros(n, 3))


# --- float32 tolerances ---------------------------------------------------------------------------
# Two float32 evaluations of one network that batch or thread it differently (the guidance's single
# [cond; uncond] U-Net call against a reference's two calls; 5 prompts encoded together against 3)
# add their terms in another order. Each sum is then exact only to a few units of roundoff
# (2^-24 ≈ 6e-8) of its largest term, and the layers compound that: we measured up to 1.2e-6 of
# max|ε| for the tiny U-Nets here (AMD, 1 and 2 threads), and 1.3e-6 was seen on an Intel CPU.
# NET_RTOL = 1e-4 of the output's scale leaves ~80× that margin and is still far below the O(1)
# relative error of a wrong formula; the parity tests also check that a wrong variant fails.
NET_RTOL = 1e-4


def cfg_amplification(scale: float) -> float:
    """ε_u + s·(ε_c − ε_u) = (1 − s)·ε_u + s·ε_c: rounding in either prediction is multiplied by up
    to |1 − s| + |s| (14 at CFG 7.5, 199 at CFG 100)."""
    return abs(1 - scale) + abs(scale)


def assert_grad_close(actual, expected, tol: float, wrong=None):
    """max |actual − expected| ≤ tol; and, if given, a wrongly computed gradient is *not* within
    10·tol of the actual one, so the tolerance cannot hide a formula error."""
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"
    if wrong is not None:
        off = (actual - wrong).abs().max().item()
        assert off > 10 * tol, f"a wrong formula is only {off:.3g} away (tolerance {tol:.3g}): the test is too loose"


def text_close(a, b) -> bool:
    """Text embeddings of the same prompt encoded in batches of different sizes."""
    import torch

    return torch.allclose(a, b, rtol=0, atol=NET_RTOL * max(a.abs().max().item(), 1e-12))


def assert_export_shows_the_renders(run_dir, mesh_file, particle: int = 0) -> dict:
    """The exported file a user takes away shows what the run's last stage renders: silhouettes that
    agree with the renders up to their one-pixel outline, colours within `colour_tolerance` (half the
    distance between the two nearest named colours)."""
    from text23d.builtin.evaluate import colour_tolerance, export_agreement
    from text23d.run import load_system

    system, _, _ = load_system(run_dir)
    r = export_agreement(system, mesh_file, particle=particle)
    assert r["iou"] >= r["iou_floor"] and r["colour_error"] < colour_tolerance(), r
    return r


def check_settings(cls, **settings):
    """`settings` for a part of class `cls`, through the part's schema, as the CLI checks a composed
    config (text23d/schema/): constructors trust their arguments, so a bad value is refused here."""
    from text23d.schema import check_part

    where = {"guidance": "guidance", "geometry": "geometry", "renderers": "renderer", "cameras": "camera",
             "prompts": "system.prompt_processor"}[cls.__module__.split(".")[1]]
    check_part({"_target_": f"{cls.__module__}.{cls.__name__}", **settings}, where)
