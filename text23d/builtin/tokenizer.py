"""Write a small CLIP-style BPE tokenizer in which every given word is a single token.

The built-in prior and the tests need a tokenizer without downloading CLIP's 49k-entry vocabulary.
We write the same four files as a real CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so `transformers.CLIPTokenizer.from_pretrained(folder)` loads it with the
stock code path: lower-casing, CLIP's regex pre-tokenizer, byte-level symbols, BPE with `</w>`.

Every single character is in the vocabulary (with and without `</w>`), so a word that is not in the
list still tokenizes, character by character, instead of collapsing to the unknown token.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from tokenizers.models import BPE

from text23d.errors import ConfigError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP marks the last symbol of a word with this suffix
# Characters that get their own token. CLIP's pre-tokenizer splits digits and punctuation into
# separate pieces, so only letters can ever merge into a longer token.
ALPHABET = string.ascii_lowercase + string.digits + ",.!?'-:;()"


def write_word_tokenizer(folder, words: list[str], model_max_length: int = 16) -> None:
    """Write tokenizer files into `folder` so that each of `words` encodes to exactly one id."""
    words = list(dict.fromkeys(w.strip().lower() for w in words if w.strip()))  # dedupe, keep order
    for word in words:
        if not re.fullmatch(r"[a-z]+", word):
            raise ConfigError(
                f"tokenizer word {word!r} is not allowed: words must be letters a-z only, because "
                "CLIP's pre-tokenizer splits digits and punctuation into separate tokens. "
                "Fix: drop the word or spell it with letters."
            )
    if model_max_length < 3:
        raise ConfigError(
            f"model_max_length={model_max_length} is too small: it must be >= 3 "
            "(start token, one word, end token). Fix: pass model_max_length=16 or more."
        )

    vocab: dict[str, int] = {}
    for symbol in list(ALPHABET) + [c + EOW for c in ALPHABET]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        _add_merges_for(word, vocab, merges)
    # Special tokens last, as in CLIP (there they are ids 49406 and 49407).
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    _check_single_tokens(words, vocab, merges)
    _write_files(Path(folder), vocab, merges, model_max_length)


def _add_merges_for(word: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Append the merges that turn `word` into the single symbol `word</w>`.

    BPE always applies the lowest-ranked applicable merge first, so merges appended now fire only
    after every earlier merge is exhausted. We therefore run the current merges on the word and
    join whatever pieces are left, left to right. Words that are already single tokens cannot be
    affected by later merges (a single symbol has no pair left to merge), so one pass suffices.
    """
    pieces = _bpe_pieces(word, vocab, merges)
    while len(pieces) > 1:
        left, right = pieces[0], pieces[1]
        merged = left + right
        merges.append((left, right))
        vocab.setdefault(merged, len(vocab))
        pieces = [merged] + pieces[2:]


def _bpe_pieces(word: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[str]:
    # The `tokenizers` BPE model itself, configured as CLIPTokenizer configures it, so this
    # simulation cannot drift from what the real tokenizer does (e.g. on tie-breaking).
    model = BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix=EOW, continuing_subword_prefix="")
    return [tok.value for tok in model.tokenize(word)]


def _check_single_tokens(words: list[str], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    for word in words:
        pieces = _bpe_pieces(word, vocab, merges)
        if pieces != [word + EOW]:  # a bug here, not a user error
            raise RuntimeError(f"tokenizer construction failed: {word!r} -> {pieces}")


def _write_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_len: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False), encoding="utf-8")
    # The header line is part of the format: readers skip a first line starting with "#version".
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_len,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
