"""Random LoRA adapters for tests, shaped from the real base model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.gguffile import GGUFHeader


def random_lora(
    path: Path,
    base: GGUFHeader,
    *,
    seed: int,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = ("attn_q", "attn_v"),
    std: float = 0.05,
    architecture: str | None = None,
    wrong_n_in: bool = False,
) -> Path:
    """A LoRA on every block's ``targets`` with N(0, std) matrices."""
    rng = np.random.default_rng(seed)
    weights = {}
    n_blocks = base.arch_value("block_count")
    for block in range(n_blocks):
        for target in targets:
            name = f"blk.{block}.{target}.weight"
            shape = base.tensors[name].shape
            n_in, n_out = shape if len(shape) == 2 else (shape[0], 1)
            if wrong_n_in:
                n_in += 64
            a = rng.normal(0.0, std, (rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, std, (n_out, rank)).astype(np.float32)
            weights[name] = (a, b)
    return write_lora_gguf(
        path, architecture=architecture or base.architecture, alpha=alpha, weights=weights
    )
