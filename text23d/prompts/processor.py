"""View-dependent prompts (DreamFusion §3.2) and an on-disk cache of their text embeddings.

A 2D prior asked for "a hamburger" from every side draws the front every time, which grows faces
on all sides (the Janus problem). Appending the camera's direction — ", front view",
", side view", ", back view", ", overhead view" — tells the prior which side it is looking at.

Embeddings are cached per (prior, text) as safetensors, so a repeated run never loads the text
encoder (for DeepFloyd IF's T5-XXL that saves ~20 GB of memory and a minute of loading).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


DIRECTIONS = ("front", "side", "back", "overhead")  # view_sectors=4: DreamFusion's
# view_sectors=8: a word per 45° of azimuth, centred on the front (0°), right (+90°), back, left.
DIRECTIONS_8 = ("front", "front right", "right", "back right", "back", "back left", "left", "front left", "overhead")




def directions_of(view_sectors: int) -> tuple[str, ...]:
    return DIRECTIONS if view_sectors == 4 else DIRECTIONS_8
# A prior folder may list the only words it was trained on (the built-in prior does); see
# PromptProcessor.check_vocabulary.
VOCABULARY_FILE = "vocabulary.json"
PUNCTUATION = set(",.!?'-:;()\"")
log = logging.getLogger("text23d")


def read_vocabulary(model_dir) -> tuple[set[str], dict[str, str]] | None:
    """(words, aliases) from `<model_dir>/vocabulary.json`, or None when the prior has none."""
    path = Path(model_dir) / VOCABULARY_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return set(data["words"]), dict(data.get("aliases", {}))


def words_of(text: str) -> list[str]:
    """Lower-cased words (letter runs), digit runs, and every other symbol (an emoji) on its own."""
    return re.findall(r"[^\W\d_]+|\d+|\S", text.lower())


class PromptProcessor:
    def __init__(
        self,
        prompt: str,
        negative_prompt: str = "",
        view_dependent: bool = True,
        front_threshold: float = 45.0,
        back_threshold: float = 45.0,
        overhead_threshold: float = 60.0,
        view_sectors: int = 4,
        cache_dir: str | None = None,
    ):
        # Checked against PromptProcessorConfig and RunConfig (text23d/schema/) when the config was composed.
        self.prompt = prompt.strip()
        self.negative_prompt = (negative_prompt or "").strip()
        # What the text encoder reads: the prompts, with a vocabulary's aliases applied (prepare).
        self._encoded_prompt, self._encoded_negative = self.prompt, self.negative_prompt
        self.view_dependent = view_dependent
        self.front_threshold = float(front_threshold)
        self.back_threshold = float(back_threshold)
        self.overhead_threshold = float(overhead_threshold)
        self.view_sectors = view_sectors
        self.views = directions_of(view_sectors)
        self.cache_dir = cache_dir
        self._cond = None  # (directions, L, D): one embedding per direction, in self.views order
        self._uncond = None  # (1, L, D)

    # --- which prompt for which camera ------------------------------------------------------

    def directions(self, elevation_deg, azimuth_deg, **thresholds) -> list[str]:
        """One of self.views per camera; azimuth 0 is the front, angles in degrees. `thresholds`
        (front_threshold, back_threshold, overhead_threshold): a stage's own, else the processor's."""
        return [self.views[i] for i in self._direction_ids(elevation_deg, azimuth_deg, **thresholds).tolist()]

    def prompts_for(self, elevation_deg, azimuth_deg) -> list[str]:
        return [self._texts()[i] for i in self._direction_ids(elevation_deg, azimuth_deg).tolist()]

    def _direction_ids(self, elevation_deg, azimuth_deg, front_threshold=None, back_threshold=None,
                       overhead_threshold=None) -> torch.Tensor:
        elevation = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1).cpu()  # (B,)
        azimuth = torch.as_tensor(azimuth_deg, dtype=torch.float32).reshape(-1).cpu()  # (B,)
        if elevation.shape != azimuth.shape:
            raise ValueError(f"elevation {tuple(elevation.shape)} and azimuth {tuple(azimuth.shape)} differ")
        if not self.view_dependent:
            return torch.zeros_like(azimuth, dtype=torch.long)
        azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0  # wrap to [-180, 180): 190 -> -170
        if self.view_sectors == 8:  # sector k is centred on k·45°: (k·45 − 22.5, k·45 + 22.5]
            ids = torch.remainder(torch.ceil((azimuth - 22.5) / 45.0), 8).long()
        else:
            front = self.front_threshold if front_threshold is None else front_threshold
            back = self.back_threshold if back_threshold is None else back_threshold
            ids = torch.ones_like(azimuth, dtype=torch.long)  # side unless front/back below
            ids[azimuth.abs() <= front] = 0
            ids[azimuth.abs() >= 180.0 - back] = 2
        overhead = self.overhead_threshold if overhead_threshold is None else overhead_threshold
        ids[elevation > overhead] = len(self.views) - 1  # looking down: the azimuth says little
        return ids

    def _texts(self) -> list[str]:
        if not self.view_dependent:
            return [self._encoded_prompt] * len(self.views)
        return [f"{self._encoded_prompt}, {d} view" for d in self.views]

    # --- vocabulary ---------------------------------------------------------------------------

    def check_vocabulary(self, prior) -> list[str]:
        """For a prior that ships vocabulary.json: read its aliases ("an" → "a") into the text that
        is encoded, and warn once, by name, about every word it was never trained on. The run goes
        on (people experiment), but never silently. Returns the unknown words."""
        vocab = read_vocabulary(prior.model_dir)
        if vocab is None:
            return []
        words, aliases = vocab

        def alias(text: str) -> str:
            return re.sub(r"[^\W\d_]+", lambda m: aliases.get(m.group(0).lower(), m.group(0)), text)

        self._encoded_prompt, self._encoded_negative = alias(self.prompt), alias(self.negative_prompt)
        typed = words_of(self.prompt) + words_of(self.negative_prompt)
        unknown = list(dict.fromkeys(w for w in typed if w not in words and w not in aliases
                                     and w not in PUNCTUATION))
        if unknown:
            log.warning("the prior %s was trained on %d words only and does not know %s: those steer the "
                        "run nowhere. It knows: %s (and %s, read as %s).", prior.name, len(words),
                        ", ".join(repr(w) for w in unknown), " ".join(sorted(words)),
                        "/".join(aliases), "/".join(dict.fromkeys(aliases.values())))
        return unknown

    # --- embeddings ---------------------------------------------------------------------------

    def prepare(self, prior) -> None:
        """Load the embeddings from the cache, or compute (and cache) the missing ones."""
        self.check_vocabulary(prior)
        texts = list(dict.fromkeys(self._texts() + [self._encoded_prompt, self._encoded_negative]))
        cache = self._cache_folder()
        found = {text: self._load(cache, prior, text) for text in texts}
        missing = [text for text, emb in found.items() if emb is None]
        if missing:  # only now is the text encoder loaded
            for text, emb in zip(missing, prior.encode_text(missing)):
                found[text] = emb
                self._save(cache, prior, text, emb)
        found = {text: emb.to(prior.device) for text, emb in found.items()}
        self._cond = torch.stack([found[text] for text in self._texts()])  # (directions, L, D)
        self._uncond = found[self._encoded_negative][None]  # (1, L, D)
        self._plain = found[self._encoded_prompt][None]  # (1, L, D): the prompt with no view words

    def __call__(self, elevation_deg, azimuth_deg, **thresholds) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional embeddings, each (B, L, D), for B cameras; `thresholds` as
        in `directions` (ProlificDreamer's stages use 30° or 45° front and back sectors)."""
        if self._cond is None:
            raise RuntimeError("PromptProcessor.prepare(prior) must be called before use")
        ids = self._direction_ids(elevation_deg, azimuth_deg, **thresholds).to(self._cond.device)
        cond = self._cond[ids]  # (B, L, D)
        return cond, self._uncond.expand(len(ids), -1, -1)

    def plain(self, batch: int) -> torch.Tensor:
        """The prompt's embedding without any view words, (B, L, D): what view guidance contrasts
        each view's caption with."""
        if self._cond is None:
            raise RuntimeError("PromptProcessor.prepare(prior) must be called before use")
        return self._plain.expand(batch, -1, -1)

    def _cache_folder(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        root = os.environ.get("TEXT23D_CACHE") or os.path.join("~", ".cache", "text23d")
        return Path(root).expanduser() / "text_embeddings"

    @staticmethod
    def _path(cache: Path, prior, text: str) -> Path:
        key = hashlib.sha256(f"{prior.cache_key}\n{text}".encode()).hexdigest()
        return cache / f"{key}.safetensors"

    def _load(self, cache: Path, prior, text: str) -> torch.Tensor | None:
        path = self._path(cache, prior, text)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["embedding"]  # (L, D) float32; safetensors, never pickle
        except Exception as err:  # truncated or foreign file: recompute and overwrite it
            warnings.warn(f"ignoring unreadable text-embedding cache file {path}: {err}")
            return None

    def _save(self, cache: Path, prior, text: str, emb: torch.Tensor) -> None:
        tmp = None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            # tmp file + os.replace: a crash or a parallel run never leaves a half-written file.
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
            os.close(fd)
            meta = {"text": text, "prior": prior.cache_key}
            save_file({"embedding": emb.detach().float().cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, self._path(cache, prior, text))
        except OSError as err:  # a read-only cache must not stop the run
            warnings.warn(f"could not write the text-embedding cache in {cache}: {err}")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
