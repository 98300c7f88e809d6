"""Importance weights for requantizing the output matrix: how much each input column matters.

A logit is the dot product of the model's final hidden state ``h`` with one row of the output
matrix, so an error ``e`` in a row moves that logit by ``sum_j e_j h_j``; its expected square is
about ``sum_j e_j^2 E[h_j^2]``. llama.cpp's quantizers take such per-column weights (its "importance
matrix") and choose each block's scale to minimise the weighted error instead of the plain one.
Gemma 3's hidden state has a few columns hundreds of times louder than the rest, so the
weighting matters: on the pinned Gemma 3 270M, an IQ4_NL embedding made with these weights
scores perplexity 29.36 instead of 29.69 and keeps the shipped skills' held-out scores
(docs/models.md).

The weights ship as JSON (one file per model, ``data/importance/NAME.json``), measured once by
``python -m edgegemma.convert.importance MODEL_NAME``: the model writes its own calibration text
(sampled with fixed seeds from generic openings, so no evaluation text is seen) and llama.cpp
returns the final hidden state of every token. Shipping the numbers, rather than measuring them
on first use, keeps a variant's bytes the same on every machine, so ``models.lock`` can pin them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .files import sha256_file

DATA = Path(__file__).parent / "data" / "importance"


def names() -> list[str]:
    """The models that have shipped importance weights."""
    return sorted(path.stem for path in DATA.glob("*.json"))


def path(name: str) -> Path:
    """The shipped file of ``name``'s weights; a :class:`ConversionError` if there is none."""
    found = DATA / f"{name}.json"
    if not found.is_file():
        raise ConversionError(
            f"no importance weights for {name!r}; shipped: {', '.join(names()) or 'none'}"
        )
    return found


def sha256(name: str) -> str:
    """The shipped file's sha256: part of the build key of a variant made with it."""
    return sha256_file(path(name))


def load(name: str) -> np.ndarray:
    """``name``'s weights: one positive float32 per column of its output matrix."""
    record = json.loads(path(name).read_text(encoding="utf-8"))
    values = np.asarray(record["values"], dtype=np.float32)
    if values.ndim != 1 or not np.isfinite(values).all() or (values <= 0).any():
        raise ConversionError(f"importance weights of {name!r} must be positive finite numbers")
    return values
