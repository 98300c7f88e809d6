"""Fixtures of the pytest-benchmark suites: the embedded model, one engine, two adapters.

Run them with ``pytest benchmarks/`` (the default test run collects ``tests/`` only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgegemma
from edgegemma import models
from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.gguffile import read_header

THREADS = 2


@pytest.fixture(scope="session")
def model_path() -> Path:
    return models.fetch("gemma3-270m")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, model_path) -> dict[str, Path]:
    """Two random rank-8 LoRAs on attn_q/attn_v of every block, shaped from the base."""
    header = read_header(model_path)
    folder = tmp_path_factory.mktemp("adapters")
    found = {}
    for seed, name in enumerate(("a", "b"), 1):
        rng = np.random.default_rng(seed)
        weights = {}
        for block in range(header.arch_value("block_count")):
            for target in ("attn_q", "attn_v"):
                tensor = f"blk.{block}.{target}.weight"
                n_in, n_out = header.tensors[tensor].shape
                weights[tensor] = (
                    rng.normal(0, 0.03, (8, n_in)).astype(np.float32),
                    rng.normal(0, 0.03, (n_out, 8)).astype(np.float32),
                )
        found[name] = write_lora_gguf(
            folder / f"{name}.gguf", architecture=header.architecture, alpha=16.0, weights=weights
        )
    return found


@pytest.fixture(scope="session")
def engine(model_path, adapters):
    # "always": the swap benchmarks compare a cached prefix under an adapter with a cold one.
    with edgegemma.load(model_path, n_ctx=1024, n_threads=THREADS, prefix_cache="always") as loaded:
        for name, path in adapters.items():
            loaded.load_adapter(name, path)
        yield loaded


@pytest.fixture
def fresh(engine):
    """The shared engine with an empty KV cache and no adapters set."""
    engine.set_adapters(None)
    engine.reset()
    return engine
