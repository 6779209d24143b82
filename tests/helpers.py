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
