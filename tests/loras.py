"""Random LoRA adapters for tests, shaped from the real base model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.adapters.peft import CONFIG_FILE, write_peft
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


GEMMA3_270M_MODULES = {
    "self_attn.q_proj": (640, 1024),
    "self_attn.k_proj": (640, 256),
    "self_attn.v_proj": (640, 256),
    "self_attn.o_proj": (1024, 640),
    "mlp.gate_proj": (640, 2048),
    "mlp.up_proj": (640, 2048),
    "mlp.down_proj": (2048, 640),
}
"""(n_in, n_out) of each LoRA target module of Gemma 3 270M, by its PEFT name."""
ATTENTION = tuple(GEMMA3_270M_MODULES)[:4]


def random_peft(
    folder: Path,
    *,
    seed: int,
    modules: Iterable[str] = ("self_attn.q_proj", "self_attn.v_proj"),
    layers: Iterable[int] = range(18),
    rank: int = 8,
    std: float = 0.05,
    alpha: float = 16.0,
    n_in_extra: int = 0,
    **config: object,
) -> Path:
    """A PEFT LoRA folder for Gemma 3 270M with N(0, std) matrices on ``modules`` of
    ``layers`` (``n_in_extra`` widens their input: a misfit); ``config`` overrides keys of
    its adapter_config.json."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in layers:
        for module in modules:
            n_in, n_out = GEMMA3_270M_MODULES[module]
            weights[f"model.layers.{layer}.{module}"] = (
                rng.normal(0, std, (rank, n_in + n_in_extra)).astype(np.float32),
                rng.normal(0, std, (n_out, rank)).astype(np.float32),
            )
    write_peft(folder, weights, alpha=alpha)
    if config:
        edit_peft_config(folder, **config)
    return folder


def edit_peft_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
