"""Shared fixtures: the real Gemma 3 270M model, one engine per session, test adapters."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from backend_kits import backend_model
from loras import random_lora

import edgegemma
from edgegemma import models
from edgegemma.gguffile import GGUFHeader, read_header

PROMPT = "The capital of France is"


def greedy(
    engine: edgegemma.Engine, prompt: str = PROMPT, max_tokens: int = 12, **options
) -> list[int]:
    """The tokens ``engine`` generates greedily for ``prompt``."""
    return engine.generate(prompt, max_tokens=max_tokens, **options).token_ids


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The embedded default model, fetched into (and verified in) the edgegemma cache."""
    return models.fetch("gemma3-270m")


@pytest.fixture(scope="session")
def base_header(gguf_path: Path) -> GGUFHeader:
    return read_header(gguf_path)


@pytest.fixture(scope="session")
def engine(gguf_path: Path):
    """One llama.cpp engine shared by the read-only tests (n_ctx 1024)."""
    with edgegemma.load(gguf_path, n_ctx=1024, n_threads=2) as shared:
        yield shared


@pytest.fixture
def clean_engine(engine):
    """The shared engine, restored to no adapters and an empty cache after the test."""
    yield engine
    engine.set_adapters(None)
    for name in list(engine.adapters):
        engine.unload_adapter(name)
    engine.reset()


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, base_header: GGUFHeader) -> Path:
    """Adapters A and B (different seeds and targets) plus broken variants."""
    root = tmp_path_factory.mktemp("loras")
    random_lora(root / "a.gguf", base_header, seed=1, std=0.03)
    random_lora(root / "b.gguf", base_header, seed=2, std=0.03, targets=("attn_k", "attn_output"))
    random_lora(root / "other-arch.gguf", base_header, seed=3, architecture="llama")
    random_lora(root / "wrong-shape.gguf", base_header, seed=4, wrong_n_in=True)
    good = (root / "a.gguf").read_bytes()
    (root / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (root / "not-gguf.gguf").write_text("this is not a GGUF file\n")
    return root


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(megabytes)``: a folder on a file system of that size (a tmpfs, mounted
    here and unmounted after: the tests run as root, as CI does), to fill up."""
    mounted: list[Path] = []

    def make(megabytes: int) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(folder)], check=True
        )
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture(scope="module")
def engines(gguf_path: Path):
    """``engines(backend)`` -> (engine, greedy 8 tokens of PROMPT): one per backend and module."""
    opened: dict[str, tuple[edgegemma.Engine, list[int]]] = {}

    def get(backend: str) -> tuple[edgegemma.Engine, list[int]]:
        if backend not in opened:
            engine = edgegemma.load(
                backend_model(backend, gguf_path), backend=backend, n_ctx=512, n_threads=2
            )
            opened[backend] = engine, engine.generate(PROMPT, max_tokens=8).token_ids
        return opened[backend]

    yield get
    for engine, _ in opened.values():
        engine.close()
